"""Tokenizer files for model folders, and loading them as mlx-lm ``TokenizerWrapper``s.

OpenELM repos ship no tokenizer (they use Llama-2's SentencePiece model), so a user names one with
``--tokenizer``; we copy it into the model folder (or a cache) so it is remembered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from mlx_lm.tokenizer_utils import load as load_wrapper
from transformers.utils import logging as hf_logging

from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import TokenizerError
from mlx_elm.hub import download, looks_like_repo_id
from mlx_elm.platform import cache_home

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

# OpenELM-Instruct was DPO-tuned with alignment-handbook's recipe; its markers are plain text.
OPENELM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

LLAMA2_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": False,
    "clean_up_tokenization_spaces": False,
}

MISSING_TOKENIZER_HINT = (
    "pass --tokenizer with a SentencePiece tokenizer.model file, a folder holding tokenizer "
    "files, or a Hub repo id (OpenELM uses Llama-2's: --tokenizer meta-llama/Llama-2-7b-hf)"
)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()


def install_tokenizer(source: Union[str, Path], out_dir: Path) -> None:
    """Copy tokenizer files from ``source`` into ``out_dir`` (a model folder).

    ``source`` is a SentencePiece ``.model`` file, a folder with tokenizer files, or a Hub repo id.
    A bare ``.model`` gets a Llama-2 style config (BOS added, EOS ``</s>``).
    """
    src = Path(source).expanduser()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        if src.suffix != ".model":
            raise TokenizerError(f"{src} is not a SentencePiece .model file; {MISSING_TOKENIZER_HINT}")
        shutil.copyfile(src, out_dir / "tokenizer.model")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG, indent=2))
        return
    if src.is_dir():
        folder = src
    elif looks_like_repo_id(str(source)):
        folder = download(str(source), TOKENIZER_FILES, error=TokenizerError, what="tokenizer files")
    else:
        raise TokenizerError(f"tokenizer {str(source)!r} does not exist; {MISSING_TOKENIZER_HINT}")
    if not has_tokenizer(folder):
        raise TokenizerError(f"{folder} holds no tokenizer.json or tokenizer.model; {MISSING_TOKENIZER_HINT}")
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, out_dir / name)
    if (folder / "tokenizer.model").exists() and not (folder / "tokenizer_config.json").exists():
        (out_dir / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG, indent=2))


def _cached_tokenizer_dir(source: str) -> Path:
    """A cache folder holding the tokenizer named by ``source`` (built once, atomically)."""
    path = Path(source).expanduser()
    ident = str(path.resolve()) if path.exists() else source
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    target = cache_home() / "tokenizers" / key
    if has_tokenizer(target):
        return target
    with atomic_folder(target, replace=False) as tmp:
        install_tokenizer(source, tmp)
    return target


@contextmanager
def _quiet_transformers():
    """transformers warns that it does not know ``model_type: openelm`` when it reads a model
    folder's config for the tokenizer; the tokenizer itself is fine, so keep that off the user's
    terminal."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(model_dir: Path, tokenizer: Optional[str] = None, config: Optional[dict] = None):
    """The tokenizer for a model folder: ``tokenizer`` if given, else the folder's own files."""
    config = config or {}
    if tokenizer is not None:
        src = Path(tokenizer).expanduser()
        folder = src if src.is_dir() and has_tokenizer(src) else _cached_tokenizer_dir(str(tokenizer))
    elif has_tokenizer(model_dir):
        folder = model_dir
    else:
        raise TokenizerError(f"model folder {model_dir} has no tokenizer; {MISSING_TOKENIZER_HINT}")
    try:
        with _quiet_transformers():
            wrapper = load_wrapper(folder, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for unusable tokenizer files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {first}") from e
    if getattr(wrapper, "chat_template", None) is None and config.get("model_type") == "openelm":
        wrapper._tokenizer.chat_template = OPENELM_CHAT_TEMPLATE
    return wrapper
