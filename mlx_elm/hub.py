"""Hugging Face Hub references: tell a repo id from a path, and fetch files into the HF cache.

One resolver for models, tokenizers and converter sources, so the three agree on what counts as a
repo id and all report a failed download the same way (one line naming the fix). Nothing is
fetched when ``HF_HUB_OFFLINE=1``: only the local cache is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Type

from huggingface_hub import snapshot_download

from mlx_elm.errors import MlxElmError, ModelLoadError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt")


def looks_like_repo_id(ref: str) -> bool:
    """``owner/name`` that is not an existing path and does not start like one."""
    return (bool(REPO_ID.match(ref)) and not ref.startswith((".", "/", "~"))
            and not Path(ref).expanduser().exists())


def download(repo_id: str, allow_patterns: Sequence[str] = MODEL_FILES, revision: Optional[str] = None,
             error: Type[MlxElmError] = ModelLoadError, what: str = "files") -> Path:
    """Snapshot of ``repo_id`` (only ``allow_patterns``) in the HF cache, or one-line ``error``."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns)))
    except Exception as e:  # network, auth, offline cache miss, bad id: one line for the user
        detail = str(e).splitlines()[0][:160] if str(e) else ""
        raise error(
            f"could not get {what} of {repo_id!r} from the Hugging Face Hub ({type(e).__name__}"
            f"{': ' + detail if detail else ''}); check the repo id, your network and access rights "
            "(gated repos need `huggingface-cli login`), or pass a local folder"
        ) from e
