"""Training the video model in stages, all through the shared loop (checkpoints, exact resume).

- **stage 0** (video-encoder pretraining, no decoder): segment encoder + resampler learn segment
  facts (:mod:`mlx_elm.video.probe`) on cached frame features; time-reversed clips are added
  when they show no held-out colour x direction pair.
- **stage 1** (alignment, decoder frozen): resampler + projector learn to caption every segment
  through the frozen decoder (``[0s] red circle moves left slowly, ...``).
- **stage 2** (instruction tuning): LoRA on the decoder's last ``lora_layers`` blocks learns
  multi-turn questions about a clip, with ``replay`` stage-1 captions and ``text_replay`` text-only
  instructions (the base decoder's own answers) mixed in.

Each stage writes its own folder under ``out/`` (``checkpoints/`` inside); a finished stage leaves
``done.json`` and is skipped when the command is run again, an interrupted one resumes from its
last checkpoint. The final model folder is ``out/model``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_elm.adapters import ADAPTER_FILE, LoRAConfig, adapter_config_dict, apply_adapters, save_adapters
from mlx_elm.errors import VideoError
from mlx_elm.loading import load_with_info
from mlx_elm.train import checkpoint as ckpt
from mlx_elm.train.data import Dataset, TokenizedSplit
from mlx_elm.train.loop import TrainConfig, TrainResult, train
from mlx_elm.video import dataset as D
from mlx_elm.video import features as FT
from mlx_elm.video import probe as P
from mlx_elm.video import synthetic as S
from mlx_elm.video import textdata
from mlx_elm.video import transcript as TR
from mlx_elm.video.aligner import Aligner, AlignerConfig
from mlx_elm.video.decoder import EmbeddingDecoder
from mlx_elm.video.layout import LayoutConfig, SegmentPlan, build_layout, plan_segments, time_tag
from mlx_elm.video.model import (
    ADAPTER_DIR,
    ALIGNER_FILE,
    ENCODER_DIR,
    VideoLM,
    VideoModelConfig,
    load_weights_f32,
    save_aligner,
    video_loss,
    write_config,
)
from mlx_elm.video.vit import ENCODER_CONFIG, ENCODER_WEIGHTS, load_encoder

CAPTION_PROMPT = "Describe the video segment by segment."
STAGES = ("stage0", "stage1", "stage2")
DONE = "done.json"


@dataclass
class StageConfig:
    iters: int
    batch_size: int
    learning_rate: float
    warmup: int = 20


@dataclass
class VideoTrainConfig:
    """Everything a training run needs; saved in the model folder's ``video_config.json``."""

    data: str
    out: str
    encoder: str = ""  # frame-encoder folder
    decoder: str = "smollm2-135m-instruct"
    fps: float = 2.0
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    stage0: StageConfig = field(default_factory=lambda: StageConfig(1500, 32, 1e-3, 50))
    stage1: StageConfig = field(default_factory=lambda: StageConfig(40, 8, 1e-3, 5))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(100, 8, 2e-4, 10))
    stages: Tuple[str, ...] = STAGES
    stage1_train: Tuple[str, ...] = ("resampler", "projector")
    stage2_train: Tuple[str, ...] = ()  # aligner parts trained with the LoRA adapters
    lora_rank: int = 8
    lora_layers: int = 8
    replay: float = 0.15
    text_replay: float = 0.10
    turns: int = 6
    train_clips: int = 0  # 0: every training clip
    seed: int = 0
    compile: bool = False
    progress: bool = True

    def validate(self) -> "VideoTrainConfig":
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise VideoError(f"--stages must name some of {', '.join(STAGES)} (got {', '.join(self.stages) or 'none'})")
        if not 0 <= self.replay < 1 or not 0 <= self.text_replay < 1:
            raise VideoError("--replay and --text-replay must be in [0, 1)")
        if self.turns < 1:
            raise VideoError(f"--turns must be >= 1 (got {self.turns})")
        for name in ("stage0", "stage1", "stage2"):
            st = getattr(self, name)
            if st.iters < 1 or st.batch_size < 1 or st.learning_rate <= 0:
                raise VideoError(f"--{name}-iters, batch size and learning rate must be positive")
        self.layout.validate()
        if self.layout.queries != self.aligner.queries:
            raise VideoError(f"layout queries ({self.layout.queries}) and aligner queries ({self.aligner.queries}) differ")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d


@dataclass
class VideoExample:
    """One training sequence: tokens with visual slots, and which frames fill them."""

    clip_id: int  # -1: text only
    tokens: List[int]
    targets: List[int]
    visual_positions: List[int]
    frame_index: Optional[np.ndarray]  # [S, F]
    kind: str = "qa"  # qa | caption | text


# --- data --------------------------------------------------------------------------------------


def clip_plan(scene: S.Scene, feats: FT.FrameFeatures, layout: LayoutConfig) -> SegmentPlan:
    return plan_segments(feats.duration, feats.times, layout)


def clip_transcripts(scene: S.Scene, plan: SegmentPlan) -> List[List[str]]:
    return TR.assign(TR.from_pairs(scene.narration), plan.boundaries)


def caption_text(scene: S.Scene, plan: SegmentPlan) -> str:
    return " ".join(f"{time_tag(a)} {S.segment_caption(scene, a, b)}" for a, b in plan.boundaries)


def _example(tokenizer, layout: LayoutConfig, plan, transcripts, turns, clip_id: int, kind: str) -> VideoExample:
    lay = build_layout(tokenizer, plan, transcripts, turns, layout)
    return VideoExample(clip_id, lay.tokens, lay.targets, lay.visual_positions,
                        None if plan is None else plan.frame_index, kind)


def caption_examples(tokenizer, scenes: Dict[int, S.Scene], feats: Dict[int, FT.FrameFeatures],
                     layout: LayoutConfig) -> List[VideoExample]:
    out = []
    for cid, scene in sorted(scenes.items()):
        plan = clip_plan(scene, feats[cid], layout)
        out.append(_example(tokenizer, layout, plan, clip_transcripts(scene, plan),
                            [(CAPTION_PROMPT, caption_text(scene, plan))], cid, "caption"))
    return out


def qa_examples(tokenizer, scenes: Dict[int, S.Scene], feats: Dict[int, FT.FrameFeatures], rows: List[dict],
                layout: LayoutConfig, turns: int, seed: int) -> List[VideoExample]:
    """Every clip's questions, shuffled and cut into conversations of ``turns`` questions."""
    by_clip: Dict[int, List[dict]] = {}
    for r in rows:
        by_clip.setdefault(r["clip_id"], []).append(r)
    out = []
    for cid, qs in sorted(by_clip.items()):
        rng = np.random.default_rng([seed, 31, cid])
        order = rng.permutation(len(qs))
        plan = clip_plan(scenes[cid], feats[cid], layout)
        trans = clip_transcripts(scenes[cid], plan)
        for i in range(0, len(qs), turns):
            chunk = [qs[j] for j in order[i : i + turns]]
            out.append(_example(tokenizer, layout, plan, trans, [(q["question"], q["answer"]) for q in chunk], cid, "qa"))
    return out


def text_examples(tokenizer, prompts: Sequence[str], answers: Sequence[str], layout: LayoutConfig) -> List[VideoExample]:
    plain = replace(layout, system="")  # the decoder's own default system prompt, as in plain chat
    return [_example(tokenizer, plain, None, None, [(p, a)], -1, "text") for p, a in zip(prompts, answers)]


def _round_up(n: int, k: int) -> int:
    return max(k, (n + k - 1) // k * k)


def make_collate(features: Dict[int, FT.FrameFeatures]):
    """Examples -> ``(tokens, visual_index, visual_mask, feats, times, target_pos, target_ids, target_w)``.

    Lengths are padded to multiples of 8 so a compiled step sees few distinct shapes.
    """
    some = next(iter(features.values()))
    P_, C = some.tokens.shape[1:]

    def collate(examples: List[VideoExample]):
        B = len(examples)
        L = _round_up(max(len(e.tokens) for e in examples) - 1, 8)
        S_ = max([e.frame_index.shape[0] for e in examples if e.frame_index is not None] or [1])
        F = max([e.frame_index.shape[1] for e in examples if e.frame_index is not None] or [1])
        K = _round_up(max(sum(e.targets[1:]) for e in examples), 8)
        tokens = np.zeros((B, L), np.int32)
        vidx = np.zeros((B, L), np.int32)
        vmask = np.zeros((B, L), np.float32)
        feats = np.zeros((B, S_, F, P_, C), np.float32)
        times = np.zeros((B, S_, F), np.float32)
        tpos = np.zeros((B, K), np.int32)
        tid = np.zeros((B, K), np.int32)
        tw = np.zeros((B, K), np.float32)
        for b, e in enumerate(examples):
            n = len(e.tokens) - 1
            tokens[b, :n] = e.tokens[:n]
            vp = np.asarray(e.visual_positions, dtype=np.int64)
            vidx[b, vp] = np.arange(len(vp))
            vmask[b, vp] = 1.0
            if e.frame_index is not None:
                ff = features[e.clip_id]
                s, f = e.frame_index.shape
                feats[b, :s, :f] = ff.tokens[e.frame_index].astype(np.float32)
                times[b, :s, :f] = ff.times[e.frame_index]
            pos = [p - 1 for p in range(1, len(e.tokens)) if e.targets[p]]
            tpos[b, : len(pos)] = pos
            tid[b, : len(pos)] = [e.tokens[p + 1] for p in pos]
            tw[b, : len(pos)] = 1.0
        return tokens, vidx, vmask, feats, times, tpos, tid, tw

    return collate


def stage0_collate(features: Dict[int, FT.FrameFeatures], scenes: Dict[int, S.Scene], layout: LayoutConfig):
    """``(clip id, reversed)`` examples -> ``(feats, times, fact targets, segment mask)``."""
    some = next(iter(features.values()))
    P_, C = some.tokens.shape[1:]

    def collate(examples: List[Tuple[int, bool]]):
        plans = []
        for cid, rev in examples:
            ff = features[cid]
            plans.append(plan_segments(ff.duration, ff.times, layout))
        S_ = max(p.num_segments for p in plans)
        F = layout.frames_per_segment
        B = len(examples)
        feats = np.zeros((B, S_, F, P_, C), np.float32)
        times = np.zeros((B, S_, F), np.float32)
        targets = np.zeros((B, S_, P.FACT_SIZE), np.float32)
        mask = np.zeros((B, S_), np.float32)
        for b, ((cid, rev), plan) in enumerate(zip(examples, plans)):
            ff, scene = features[cid], scenes[cid]
            tokens = ff.tokens[::-1] if rev else ff.tokens  # reversed clip: frames in reverse, times ascending
            if rev:
                scene = S.reverse_scene(scene)
            s = plan.num_segments
            feats[b, :s] = tokens[plan.frame_index].astype(np.float32)
            times[b, :s] = ff.times[plan.frame_index]
            targets[b, :s] = [P.segment_facts(scene, a, e) for a, e in plan.boundaries]
            mask[b, :s] = 1.0
        return feats, times, targets, mask

    return collate


# --- running the stages ------------------------------------------------------------------------


class Progress:
    """Log lines to stdout and to ``out/train.log`` (so a background run can be followed)."""

    def __init__(self, out: Path):
        self.file = Path(out) / "train.log"
        self.file.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.file, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")


def _stage_done(folder: Path) -> Optional[dict]:
    f = folder / DONE
    return json.loads(f.read_text()) if f.exists() else None


def _mark_done(folder: Path, result: TrainResult, extra: Optional[dict] = None) -> dict:
    info = {"steps": result.step, "final_loss": result.losses[-1] if result.losses else None,
            "val": result.val_losses[-1][1] if result.val_losses else None, "seconds": result.seconds,
            "peak_memory_gb": result.peak_memory_gb, **(extra or {})}
    ckpt.atomic_write_json(folder / DONE, info)
    return info


def _train_cfg(st: StageConfig, cfg: VideoTrainConfig, resume: bool, eval_every: int, val_batches: int) -> TrainConfig:
    return TrainConfig(batch_size=st.batch_size, iters=st.iters, learning_rate=st.learning_rate,
                       warmup_steps=min(st.warmup, max(st.iters // 5, 0)), min_lr=st.learning_rate * 0.1,
                       weight_decay=0.01, grad_clip=1.0, steps_per_eval=eval_every, val_batches=val_batches,
                       save_every=max(10, min(100, st.iters // 5)), seed=cfg.seed, resume=resume,
                       compile=cfg.compile, progress=cfg.progress, max_seq_length=cfg.layout.max_prompt_tokens)


def _has_checkpoint(folder: Path) -> bool:
    return ckpt.latest_checkpoint(folder) is not None


def _freeze_except(aligner: Aligner, parts: Sequence[str]) -> None:
    aligner.freeze()
    for part in parts:
        if part not in ("segment_encoder", "resampler", "projector"):
            raise VideoError(f"unknown aligner part {part!r}; choose segment_encoder, resampler or projector")
        aligner[part].unfreeze()


@dataclass
class TrainingData:
    scenes: Dict[int, S.Scene]
    rows: List[dict]
    valid_scenes: Dict[int, S.Scene]
    valid_rows: List[dict]
    features: Dict[int, FT.FrameFeatures]  # train and valid clips, valid ids offset by VALID_OFFSET


VALID_OFFSET = 10_000_000


def load_training_data(cfg: VideoTrainConfig, encoder, log=print) -> TrainingData:
    data_dir = Path(cfg.data)
    files = FT.prepare_split_features(data_dir, encoder, cfg.fps, ("train", "valid"), log)
    scenes, rows = D.read_split(data_dir, "train")
    if cfg.train_clips:
        keep = set(sorted(scenes)[: cfg.train_clips])
        scenes = {k: v for k, v in scenes.items() if k in keep}
        rows = [r for r in rows if r["clip_id"] in keep]
    vscenes, vrows = D.read_split(data_dir, "valid")
    feats = {k: v for k, v in FT.load_split(files["train"]).items() if k in scenes}
    feats.update({VALID_OFFSET + k: v for k, v in FT.load_split(files["valid"]).items()})
    vscenes = {VALID_OFFSET + k: v for k, v in vscenes.items()}
    vrows = [dict(r, clip_id=VALID_OFFSET + r["clip_id"]) for r in vrows]
    return TrainingData(scenes, rows, vscenes, vrows, feats)


def run_stage0(cfg: VideoTrainConfig, td: TrainingData, aligner: Aligner, log, on_step=None) -> dict:
    folder = Path(cfg.out) / "stage0"
    done = _stage_done(folder)
    if done is not None:
        load_weights_f32(aligner, folder / ALIGNER_FILE)
        log(f"stage 0: already done ({done['steps']} steps), reusing {folder}")
        return done
    model = P.Stage0Model(aligner)
    mx.eval(model.parameters())
    _freeze_except(aligner, ("segment_encoder", "resampler"))
    train_ex = [(cid, False) for cid in sorted(td.scenes)]
    train_ex += [(cid, True) for cid in sorted(td.scenes) if not S.shows_held_out_pair(S.reverse_scene(td.scenes[cid]))]
    valid_ex = [(cid, False) for cid in sorted(td.valid_scenes)]
    scenes = {**td.scenes, **td.valid_scenes}
    data = Dataset(TokenizedSplit(train_ex), TokenizedSplit(valid_ex),
                   collate=stage0_collate(td.features, scenes, cfg.layout), length=lambda e: 0)
    tc = _train_cfg(cfg.stage0, cfg, _has_checkpoint(folder), eval_every=max(cfg.stage0.iters // 3, 1), val_batches=8)
    log(f"stage 0: segment encoder + resampler on segment facts, {len(train_ex)} clips (incl. reversed), "
        f"{cfg.stage0.iters} steps x {cfg.stage0.batch_size}")
    res = train(model, data, tc, folder, lambda m: save_aligner(folder, m.aligner),
                fingerprint={"stage": 0, "aligner": cfg.aligner.to_dict()}, loss_fn=P.probe_loss, log=log, on_step=on_step)
    if res.interrupted:
        raise KeyboardInterrupt
    model.eval()
    collate = stage0_collate(td.features, scenes, cfg.layout)
    held_out = P.probe_accuracy(model, (collate(valid_ex[i : i + 32]) for i in range(0, len(valid_ex), 32)))
    info = _mark_done(folder, res, {"valid_probe_accuracy": held_out})
    log("stage 0 probe on held-out clips: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in held_out.items()))
    log(f"stage 0: {res.summary()}")
    return info


def _decoder(cfg: VideoTrainConfig):
    base, tokenizer, info = load_with_info(cfg.decoder)
    base.freeze()
    return EmbeddingDecoder(base), tokenizer, info


def run_stage1(cfg: VideoTrainConfig, td: TrainingData, model: VideoLM, tokenizer, log, on_step=None) -> dict:
    folder = Path(cfg.out) / "stage1"
    done = _stage_done(folder)
    if done is not None:
        load_weights_f32(model.aligner, folder / ALIGNER_FILE)
        log(f"stage 1: already done ({done['steps']} steps), reusing {folder}")
        return done
    _freeze_except(model.aligner, cfg.stage1_train)
    train_ex = caption_examples(tokenizer, td.scenes, td.features, cfg.layout)
    valid_ex = caption_examples(tokenizer, td.valid_scenes, td.features, cfg.layout)
    data = Dataset(TokenizedSplit(train_ex), TokenizedSplit(valid_ex), collate=make_collate(td.features),
                   length=lambda e: len(e.tokens))
    tc = _train_cfg(cfg.stage1, cfg, _has_checkpoint(folder), eval_every=cfg.stage1.iters, val_batches=4)
    log(f"stage 1: {'+'.join(cfg.stage1_train)} on segment captions, decoder frozen; {len(train_ex)} clips, "
        f"{cfg.stage1.iters} steps x {cfg.stage1.batch_size}")
    res = train(model, data, tc, folder, lambda m: save_aligner(folder, m.aligner),
                fingerprint={"stage": 1, "aligner": cfg.aligner.to_dict(), "layout": cfg.layout.to_dict()},
                loss_fn=video_loss, log=log, on_step=on_step)
    if res.interrupted:
        raise KeyboardInterrupt
    info = _mark_done(folder, res)
    log(f"stage 1: {res.summary()}")
    return info


def replay_answers(cfg: VideoTrainConfig, base, tokenizer, log) -> List[str]:
    """The base decoder's answers to the replay prompts, computed once per run folder."""
    file = Path(cfg.out) / "text_replay.json"
    if file.exists():
        return json.loads(file.read_text())
    t0 = time.time()
    answers = textdata.self_distill(base, tokenizer, textdata.REPLAY_PROMPTS)
    ckpt.atomic_write_json(file, answers)
    log(f"text replay: {len(answers)} answers of the base decoder in {time.time() - t0:.0f}s -> {file}")
    return answers


def stage2_mixture(cfg: VideoTrainConfig, td: TrainingData, tokenizer, answers: List[str]) -> Tuple[list, list]:
    qa = qa_examples(tokenizer, td.scenes, td.features, td.rows, cfg.layout, cfg.turns, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 77])
    mix = list(qa)
    if cfg.replay > 0:
        caps = caption_examples(tokenizer, td.scenes, td.features, cfg.layout)
        n = int(round(cfg.replay * len(qa)))
        mix += [caps[i] for i in rng.choice(len(caps), size=min(n, len(caps)), replace=False)]
    if cfg.text_replay > 0:
        texts = text_examples(tokenizer, textdata.REPLAY_PROMPTS, answers, cfg.layout)
        n = int(round(cfg.text_replay * len(qa)))
        mix += [texts[i] for i in rng.integers(0, len(texts), size=n)]
    valid = qa_examples(tokenizer, td.valid_scenes, td.features, td.valid_rows, cfg.layout, cfg.turns, cfg.seed)
    return mix, valid


def lora_config(cfg: VideoTrainConfig) -> LoRAConfig:
    return LoRAConfig(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, dropout=0.0, targets=("all-linear",),
                      num_layers=cfg.lora_layers)


def model_config(cfg: VideoTrainConfig, encoder, info: dict) -> VideoModelConfig:
    return VideoModelConfig(cfg.decoder, cfg.fps, cfg.aligner, cfg.layout,
                            {"config": cfg.to_dict(), "encoder": encoder.cfg.to_dict(), **info})


def save_model_folder(folder: Path, cfg: VideoTrainConfig, encoder_dir: Path, model: VideoLM, encoder,
                      lora: Optional[LoRAConfig], plan, info: dict) -> None:
    """Write ``folder`` (encoder copy, aligner, adapters, config); each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENCODER_DIR).mkdir(exist_ok=True)
    for name in (ENCODER_CONFIG, ENCODER_WEIGHTS):
        src = Path(encoder_dir) / name
        if src.resolve() != (folder / ENCODER_DIR / name).resolve():
            shutil.copyfile(src, folder / ENCODER_DIR / name)
    save_aligner(folder, model.aligner)
    if lora is not None:
        save_adapters(model.decoder.base, folder / ADAPTER_DIR, adapter_config_dict(lora, plan, cfg.decoder))
    write_config(folder, model_config(cfg, encoder, info))


def run_stage2(cfg: VideoTrainConfig, td: TrainingData, model: VideoLM, tokenizer, encoder, log,
               on_step=None) -> dict:
    folder = Path(cfg.out) / "stage2"
    done = _stage_done(folder)
    lora = lora_config(cfg)
    mx.random.seed(cfg.seed)
    plan = apply_adapters(model.decoder.base, lora)
    _freeze_except(model.aligner, cfg.stage2_train)
    if done is not None:
        model.decoder.base.load_weights(str(Path(cfg.out) / "model" / ADAPTER_DIR / ADAPTER_FILE), strict=False)
        log(f"stage 2: already done ({done['steps']} steps), reusing {folder}")
        return done
    answers = replay_answers(cfg, model.decoder.base, tokenizer, log) if cfg.text_replay > 0 else []
    train_ex, valid_ex = stage2_mixture(cfg, td, tokenizer, answers)
    kinds = {k: sum(e.kind == k for e in train_ex) for k in ("qa", "caption", "text")}
    data = Dataset(TokenizedSplit(train_ex), TokenizedSplit(valid_ex), collate=make_collate(td.features),
                   length=lambda e: len(e.tokens))
    tc = _train_cfg(cfg.stage2, cfg, _has_checkpoint(folder), eval_every=max(cfg.stage2.iters // 2, 1), val_batches=6)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(f"stage 2: LoRA r={lora.rank} on the last {plan.num_layers} blocks"
        f"{' + ' + '+'.join(cfg.stage2_train) if cfg.stage2_train else ''} ({trainable / 1e6:.2f}M trainable); "
        f"{kinds['qa']} QA conversations, {kinds['caption']} caption replays, {kinds['text']} text-only; "
        f"{cfg.stage2.iters} steps x {cfg.stage2.batch_size}")
    out_model = Path(cfg.out) / "model"
    enc_dir = Path(cfg.encoder)
    res = train(model, data, tc, folder,
                lambda m: save_model_folder(out_model, cfg, enc_dir, m, encoder, lora, plan, {}),
                fingerprint={"stage": 2, "lora": asdict(lora), "layout": cfg.layout.to_dict(),
                             "mixture": [cfg.replay, cfg.text_replay, cfg.turns]},
                loss_fn=video_loss, log=log, on_step=on_step)
    if res.interrupted:
        raise KeyboardInterrupt
    info = _mark_done(folder, res)
    log(f"stage 2: {res.summary()}")
    return info


def train_video_model(cfg: VideoTrainConfig, log: Optional[Callable[[str], None]] = None,
                      on_step: Optional[Callable[[str, int, float, dict], None]] = None) -> Path:
    """Run the configured stages; returns the model folder (``out/model``). ``on_step(stage, step,
    loss, metrics)`` is called after every optimizer step."""

    def hook(stage):
        return None if on_step is None else (lambda step, loss, m: on_step(stage, step, loss, m))

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = log or Progress(out)
    ckpt.atomic_write_json(out / "train_config.json", cfg.to_dict())
    t0 = time.time()
    encoder = load_encoder(cfg.encoder)
    td = load_training_data(cfg, encoder, log)
    decoder, tokenizer, info = _decoder(cfg)
    cfg.aligner = replace(cfg.aligner, feature_dim=encoder.cfg.hidden_size,
                          tokens_per_frame=encoder.cfg.tokens_per_frame,
                          frames_per_segment=cfg.layout.frames_per_segment, queries=cfg.layout.queries,
                          decoder_dim=decoder.dim, output_rms=decoder.embedding_rms())
    mx.random.seed(cfg.seed)
    aligner = Aligner(cfg.aligner)
    mx.eval(aligner.parameters())
    summary = {}
    if "stage0" in cfg.stages:
        summary["stage0"] = run_stage0(cfg, td, aligner, log, hook("stage0"))
    model = VideoLM(aligner, decoder)
    if "stage1" in cfg.stages:
        summary["stage1"] = run_stage1(cfg, td, model, tokenizer, log, hook("stage1"))
    if "stage2" in cfg.stages:
        summary["stage2"] = run_stage2(cfg, td, model, tokenizer, encoder, log, hook("stage2"))
    else:  # no adapters: the aligner alone makes the model
        save_model_folder(out / "model", cfg, Path(cfg.encoder), model, encoder, None, None, {})
    final = out / "model"
    cfgm = model_config(cfg, encoder, {"stages": summary, "seconds": time.time() - t0})
    write_config(final, cfgm)
    log(f"video model -> {final} ({time.time() - t0:.0f}s, peak memory {mx.get_peak_memory() / 2**30:.2f} GB)")
    return final
