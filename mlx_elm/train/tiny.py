"""Tiny models and data for examples, tests and benchmarks (seconds on a laptop CPU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import sentencepiece as spm

from mlx_elm.model_folder import write_random_model
from mlx_elm.models.openelm import ModelArgs

TINY_OPENELM = dict(num_transformer_layers=4, model_dim=128, head_dim=32, vocab_size=512, ffn_dim_divisor=32,
                    max_context_length=256)
WORDS = ("the sky is blue because light from the sun scatters in the air and water of a river under a "
         "mountain near the capital city where a small model learns fast on a device").split()


def train_tiny_spm(out_dir: Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """A tiny SentencePiece BPE model (Llama-style ids: unk 0, bos 1, eos 2)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = out_dir / "spm_corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tiny"), vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    return out_dir / "tiny.model"


def make_tiny_openelm(out_dir: Path, tokenizer_model: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny OpenELM model folder (config.json, model.safetensors, tokenizer)."""
    return write_random_model(ModelArgs(**dict(TINY_OPENELM, **overrides)), "float32", out_dir, seed,
                              tokenizer=str(tokenizer_model))


def write_text_data(folder: Path, n_train: int = 64, n_valid: int = 8, seed: int = 0, words: int = 24) -> Path:
    """A small, learnable ``{"text"}`` data set: word sequences from a fixed cyclic pattern."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def line():
        start = rng.randrange(len(WORDS))
        return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(words))

    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": line()}) + "\n")
    return folder
