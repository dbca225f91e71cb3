"""Training data: the three JSONL shapes, loss masks, truncation, errors, resumable batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlx_elm.errors import TrainingError
from mlx_elm.train.data import Batcher, Position, collate, load_dataset, pack_examples, read_jsonl, tokenize_record


@pytest.fixture(scope="module")
def tok(spm_model_path, tmp_path_factory):
    from mlx_elm.tokenizers import install_tokenizer, load_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    install_tokenizer(spm_model_path, folder)
    return load_tokenizer(folder, None, {"model_type": "openelm", "eos_token_id": 2})


def _write(folder: Path, name: str, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def test_malformed_line_names_file_and_line(tmp_path):
    _write(tmp_path, "train.jsonl", [{"text": "a"}, {"text": "b"}, "{not json", {"text": "c"}])
    with pytest.raises(TrainingError, match=r"train\.jsonl line 3: invalid JSON"):
        read_jsonl(tmp_path / "train.jsonl")
    _write(tmp_path, "valid.jsonl", [{"text": "a"}, {"question": "?"}])
    with pytest.raises(TrainingError, match=r"valid\.jsonl line 2: expected a JSON object with 'text'"):
        read_jsonl(tmp_path / "valid.jsonl")
    _write(tmp_path / "x", "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TrainingError, match="line 1: 'messages' has no assistant turn"):
        read_jsonl(tmp_path / "x" / "train.jsonl")
    with pytest.raises(TrainingError, match="is not a folder"):
        load_dataset(tmp_path / "missing", None)


def _targets(tok, ex):
    return tok._tokenizer.decode([t for t, m in zip(ex.tokens, ex.mask) if m])


def test_completion_loss_only_on_completion(tok):
    ex = tokenize_record({"prompt": "the sky is", "completion": "blue river"}, tok)
    assert len(ex.tokens) == len(ex.mask)
    text = _targets(tok, ex)
    assert "blue river" in text and "the sky is" not in text
    assert ex.tokens[-1] == 2 or "</s>" in text  # the end marker is learned too


def test_messages_loss_only_on_assistant_turns(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky colour"},
            {"role": "assistant", "content": "blue sky"}, {"role": "user", "content": "water"},
            {"role": "assistant", "content": "river water"}]
    ex = tokenize_record({"messages": msgs}, tok)
    text = _targets(tok, ex)
    assert "blue sky" in text and "river water" in text
    for not_target in ("be brief", "sky colour", "<|user|>", "<|system|>"):
        assert not_target not in text
    full = tok._tokenizer.decode(ex.tokens)
    assert "sky colour" in full and "<|assistant|>" in full


def test_text_truncation_reported_and_packing(tok, tmp_path):
    long = " ".join(["mountain river"] * 60)
    _write(tmp_path, "train.jsonl", [{"text": long}, {"text": "the sky"}, {"text": "blue water"}])
    data = load_dataset(tmp_path, tok, max_seq_length=16)
    assert data.train.num_truncated == 1
    assert max(len(e.tokens) for e in data.train.examples) == 17
    assert "1 truncated" in data.summary()
    packed = pack_examples(data.train.examples, 8)
    assert all(len(e.tokens) <= 9 for e in packed)
    assert sum(len(e.tokens) for e in packed) >= sum(len(e.tokens) for e in data.train.examples)


def test_batcher_is_deterministic_and_ranks_partition_the_global_batch(tok, tmp_path):
    from mlx_elm.train.data import Example

    ex = [Example(list(range(2 + i % 7)), [1] * (2 + i % 7)) for i in range(20)]
    one = Batcher(ex, 4, seed=3)
    assert one.batches_per_epoch == 5
    pos, seen = Position(), []
    for _ in range(12):
        seen.append(tuple(one.local_indices(pos)))
        pos = one.advance(pos)
    assert pos == Position(2, 2)
    assert seen == [tuple(Batcher(ex, 4, seed=3).local_indices(p)) for p in
                    [Position(e, i) for e in range(3) for i in range(5)][:12]]
    assert sorted(i for b in seen[:5] for i in b) == list(range(20))  # an epoch covers every example
    r0, r1 = Batcher(ex, 4, seed=3, rank=0, world=2), Batcher(ex, 4, seed=3, rank=1, world=2)
    for p in (Position(0, 0), Position(1, 3)):
        assert sorted(r0.local_indices(p) + r1.local_indices(p)) == sorted(one.local_indices(p))
    with pytest.raises(TrainingError, match="multiple of the number of processes"):
        Batcher(ex, 3, world=2)
    tokens, mask = collate([ex[0], ex[3]])
    assert tokens.shape == (2, 5) and mask.shape == (2, 4)
    np.testing.assert_array_equal(mask[0], [1, 0, 0, 0])
