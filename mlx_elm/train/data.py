"""Training data: JSONL in three shapes → token arrays with a loss mask → resumable batches.

Shapes (one JSON object per line):
- ``{"text": ...}``: loss on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion only (chat template when the
  tokenizer has one, plain concatenation otherwise);
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the chat template, loss on the
  assistant turns only.

Batches are a deterministic function of ``(seed, epoch, index)``, so a checkpoint only needs to
remember its position to resume exactly, and each process of a data-parallel run can take its own
slice of every global batch.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mlx_elm.errors import TrainingError

SPLITS = ("train", "valid", "test")
SHAPE_HINT = "expected a JSON object with 'text', 'prompt'/'completion' or 'messages'"


@dataclass
class Example:
    """One tokenized example; ``mask[j] = 1`` when token ``j`` is a training target."""

    tokens: List[int]
    mask: List[int]


@dataclass
class TokenizedSplit:
    examples: List[Example]
    num_truncated: int = 0
    shape: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)


MAX_LINE_BYTES = 4 * 2**20  # one record; longer text is truncated to --max-seq-length tokens anyway


def _strings(obj) -> Iterator[str]:
    """Every string inside a parsed JSON value (keys included), without recursion."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _parse_line(raw: bytes, where: str) -> dict:
    """One JSONL line to a record, or a one-line ``TrainingError`` naming ``where`` (file:line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingError(f"{where}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8; "
                            "save the file as UTF-8") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainingError(f"{where}: invalid JSON ({e.msg}); {SHAPE_HINT}") from e
    except RecursionError as e:
        raise TrainingError(f"{where}: JSON nested too deeply; {SHAPE_HINT}") from e
    except ValueError as e:  # an integer with more digits than Python converts (thousands)
        raise TrainingError(f"{where}: a number too long to read; {SHAPE_HINT}") from e
    if not isinstance(obj, dict) or record_shape(obj) is None:
        raise TrainingError(f"{where}: {SHAPE_HINT}")
    for piece in _strings(obj):
        try:
            piece.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TrainingError(f"{where}: the text holds an unpaired surrogate (\\u{ord(piece[e.start]):04x}), "
                                "which is not a character; fix the text") from e
    problem = _check_record(obj)
    if problem:
        raise TrainingError(f"{where}: {problem}")
    return obj


def read_jsonl(path: Path) -> List[dict]:
    """Parse a JSONL file, failing with the file and line number of the first bad line.

    Only regular files are read (a FIFO would block, a folder is a mistake), and each line is
    bounded (``MAX_LINE_BYTES``) so a single huge line cannot take minutes and gigabytes.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise TrainingError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from e
    if not stat.S_ISREG(mode):
        raise TrainingError(f"{path} is not a regular file; --data must hold train.jsonl as a file")
    records = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise TrainingError(f"{path.name} line {lineno} is longer than {MAX_LINE_BYTES // 2**20} MiB; "
                                        "split it into several records")
                if raw.strip():
                    records.append(_parse_line(raw, f"{path.name} line {lineno}"))
    except OSError as e:
        raise TrainingError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from e
    return records


def record_shape(obj: dict) -> Optional[str]:
    if "messages" in obj:
        return "messages"
    if "prompt" in obj and "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def _check_record(obj: dict) -> Optional[str]:
    shape = record_shape(obj)
    if shape == "text" and not isinstance(obj["text"], str):
        return "'text' must be a string"
    if shape == "completion" and not (isinstance(obj["prompt"], str) and isinstance(obj["completion"], str)):
        return "'prompt' and 'completion' must be strings"
    if shape == "messages":
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list of {'role', 'content'} objects"
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return "each message needs string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return "'messages' has no assistant turn to learn from"
    return None


# --- tokenization ---------------------------------------------------------------------------


def _hf(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def _has_chat_template(tokenizer) -> bool:
    return getattr(_hf(tokenizer), "chat_template", None) is not None


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return _hf(tokenizer).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode_pieces(tokenizer, pieces: Sequence[Tuple[str, int]]) -> Example:
    """Tokenize text pieces separately (so a piece boundary is a token boundary, exactly as at
    inference, where the prompt is tokenized alone) and join them with their loss flags."""
    hf = _hf(tokenizer)
    bos = getattr(hf, "bos_token", None)
    tokens: List[int] = []
    mask: List[int] = []
    for i, (text, flag) in enumerate(pieces):
        if not text:
            continue
        special = i == 0 and not (bos and text.startswith(bos))
        ids = list(hf.encode(text, add_special_tokens=special))
        tokens += ids
        mask += [flag] * len(ids)
    return Example(tokens, mask)


def _eos_id(tokenizer) -> Optional[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(_hf(tokenizer), "eos_token_id", None)
    return eos


def tokenize_record(obj: dict, tokenizer) -> Example:
    """Tokens and loss mask for one record (see the module docstring for the shapes)."""
    shape = record_shape(obj)
    eos = _eos_id(tokenizer)
    if shape == "text":
        ex = _encode_pieces(tokenizer, [(obj["text"], 1)])
        if eos is not None and (not ex.tokens or ex.tokens[-1] != eos):
            ex.tokens.append(eos)
            ex.mask.append(1)
        return ex
    if shape == "completion":
        if _has_chat_template(tokenizer):
            messages = [{"role": "user", "content": obj["prompt"]},
                        {"role": "assistant", "content": obj["completion"]}]
            return _tokenize_messages(messages, tokenizer)
        ex = _encode_pieces(tokenizer, [(obj["prompt"], 0), (obj["completion"], 1)])
        if eos is not None:
            ex.tokens.append(eos)
            ex.mask.append(1)
        return ex
    return _tokenize_messages(obj["messages"], tokenizer)


def _tokenize_messages(messages: List[dict], tokenizer) -> Example:
    if not _has_chat_template(tokenizer):
        raise TrainingError("'messages' data needs a tokenizer with a chat template; use 'text' or "
                            "'prompt'/'completion' records, or a tokenizer that has one")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    pieces: List[Tuple[str, int]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        if not full.startswith(_render(tokenizer, messages[: i + 1], add_generation_prompt=False)):
            raise TrainingError("the chat template is not prefix-consistent, so assistant turns cannot be "
                                "located; use 'prompt'/'completion' records instead")
        pieces += [(full[pos:start], 0), (full[start:end], 1)]
        pos = end
    pieces.append((full[pos:], 0))
    return _encode_pieces(tokenizer, pieces)


def tokenize_records(records: List[dict], tokenizer, max_seq_length: int) -> TokenizedSplit:
    """Tokenize and truncate to ``max_seq_length + 1`` tokens (inputs + the shifted target)."""
    out = TokenizedSplit([], 0, "")
    shapes = set()
    for obj in records:
        shapes.add(record_shape(obj))
        ex = tokenize_record(obj, tokenizer)
        if len(ex.tokens) > max_seq_length + 1:
            ex = Example(ex.tokens[: max_seq_length + 1], ex.mask[: max_seq_length + 1])
            out.num_truncated += 1
        if len(ex.tokens) >= 2 and any(ex.mask[1:]):
            out.examples.append(ex)
    out.shape = "+".join(sorted(s for s in shapes if s))
    return out


def pack_examples(examples: List[Example], max_seq_length: int) -> List[Example]:
    """Concatenate examples into windows of ``max_seq_length + 1`` tokens (no padding waste).

    Attention crosses example boundaries inside a window, as in standard LM pre-training.
    """
    toks = [t for e in examples for t in e.tokens]
    mask = [m for e in examples for m in e.mask]
    n = max_seq_length + 1
    windows = []
    for i in range(0, max(len(toks) - 1, 0), max_seq_length):
        w_t, w_m = toks[i : i + n], mask[i : i + n]
        if len(w_t) >= 2:
            w_m = [0] + w_m[1:]  # the first token of a window is never a target
            windows.append(Example(w_t, w_m))
    return windows


@dataclass
class Dataset:
    """The splits a training run reads: token examples by default, or any examples (speech
    utterances, video clips) with their own ``collate`` (examples → tuple of numpy arrays, the
    loss function's arguments) and ``length`` (used to group similar lengths into a batch)."""

    train: TokenizedSplit
    valid: Optional[TokenizedSplit] = None
    test: Optional[TokenizedSplit] = None
    folder: Optional[Path] = None
    collate: Callable[[list], tuple] = field(default=None, repr=False)
    length: Callable[[Any], int] = field(default=None, repr=False)

    def __post_init__(self):
        self.collate = self.collate or collate
        self.length = self.length or token_length

    def summary(self) -> str:
        parts = []
        for name in SPLITS:
            split = getattr(self, name)
            if split is not None:
                note = f", {split.num_truncated} truncated" if split.num_truncated else ""
                parts.append(f"{name}: {len(split.examples)} examples / {split.num_tokens} tokens{note}")
        return "; ".join(parts)


def load_dataset(folder, tokenizer, max_seq_length: int = 2048, pack: bool = False) -> Dataset:
    """Read ``train.jsonl`` (required), ``valid.jsonl`` and ``test.jsonl`` from ``folder``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TrainingError(f"--data {folder} is not a folder; it must hold train.jsonl (and valid.jsonl)")
    if not (folder / "train.jsonl").exists():
        raise TrainingError(f"{folder} has no train.jsonl; put one JSON object per line there")
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if not path.exists():
            continue
        records = read_jsonl(path)
        if not records:
            if name == "train":
                raise TrainingError(f"{path} is empty; add at least one training example")
            continue
        split = tokenize_records(records, tokenizer, max_seq_length)
        if pack:
            split = TokenizedSplit(pack_examples(split.examples, max_seq_length), split.num_truncated, split.shape)
        splits[name] = split
    if not splits["train"].examples:
        raise TrainingError(f"{folder}/train.jsonl has no example with a token to learn from")
    return Dataset(splits.get("train"), splits.get("valid"), splits.get("test"), folder)


# --- batching --------------------------------------------------------------------------------


@dataclass
class Position:
    """Where the data stream is: the next global batch is batch ``index`` of epoch ``epoch``."""

    epoch: int = 0
    index: int = 0


def token_length(example: Example) -> int:
    return len(example.tokens)


@dataclass
class Batcher:
    """Length-sorted global batches, reshuffled each epoch from ``(seed, epoch)``.

    Sorting by length before grouping keeps padding small; shuffling whole batches keeps the
    order random. ``rank``/``world`` select this process's slice of every global batch.
    ``collate`` and ``length`` default to token examples; other rooms pass their own.
    """

    examples: List[Any]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle: bool = True
    collate: Callable[[list], tuple] = field(default=None, repr=False)
    length: Callable[[Any], int] = field(default=None, repr=False)
    groups: List[List[int]] = field(init=False)

    def __post_init__(self):
        if self.batch_size % self.world:
            raise TrainingError(f"--batch-size {self.batch_size} must be a multiple of the number of "
                                f"processes ({self.world})")
        n = len(self.examples)
        if n < self.batch_size:
            raise TrainingError(f"only {n} training examples but --batch-size is {self.batch_size}; "
                                "add data or lower --batch-size")
        self.collate = self.collate or collate
        self.length = self.length or token_length
        order = sorted(range(n), key=lambda i: (self.length(self.examples[i]), i))
        self.groups = [order[i : i + self.batch_size] for i in range(0, n - self.batch_size + 1, self.batch_size)]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.groups)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.groups))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))

    def local_indices(self, pos: Position) -> List[int]:
        group = self.groups[int(self.epoch_order(pos.epoch)[pos.index])]
        return group[self.rank :: self.world]

    def advance(self, pos: Position) -> Position:
        if pos.index + 1 >= len(self.groups):
            return Position(pos.epoch + 1, 0)
        return Position(pos.epoch, pos.index + 1)

    def batch(self, pos: Position) -> tuple:
        return self.collate([self.examples[i] for i in self.local_indices(pos)])

    def iterate(self, pos: Position) -> Iterator[Tuple[Position, tuple]]:
        """Endless stream of ``(position after this batch, batch)`` starting at ``pos``."""
        while True:
            batch = self.batch(pos)
            pos = self.advance(pos)
            yield pos, batch


def collate(examples: List[Example], pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest example: ``tokens [B, L+1]`` and target mask ``[B, L]``."""
    n = max(len(e.tokens) for e in examples)
    tokens = np.full((len(examples), n), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), n), dtype=np.float32)
    for j, e in enumerate(examples):
        tokens[j, : len(e.tokens)] = e.tokens
        mask[j, : len(e.mask)] = e.mask
    return tokens, mask[:, 1:]


def iterate_eval(examples: List[Any], batch_size: int, rank: int = 0, world: int = 1,
                 max_batches: int = -1, collate_fn: Optional[Callable[[list], tuple]] = None,
                 length: Optional[Callable[[Any], int]] = None) -> Iterator[tuple]:
    """Fixed-order batches for validation; each process evaluates its own slice."""
    collate_fn, length = collate_fn or collate, length or token_length
    order = sorted(range(len(examples)), key=lambda i: length(examples[i]))
    mine = order[rank::world]
    for k, i in enumerate(range(0, len(mine), batch_size)):
        if 0 <= max_batches <= k:
            break
        yield collate_fn([examples[j] for j in mine[i : i + batch_size]])
