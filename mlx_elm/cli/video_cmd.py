"""`mlx-elm video ...`: ask about a clip, describe it, make synthetic data, train, evaluate.

Thin layer: parse and validate options, call :mod:`mlx_elm.video`, print.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from mlx_elm.atomic import atomic_file
from mlx_elm.cli.options import BatchSize, MaxTokens, Temp, TrainSeed
from mlx_elm.errors import VideoError

video_app = typer.Typer(help="Video-language model in the Pegasus-1 pattern (encode -> align -> decode).",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the `video` sub-commands to the main app."""
    app.add_typer(video_app, name="video")


def _peak_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 2**30


def _layout(max_visual_tokens: Optional[int], long_video: Optional[str], base):
    from dataclasses import replace

    changes = {}
    if max_visual_tokens is not None:
        changes["max_visual_tokens"] = max_visual_tokens
    if long_video is not None:
        changes["long_video"] = long_video
    return replace(base, **changes).validate() if changes else base


def _assistant(model_dir: Optional[Path], decoder: Optional[str], max_visual_tokens, long_video, no_cache: bool):
    from mlx_elm.video.assistant import VideoAssistant
    from mlx_elm.video.model import default_model_dir, read_config

    folder = model_dir or default_model_dir()
    layout = _layout(max_visual_tokens, long_video, read_config(folder).layout)
    cache = None
    if no_cache:
        import tempfile

        cache = Path(tempfile.mkdtemp(prefix="mlx-elm-video-"))
    return VideoAssistant(folder, decoder, feature_cache=cache, layout=layout)


ModelDir = typer.Option(None, "--model-dir", help="Video-model folder from `video train` (default: the shipped model).")
Decoder = typer.Option(None, "--decoder", help="Decoder reference (default: the one the model was trained with).")
MaxMinutes = typer.Option(15.0, "--max-minutes", help="Refuse videos longer than this (0.1-180).")
MaxVisual = typer.Option(None, "--max-visual-tokens", help="Visual-token budget (>= M; default from the model, 1024).")
LongVideo = typer.Option(None, "--long-video", help="Over the budget: 'stretch' (longer segments) or 'refuse'.")


def _check_minutes(m: float) -> float:
    if not 0.1 <= m <= 180:
        raise VideoError(f"--max-minutes must be in [0.1, 180] (got {m})")
    return m * 60.0


def _answer(video: Path, question: str, transcript: Optional[Path], model_dir, decoder, max_tokens: int, temp: float,
            max_minutes: float, max_visual_tokens, long_video, no_cache: bool) -> None:
    from mlx_elm.generation import SamplingOptions
    from mlx_elm.video.assistant import Answer

    from mlx_elm.video.io import probe
    from mlx_elm.video.transcript import read_transcript

    seconds = _check_minutes(max_minutes)
    options = SamplingOptions(max_tokens=max_tokens, temp=temp).validate()
    probe(video)  # a missing or unreadable file fails here, before the model loads
    if transcript is not None:
        read_transcript(transcript)
    t0 = time.perf_counter()
    assistant = _assistant(model_dir, decoder, max_visual_tokens, long_video, no_cache)
    t_load = time.perf_counter() - t0
    ans = Answer("", None, None)  # type: ignore[arg-type]
    for piece in assistant.stream(video, question, transcript, options, seconds, ans):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = ans.stats
    feats = "cached features" if ans.features_cached else f"features {ans.seconds_features:.2f}s"
    typer.echo(ans.budget_line(assistant.layout), err=True)
    typer.echo(f"time to first token {ans.seconds_to_first_token:.2f}s ({feats}; model load {t_load:.1f}s) | "
               f"{s.generation_tokens} tokens at {s.generation_tps:.1f} tok/s | peak memory {_peak_gb():.2f} GB", err=True)


@video_app.command("ask")
def ask_cmd(
    video: Path = typer.Argument(..., help="Video file (anything FFmpeg reads: .mp4, .mov, .mkv ...)."),
    question: str = typer.Argument(..., help="The question, e.g. \"Which way does the red circle move?\""),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="SRT or '[mm:ss] text' lines (stands in for ASR)."),
    model_dir: Optional[Path] = ModelDir,
    decoder: Optional[str] = Decoder,
    max_tokens: MaxTokens = 64,
    temp: Temp = 0.0,
    max_minutes: float = MaxMinutes,
    max_visual_tokens: Optional[int] = MaxVisual,
    long_video: Optional[str] = LongVideo,
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the frame-feature cache."),
) -> None:
    """Stream an answer about a video; prints the token budget used and the time to first token."""
    _answer(video, question, transcript, model_dir, decoder, max_tokens, temp, max_minutes, max_visual_tokens,
            long_video, no_cache)


@video_app.command("describe")
def describe_cmd(
    video: Path = typer.Argument(..., help="Video file."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="SRT or '[mm:ss] text' lines."),
    events: bool = typer.Option(False, "--events", help="List the events in order instead of describing each segment."),
    model_dir: Optional[Path] = ModelDir,
    decoder: Optional[str] = Decoder,
    max_tokens: MaxTokens = 160,
    max_minutes: float = MaxMinutes,
    max_visual_tokens: Optional[int] = MaxVisual,
    long_video: Optional[str] = LongVideo,
) -> None:
    """Describe a video segment by segment (or, with --events, list its events)."""
    from mlx_elm.video.assistant import DESCRIBE_PROMPT, SUMMARY_PROMPT

    _answer(video, SUMMARY_PROMPT if events else DESCRIBE_PROMPT, transcript, model_dir, decoder, max_tokens, 0.0,
            max_minutes, max_visual_tokens, long_video, False)


@video_app.command("demo")
def demo_cmd(
    out: Path = typer.Argument(Path("demo.mp4"), help="Output .mp4."),
    seed: int = typer.Option(0, "--seed", help="Which demo clip (any integer)."),
    duration: float = typer.Option(8.0, "--duration", help="Seconds (2-600)."),
    size: int = typer.Option(64, "--size", help="Frame size in pixels (even, 16-512)."),
) -> None:
    """Write a synthetic moving-shapes clip (and its narration as .srt) and print questions to try."""
    from mlx_elm.video import questions as Q
    from mlx_elm.video.dataset import write_demo

    scene = write_demo(out, seed, duration, size)
    cands = Q.candidate_specs(scene)
    qs = [Q.build(scene, cands[f][0]) for f in ("direction", "speed", "count", "summary") if cands[f]]
    typer.echo(f"wrote {out} ({duration:g} s, {len(scene.objects)} objects{', narration in ' + str(out.with_suffix('.srt')) if scene.narration else ''})")
    for q in qs:
        typer.echo(f"  mlx-elm video ask {out} \"{q.question}\"   # answer: {q.answer}")


@video_app.command("make-data")
def make_data_cmd(
    out: Path = typer.Argument(..., help="Output folder (replaced atomically)."),
    train: int = typer.Option(3000, "--train", help="Training clips (>= 0)."),
    valid: int = typer.Option(100, "--valid", help="Validation clips."),
    id_clips: int = typer.Option(400, "--id", help="In-distribution test clips."),
    comp: int = typer.Option(300, "--comp", help="Compositional test clips (5-6 objects, held-out colour x direction)."),
    length_per_duration: int = typer.Option(6, "--length-per-duration", help="Length-split clips per duration."),
    durations: str = typer.Option("8,30,60,120,300,600", "--durations", help="Length-split durations in seconds."),
    per_family: int = typer.Option(40, "--per-family", help="Test questions per family and split."),
    size: int = typer.Option(64, "--size", help="Frame size (even, >= 16)."),
    fps: float = typer.Option(4.0, "--fps", help="Frame rate of the clips (0-30]."),
    seed: int = typer.Option(0, "--seed", help="Generator seed."),
    splits: str = typer.Option("train,valid,id,comp,length", "--splits", help="Which splits to write."),
) -> None:
    """Generate moving-shapes clips with exact ground truth (versioned and seeded)."""
    from mlx_elm.video.dataset import DataConfig, make_dataset
    from mlx_elm.video.synthetic import GENERATOR_VERSION

    try:
        durs = tuple(int(float(d)) for d in durations.split(",") if d.strip())
    except ValueError:
        raise VideoError(f"--durations must be comma-separated seconds, got '{durations}'") from None
    cfg = DataConfig(train, valid, id_clips, comp, length_per_duration, durs, per_family, size, fps, seed)
    t0 = time.time()
    counts = make_dataset(out, cfg, tuple(s.strip() for s in splits.split(",") if s.strip()))
    typer.echo(f"{GENERATOR_VERSION} seed {seed}: " + ", ".join(f"{k} {v} questions" for k, v in counts.items())
               + f" in {time.time() - t0:.0f}s -> {out}")


@video_app.command("train-encoder")
def train_encoder_cmd(
    out: Path = typer.Argument(..., help="Output frame-encoder folder (checkpoints inside)."),
    iters: int = typer.Option(800, "--iters", help="Optimizer steps (>= 1)."),
    batch_size: BatchSize = 64,
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="Peak learning rate."),
    hidden: int = typer.Option(64, "--hidden", help="ViT width (multiple of 4)."),
    layers: int = typer.Option(4, "--layers", help="ViT blocks."),
    size: int = typer.Option(64, "--size", help="Frame size (multiple of 8)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT."),
    seed: TrainSeed = 0,
) -> None:
    """Train the small ViT frame encoder on rendered frames with dense per-cell targets."""
    from mlx_elm.train.loop import TrainConfig
    from mlx_elm.video.frame_pretrain import train_frame_encoder
    from mlx_elm.video.vit import ViTConfig

    if iters < 1 or batch_size < 1 or hidden < 4 or hidden % 4 or layers < 1 or size % 8:
        raise VideoError("--iters, --batch-size, --layers >= 1; --hidden a multiple of 4; --size a multiple of 8")
    cfg = ViTConfig(image_size=size, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=4)
    tc = TrainConfig(batch_size=batch_size, iters=iters, learning_rate=learning_rate, warmup_steps=min(50, iters // 10),
                     min_lr=learning_rate / 10, weight_decay=0.01, steps_per_eval=max(iters // 4, 1), val_batches=4,
                     save_every=100, resume=resume, seed=seed)
    _, res = train_frame_encoder(out, cfg, tc, examples=iters * batch_size, seed=seed)
    typer.echo(f"frame encoder: {res.summary()} -> {out}")


@video_app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Data folder from `video make-data`."),
    out: Path = typer.Option(..., "--out", help="Run folder; the model lands in OUT/model."),
    encoder: Path = typer.Option(..., "--encoder", help="Frame-encoder folder (`video train-encoder` or `convert-tower`)."),
    decoder: str = typer.Option("smollm2-135m-instruct", "--decoder", help="Decoder (any mlx_elm.load reference)."),
    stages: str = typer.Option("stage0,stage1,stage2", "--stages", help="Which stages to run."),
    queries: int = typer.Option(8, "--queries", help="M visual tokens per segment (1-64)."),
    time_tags: bool = typer.Option(True, "--time-tags/--no-time-tags", help="Open each segment with a text time tag."),
    transcript: bool = typer.Option(True, "--transcript/--no-transcript", help="Put the narration after each segment."),
    stage0_iters: int = typer.Option(1500, "--stage0-iters", help="Video-encoder pretraining steps."),
    stage1_iters: int = typer.Option(40, "--stage1-iters", help="Alignment steps (decoder frozen)."),
    stage2_iters: int = typer.Option(100, "--stage2-iters", help="Instruction-tuning steps (LoRA)."),
    batch_size: BatchSize = 8,
    stage1_train: str = typer.Option("resampler,projector", "--stage1-train", help="Aligner parts trained in stage 1."),
    stage2_train: str = typer.Option("", "--stage2-train", help="Aligner parts also trained in stage 2 (e.g. projector)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank."),
    lora_layers: int = typer.Option(8, "--lora-layers", help="LoRA on the last N decoder blocks."),
    replay: float = typer.Option(0.15, "--replay", help="Stage-1 captions mixed into stage 2 (fraction of QA, [0, 1))."),
    text_replay: float = typer.Option(0.10, "--text-replay", help="Text-only instructions mixed into stage 2 ([0, 1))."),
    turns: int = typer.Option(6, "--turns", help="Questions per training conversation."),
    train_clips: int = typer.Option(0, "--train-clips", help="Use only the first N training clips (0 = all)."),
    seed: TrainSeed = 0,
) -> None:
    """Train the video model: stage 0 (video encoder), 1 (alignment), 2 (LoRA instruction tuning).
    Interrupted runs resume when the same command is run again."""
    from dataclasses import replace

    from mlx_elm.video.layout import LayoutConfig
    from mlx_elm.video.training import StageConfig, VideoTrainConfig, train_video_model

    if not 1 <= queries <= 64:
        raise VideoError(f"--queries must be in [1, 64] (got {queries})")
    base = VideoTrainConfig(data=str(data), out=str(out), encoder=str(encoder))
    cfg = replace(
        base, decoder=decoder, stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
        aligner=replace(base.aligner, queries=queries),
        layout=LayoutConfig(queries=queries, time_tags=time_tags, transcript=transcript),
        stage0=replace(base.stage0, iters=stage0_iters), stage1=replace(base.stage1, iters=stage1_iters, batch_size=batch_size),
        stage2=replace(base.stage2, iters=stage2_iters, batch_size=batch_size),
        stage1_train=tuple(s for s in stage1_train.split(",") if s), stage2_train=tuple(s for s in stage2_train.split(",") if s),
        lora_rank=lora_rank, lora_layers=lora_layers, replay=replay, text_replay=text_replay, turns=turns,
        train_clips=train_clips, seed=seed)
    folder = train_video_model(cfg)
    typer.echo(f"trained video model -> {folder}; try: mlx-elm video ask CLIP.mp4 \"Which way does the red circle move?\" "
               f"--model-dir {folder}")


@video_app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Data folder from `video make-data`."),
    model_dir: Optional[Path] = ModelDir,
    out: Path = typer.Option(Path("video_eval.json"), "--out", help="JSON report (a .md table is written beside it)."),
    splits: str = typer.Option("id,comp,length", "--splits", help="Splits to score."),
    controls: str = typer.Option("full,question,middle,shuffle,reverse", "--controls", help="Conditions (same run)."),
    control_splits: str = typer.Option("id", "--control-splits", help="Splits the non-full controls run on."),
    limit: int = typer.Option(0, "--limit", help="Questions per family and split (0 = all)."),
    transcript: bool = typer.Option(True, "--transcript/--no-transcript", help="Show the narration (ablation: off)."),
    forgetting: bool = typer.Option(False, "--forgetting", help="Also measure text-only perplexity before/after."),
    efficiency: str = typer.Option("", "--efficiency", help="Durations (s) for time-to-first-token and memory, e.g. 8,60,600."),
) -> None:
    """Exact-match accuracy per family and split with controls; forgetting; efficiency."""
    from tqdm import tqdm

    from mlx_elm.video import evaluate as E
    from mlx_elm.video.assistant import CONTROLS, VideoAssistant

    ctrl = tuple(c.strip() for c in controls.split(",") if c.strip())
    bad = [c for c in ctrl if c not in CONTROLS]
    if bad:
        raise VideoError(f"unknown control {bad[0]!r}; choose from {', '.join(CONTROLS)}")
    if out.suffix != ".json":
        raise VideoError(f"--out must end in .json, got '{out}'")
    t0 = time.time()
    assistant = VideoAssistant(model_dir)
    cfg = E.EvalConfig(tuple(s.strip() for s in splits.split(",") if s.strip()), ctrl,
                       tuple(s.strip() for s in control_splits.split(",") if s.strip()), limit, transcript)
    bar = tqdm(desc="eval", unit="answer")
    report = E.evaluate(assistant, data, cfg, log=tqdm.write, progress=bar.update) if cfg.splits else {}
    bar.close()
    if forgetting:
        from mlx_elm.video.forgetting import measure_forgetting

        report["forgetting"] = measure_forgetting(assistant)
    if efficiency:
        from mlx_elm.video.efficiency import measure_efficiency

        durs = [float(d) for d in efficiency.split(",") if d.strip()]
        report["efficiency"] = measure_efficiency(assistant, durs, log=tqdm.write)
    report["model"] = str(assistant.folder)
    md = E.markdown(report) if "table" in report else ""
    if "forgetting" in report:
        md += E.forgetting_markdown(report["forgetting"])
    if "efficiency" in report:
        md += E.efficiency_markdown(report["efficiency"])
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(md)
    typer.echo(md)
    n = len(report.get("records", []))
    typer.echo(f"evaluated {n} answers in {time.time() - t0:.0f}s, peak memory {_peak_gb():.2f} GB -> {out}")


@video_app.command("convert-tower")
def convert_tower_cmd(
    source: Path = typer.Argument(..., help="HF CLIP/SigLIP folder (config.json + weights) or a weights file with --config."),
    out: Path = typer.Argument(..., help="Output frame-encoder folder."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json when SOURCE is a single weights file."),
    pool_grid: int = typer.Option(4, "--pool-grid", help="Pooled tokens per frame side (tokens per frame = grid^2)."),
) -> None:
    """Convert a CLIP or SigLIP vision tower (PyTorch .bin/.pt or .safetensors) into a frame-encoder folder."""
    from convert.vision_tower import convert_vision_tower

    report = convert_vision_tower(source, out, config=config, pool_grid=pool_grid)
    typer.echo(report)
