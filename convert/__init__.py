"""Convert OpenELM PyTorch checkpoints (Hugging Face or corenet) into MLX model folders, safely.

``convert(source, out_dir, **options)`` is the whole pipeline: read names and shapes (no code from
the file is ever executed), validate them against the config, then stream tensors through dtype
casting / quantization into sharded safetensors inside a temporary folder that is renamed into
place only when everything, including the optional ``verify`` check, succeeded.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import ConversionError
from mlx_elm.hub import looks_like_repo_id

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("auto", "openelm", "torchscale-moe")


@dataclass
class ConversionReport:
    """What a conversion produced; ``summary()`` is the CLI's final line."""

    out_dir: Path
    source: str
    kind: str
    parameters: int
    bytes_written: int
    seconds: float
    peak_memory_bytes: int
    files: List[str] = field(default_factory=list)
    max_logit_diff: Optional[float] = None
    tolerance: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        v = "" if self.max_logit_diff is None else f", verify max|Δlogit| {self.max_logit_diff:.2e} (≤ {self.tolerance:.1e})"
        return (f"wrote {self.out_dir}: {self.parameters:,} parameters, {_human(self.bytes_written)} in "
                f"{len(self.files)} file(s), {self.seconds:.1f}s, peak memory {_human(self.peak_memory_bytes)}{v}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def open_source(source: str | Path, preset: Optional[str] = None, vocab_size: Optional[int] = None,
                keep_padding: bool = False, revision: Optional[str] = None, check_crc: bool = True):
    """Resolve SOURCE (Hub repo id, HF folder, or .pt/.bin/.safetensors file) to a ``Source``.

    ``check_crc`` checks the CRC-32 of every zip entry of a .pt/.bin before its bytes are used.
    """
    from convert import corenet, hf, schema
    from convert.safetensors_reader import read_safetensors
    from convert.source import Source

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        src = hf.read(path, text, preset, check_crc=check_crc)
    elif path.is_file() and path.suffix == ".safetensors":
        base, lora = corenet.split_lora({k: v for k, v in read_safetensors(path).items() if not schema.is_ignorable(k)})
        args, geometry = schema.infer_args({k: v.shape for k, v in base.items()}, vocab_size, preset)
        src = Source(base, args, "safetensors state_dict", text, geometry=geometry, lora=lora)
    elif path.is_file():
        src = corenet.read(path, preset, vocab_size=vocab_size, keep_padding=keep_padding, check_crc=check_crc)
    elif looks_like_repo_id(text):
        src = hf.read(hf.download(text, revision), text, preset, check_crc=check_crc)
        src.location = f"{text} (Hugging Face Hub)"
    else:
        raise ConversionError(f"{text} is neither a file, a folder, nor a Hub repo id (org/name).")
    if path.is_dir() or looks_like_repo_id(text):
        rows = src.tensors.get("transformer.token_embeddings.weight")
        if rows is not None and len(rows.shape) == 2 and rows.shape[0] > src.args.vocab_size and not keep_padding:
            src.tensors, src.lora = corenet.trim_vocab(src.tensors, src.lora, src.args.vocab_size)
            src.notes.append(f"embedding trimmed from {rows.shape[0]} to {src.args.vocab_size} rows")
    return src


def _is_torchscale(source) -> bool:
    """True for a checkpoint file whose tensor names are the torchscale MoE decoder's."""
    path = Path(str(source)).expanduser()
    if not path.is_file():
        return False
    from convert.torchscale_moe import looks_like_torchscale, read_names

    try:
        return looks_like_torchscale(list(read_names(path)))
    except ConversionError:
        return False  # let the OpenELM readers report what is wrong with the file


def _is_3b(args) -> bool:
    return args.model_dim >= 3072 and args.num_transformer_layers >= 36


def convert(source: str | Path, out_dir: str | Path, *, preset: Optional[str] = None, dtype: str = "bfloat16",
            quantize: bool = False, bits: int = 4, group_size: int = 64, quantize_embedding: bool = True,
            tokenizer: Optional[str | Path] = None, keep_padding: bool = False, vocab_size: Optional[int] = None,
            merge_lora: bool = True, lora_scale: float = 1.0, verify: bool = False, force: bool = False,
            force_float16: bool = False, max_shard_size: str | int = "2GB", revision: Optional[str] = None,
            progress: bool = True, command: Optional[str] = None, check_crc: bool = True, format: str = "auto",
            moe_options: Optional[dict] = None) -> ConversionReport:
    """Convert one OpenELM checkpoint into an MLX folder that mlx_elm and mlx-lm both load.

    ``lora_scale`` is alpha / r of a corenet LoRA checkpoint (not stored in the file; corenet's
    OpenELM recipe uses alpha = r = 32, hence 1.0). ``check_crc=False`` skips the CRC-32 check
    of .pt/.bin zip entries (one pass over the file saved; a corrupt byte then goes unnoticed).
    ``format``: ``openelm``, ``torchscale-moe`` (MH-MoE / SMoE
    decoders of the official code, ``convert.torchscale_moe``, with ``moe_options`` such as heads,
    top_k, rope), or ``auto`` (by tensor names). Raises ConversionError (one line) on any problem,
    leaving nothing at ``out_dir``.
    """
    if format not in FORMATS:
        raise ConversionError(f"--format {format!r} must be one of {', '.join(FORMATS)}")
    if format == "torchscale-moe" or (format == "auto" and _is_torchscale(source)):
        from convert.torchscale_moe import convert_torchscale_moe

        if quantize and (bits not in (4, 8) or group_size not in (32, 64, 128)):
            raise ConversionError(f"--bits {bits} / --group-size {group_size}: use 4 or 8 bits and 32, 64 or 128")
        return convert_torchscale_moe(source, out_dir, dtype=dtype, tokenizer=tokenizer, verify=verify, force=force,
                                      progress=progress, quantize_bits=bits if quantize else None,
                                      group_size=group_size, check_crc=check_crc, **(moe_options or {}))
    import mlx.core as mx
    from tqdm import tqdm

    from convert import lora as lora_mod
    from convert import quantize as qmod
    from convert import schema, writer
    from convert.tensors import to_mlx
    from mlx_elm.models.openelm import count_parameters

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if quantize and bits not in (4, 8):
        raise ConversionError(f"--bits {bits} is not supported; use 4 or 8.")
    if quantize and group_size not in (32, 64, 128):
        raise ConversionError(f"--group-size {group_size} is not supported; use 32, 64 or 128.")
    max_bytes = writer.parse_size(max_shard_size)
    out = Path(out_dir)
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it.")

    src = open_source(source, preset, vocab_size, keep_padding, revision, check_crc)
    if dtype == "float16" and _is_3b(src.args) and not force_float16:
        raise ConversionError("refusing float16 for OpenELM-3B: its activations overflow float16 (outputs become "
                              "<unk>/NaN); use --dtype bfloat16, or --force-float16 if you know better.")
    tensors, args, adapter, notes = lora_mod.apply(src, lora_scale, merge_lora)
    notes = src.notes + notes
    shapes = {k: v.shape for k, v in tensors.items()}
    schema.validate(shapes, args, src.location)
    if quantize:
        qmod.check_shapes(shapes.items(), group_size, quantize_embedding)
    parameters = count_parameters(args)

    options = {"dtype": dtype, "quantization": f"{bits}-bit, group size {group_size}, embedding "
               f"{'quantized' if quantize_embedding else 'kept in ' + dtype}" if quantize else "none",
               "vocabulary": f"{args.vocab_size} rows", "tokenizer": str(tokenizer) if tokenizer else "not included"}
    if src.lora:
        options["lora"] = "merged" if merge_lora else "linear adapters exported to adapters/"
        options["lora scale"] = lora_scale

    order = sorted(tensors, key=_natural_key)
    diff = allowed = None
    with atomic_folder(out, replace=force) as tmp:
        shards = writer.ShardWriter(tmp, max_bytes)
        bar = tqdm(order, desc="converting", unit="tensor", disable=not progress, file=sys.stderr)
        for name in bar:
            arr = to_mlx(tensors[name].load(), dtype)
            if quantize and qmod.should_quantize(name, quantize_embedding):
                for k, v in qmod.quantize_tensor(name, arr, bits, group_size).items():
                    shards.add(k, v)
            else:
                shards.add(name, arr)
        files = shards.finish(parameters)
        config = args.to_dict()
        if quantize:
            q = qmod.config_entry(bits, group_size, quantize_embedding, not args.share_input_output_layers)
            config["quantization"] = q
            config["quantization_config"] = q
        writer.write_json(tmp / "config.json", config)
        if adapter is not None:
            _write_adapter(tmp / "adapters", adapter, mx)
            files.append("adapters/adapters.safetensors")
        if tokenizer:
            _install_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(writer.model_card(src.location, src.kind, src.geometry, options, notes,
                                                         parameters, command))
        if verify:
            from convert.verify import verify as run_verify

            diff, allowed = run_verify(src, tmp, dtype, bits if quantize else None, lora_scale,
                                       tmp / "adapters" if adapter is not None else None)
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if out.exists() and not force:
            raise ConversionError(f"{out} appeared during the conversion; pass --force to replace it.")
    return ConversionReport(out.absolute(), src.location, src.kind, parameters, written,
                            time.perf_counter() - start, peak_memory_bytes(), files, diff, allowed, notes)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _write_adapter(folder: Path, adapter: dict, mx) -> None:
    from convert.tensors import to_mlx
    from convert.writer import write_json

    folder.mkdir()
    arrays = {k: to_mlx(t.load(), "float32") for k, t in adapter["weights"].items()}
    mx.save_safetensors(str(folder / "adapters.safetensors"), arrays, metadata={"format": "mlx"})
    write_json(folder / "adapter_config.json", adapter["config"])


def _install_tokenizer(tokenizer: str | Path, folder: Path) -> None:
    from mlx_elm.tokenizers import install_tokenizer

    install_tokenizer(tokenizer, folder)


def parse_renames(items: Optional[List[str]]) -> List[tuple]:
    """``--rename OLD=NEW`` strings -> (old, new) pairs for the torchscale converter (one-line error
    otherwise); here so the CLI reaches it through the package API."""
    from convert.torchscale_moe import parse_renames as run

    return run(items)


def convert_hifigan(checkpoint: str | Path, config: str | Path, out: str | Path) -> Path:
    """A public PyTorch HiFi-GAN generator -> an MLX vocoder folder (see ``convert/hifigan.py``).

    Imported on call so converting language models never loads the speech package.
    """
    from convert.hifigan import convert_hifigan as run

    return run(checkpoint, config, out)


__all__ = ["ConversionReport", "convert", "convert_hifigan", "open_source", "parse_renames", "DTYPES", "FORMATS"]
