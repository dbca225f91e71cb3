"""Training stages of FlashSpeech-mini on an eSpeak corpus, each one a run of ``mlx_elm.train.loop``.

Stages (each resumes exactly from its own checkpoints and writes a model folder):

1. ``recognizer`` / ``speaker``: the judges, on ground-truth mels.
2. ``edm``: denoising warm start of the acoustic model (EDM loss, lognormal sigma), jointly with the
   phoneme/prompt encoders and the duration and pitch regressors (masked L1 on log(1 + d), log(1 + f0)).
3. ``ct``: consistency training (iCT): Karras grid, exponential curriculum N(k), lognormal pair
   sampling, pseudo-Huber distance, lambda = 1/dsigma (normalised by its batch mean unless
   ``faithful_weighting``), plus a small denoising term; the teacher is the student under stop-gradient.
4. ``act``: adversarial consistency training: stage 3 plus an LSGAN loss whose discriminator head sits
   on the frozen phone recognizer's features, weighted by the adaptive gradient-norm ratio on the
   acoustic model's last layer.
5. ``prosody``: with everything else frozen, consistency models on the duration and pitch residuals.

Training examples are (utterance, partner) pairs, the partner being another utterance of the same
speaker that serves as the voice prompt. Random crops are drawn inside the loss from MLX's generator,
which the loop seeds per batch, so a resumed run replays the same crops.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_elm.atomic import atomic_file
from mlx_elm.diffusion import consistency as C
from mlx_elm.errors import SpeechError
from mlx_elm.speech import files
from mlx_elm.speech.files import build_judge, load_judge, load_tts
from mlx_elm.speech.corpus import Corpus, Utt
from mlx_elm.speech.judges import DiscriminatorHead, JudgeArgs, PhoneRecognizer, SpeakerEncoder
from mlx_elm.speech.model import Model, ModelArgs, expand
from mlx_elm.train.data import Dataset, TokenizedSplit
from mlx_elm.train.loop import TrainConfig, train

STAGES = ("recognizer", "speaker", "edm", "ct", "act", "prosody")
ABLATIONS = ("ct-continue",)  # CT for as many steps as ACT, from the same start: the ACT ablation


@dataclass
class StageConfig:
    """Loss settings shared by the stages (defaults: the shipped model's recipe, docs/speech.md)."""

    crop_frames: int = 128  # acoustic target crop (1.5 s)
    prompt_frames: int = 128  # voice prompt crop
    ct_s0: int = 10
    ct_s1: int = 1280
    huber_c: float = 0.03
    faithful_weighting: bool = False  # raw lambda = 1/dsigma instead of lambda / batch-mean(lambda)
    denoise_weight: float = 0.2  # denoising term added to the consistency loss (0 = pure CT)
    adv_weight: float = 0.5  # the extra factor on the adaptive adversarial weight (FlashSpeech code)
    prosody_s1: int = 160
    prosody_weight: float = 1.0
    prior_weight: float = 1.0  # L1 of the regression probe mel_prior(condition) against the target


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Pair:
    utt: Utt
    partner: Utt


def _bucket(n: int, m: int) -> int:
    return max(m, int(math.ceil(n / m)) * m)


def pairs(corpus: Corpus, split: str) -> list[Pair]:
    """Each utterance with the next utterance of its speaker (cyclic) as its voice prompt."""
    out = []
    for utts in corpus.by_speaker(split).values():
        for i, u in enumerate(utts):
            out.append(Pair(u, utts[(i + 1) % len(utts)] if len(utts) > 1 else u))
    return sorted(out, key=lambda p: p.utt.uid)


def collate(batch: list[Pair], max_phones: int = 0, max_frames: int = 0) -> tuple:
    """Pad to the corpus-wide maxima when given (one shape: the loss compiles once), else to buckets."""
    b = len(batch)
    p = max(max_phones, _bucket(max(len(x.utt.durations) for x in batch), 16))
    t = max(max_frames, _bucket(max(x.utt.frames for x in batch), 64))
    tp = max(max_frames, _bucket(max(x.partner.frames for x in batch), 64))
    n_mels = batch[0].utt.mel.shape[1]
    phones = np.zeros((b, p, 3), np.int32)
    pmask = np.zeros((b, p), np.float32)
    dur = np.zeros((b, p), np.int32)
    mel = np.zeros((b, t, n_mels), np.float32)
    f0 = np.zeros((b, t), np.float32)
    fmask = np.zeros((b, t), np.float32)
    fphone = np.zeros((b, t), np.int32)
    prompt = np.zeros((b, tp, n_mels), np.float32)
    plen = np.zeros((b,), np.int32)
    for i, x in enumerate(batch):
        u = x.utt
        n, f = len(u.durations), u.frames
        phones[i, :n], pmask[i, :n], dur[i, :n] = u.phones, 1, u.durations
        mel[i, :f], f0[i, :f], fmask[i, :f] = u.mel, u.f0, 1
        fphone[i, :f] = np.repeat(np.arange(n), u.durations)
        prompt[i, : x.partner.frames] = x.partner.mel
        plen[i] = x.partner.frames
    return phones, pmask, dur, mel, f0, fmask, fphone, prompt, plen


def padded_sizes(corpus: Corpus) -> tuple[int, int]:
    """(phones, frames) every batch of this corpus is padded to."""
    recs = corpus.meta["utterances"]
    return _bucket(max(r["phones"] for r in recs), 16), _bucket(max(r["frames"] for r in recs), 64)


def dataset(corpus: Corpus) -> Dataset:
    train_pairs = pairs(corpus, "train")
    valid = pairs(corpus, "valid") if "valid" in corpus.splits else None
    p_max, t_max = padded_sizes(corpus)
    return Dataset(train=TokenizedSplit(train_pairs), valid=TokenizedSplit(valid) if valid else None,
                   collate=lambda b: collate(b, p_max, t_max), length=lambda x: x.utt.frames)


def _crop_index(lengths: mx.array, size: int, total: int) -> tuple[mx.array, mx.array]:
    """Random crop windows: indices (B, size) into a padded axis of ``total`` and their mask."""
    room = mx.maximum(lengths - size, 0).astype(mx.float32)
    start = mx.floor(mx.random.uniform(shape=lengths.shape) * (room + 1)).astype(mx.int32)
    idx = start[:, None] + mx.arange(size)[None, :]
    mask = (idx < lengths[:, None]).astype(mx.float32)
    return mx.minimum(idx, total - 1), mask


def _take(x: mx.array, idx: mx.array) -> mx.array:
    if x.ndim == 2:
        return mx.take_along_axis(x, idx, axis=1)
    return mx.take_along_axis(x, mx.broadcast_to(idx[..., None], idx.shape + (x.shape[-1],)), axis=1)


def _masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    while mask.ndim < x.ndim:
        mask = mask[..., None]
    mask = mx.broadcast_to(mask, x.shape)
    return mx.sum(x * mask) / mx.maximum(mx.sum(mask), 1.0)


@dataclass
class Inputs:
    """What the acoustic losses need from one batch, after encoders and prosody regressors."""

    x0: mx.array  # target mel crop (B, Tc, n_mels)
    mask: mx.array  # (B, Tc)
    cond: mx.array
    tokens: mx.array
    prompt: mx.array
    prompt_mask: mx.array
    dur_loss: mx.array
    pitch_loss: mx.array
    extras: dict = field(default_factory=dict)


def prepare(model: Model, batch: tuple, cfg: StageConfig) -> Inputs:
    phones, pmask, dur, mel, f0, fmask, fphone, prompt, plen = batch
    pidx, pm = _crop_index(plen, cfg.prompt_frames, prompt.shape[1])
    prompt_c = _take(prompt, pidx) * pm[..., None]
    text_h, tokens = model.encode(phones, pmask, prompt_c, pm)
    dur_pred, dur_h = model.duration(text_h, pmask, tokens)
    log_dur = mx.log1p(dur.astype(mx.float32))
    dur_loss = _masked_mean(mx.abs(dur_pred - log_dur), pmask)
    lengths = mx.sum(fmask, axis=1).astype(mx.int32)
    idx, cm = _crop_index(lengths, cfg.crop_frames, mel.shape[1])
    x0 = _take(mel, idx) * cm[..., None]
    f0_c = _take(f0, idx) * cm
    frame_h = expand(text_h, _take(fphone, idx)) * cm[..., None]
    pitch_pred, pitch_h = model.pitch(frame_h, cm, tokens)
    log_f0 = mx.log1p(f0_c)
    pitch_loss = _masked_mean(mx.abs(pitch_pred - log_f0), cm)
    cond = model.frame_condition(frame_h, f0_c)
    # FastSpeech-style regression of the mel from the condition: a direct signal for the encoders,
    # which the denoising loss alone gives too weakly in a short CPU budget (docs/speech.md)
    prior_loss = _masked_mean(mx.abs(model.mel_prior(cond) - x0), cm)
    extras = {"prior": prior_loss, "dur_res": (log_dur - dur_pred) * pmask, "dur_h": dur_h, "pmask": pmask,
              "pitch_res": (log_f0 - pitch_pred) * cm, "pitch_h": pitch_h}
    return Inputs(x0, cm, cond, tokens, prompt_c, pm, dur_loss, pitch_loss, extras)


# --- losses -------------------------------------------------------------------------------------


def denoising_loss(head, x0, mask, cond, tokens) -> mx.array:
    """EDM denoising loss of a consistency head used as a denoiser (lognormal sigma, EDM weight)."""
    b = x0.shape[0]
    sigma = C.lognormal_sigmas((b,), sigma_min=head.sigma_min * 1.5)
    noisy = x0 + sigma[:, None, None] * mx.random.normal(x0.shape)
    out = head(noisy, sigma, cond, tokens, mask)
    w = C.edm_weight(sigma, head.sigma_data)[:, None, None]
    return _masked_mean(w * (out - x0) ** 2, mask)


def consistency_loss(head, x0, mask, cond, tokens, step, total, s0, s1, cfg: StageConfig):
    """iCT loss; returns (loss, student output, teacher output, noisy input, sigmas, lambda)."""
    b = x0.shape[0]
    n = C.discretization_steps(step, total, s0, s1)
    s_lo, s_hi = C.sample_intervals(n, s1 + 1, (b,), sigma_min=head.sigma_min)
    eps = mx.random.normal(x0.shape)
    x_hi = x0 + s_hi[:, None, None] * eps
    x_lo = x0 + s_lo[:, None, None] * eps
    student = head(x_hi, s_hi, cond, tokens, mask)
    teacher = mx.stop_gradient(head(x_lo, s_lo, cond, tokens, mask))
    lam = C.ct_weight(s_lo, s_hi)
    if not cfg.faithful_weighting:
        lam = lam / mx.mean(lam)
    lam = mx.stop_gradient(lam)[:, None, None]
    loss = _masked_mean(lam * C.pseudo_huber(student, teacher, cfg.huber_c), mask)
    if cfg.denoise_weight > 0:
        w = C.edm_weight(s_hi, head.sigma_data)[:, None, None]
        w = w / (1 + w)  # bounded: ~1 at small sigma, ~sigma_data^2 / sigma^2 at large
        loss = loss + cfg.denoise_weight * _masked_mean(w * (student - x0) ** 2, mask)
    return loss, student, teacher, x_hi, s_hi, lam


def edm_loss_fn(cfg: StageConfig) -> Callable:
    def loss_fn(model, *batch):
        inp = prepare(model, batch, cfg)
        dn = denoising_loss(model.acoustic, inp.x0, inp.mask, inp.cond, inp.tokens)
        loss = dn + inp.dur_loss + inp.pitch_loss + cfg.prior_weight * inp.extras["prior"]
        b = inp.x0.shape[0]
        return loss * b, mx.array(b, mx.float32), {"denoise": dn, "dur": inp.dur_loss, "pitch": inp.pitch_loss,
                                                   "prior": inp.extras["prior"]}

    return loss_fn


def ct_loss_fn(cfg: StageConfig, total: int, final_n: bool = False) -> Callable:
    """CT + prosody regression; ``final_n`` keeps N at s1 + 1 (the continuation that ablates ACT)."""

    def loss_fn(model, *batch, step):
        inp = prepare(model, batch, cfg)
        k = mx.array(total) if final_n else step
        ct, *_ = consistency_loss(model.acoustic, inp.x0, inp.mask, inp.cond, inp.tokens, k, total,
                                  cfg.ct_s0, cfg.ct_s1, cfg)
        loss = ct + inp.dur_loss + inp.pitch_loss + cfg.prior_weight * inp.extras["prior"]
        b = inp.x0.shape[0]
        return loss * b, mx.array(b, mx.float32), {"ct": ct, "dur": inp.dur_loss, "pitch": inp.pitch_loss,
                                                   "prior": inp.extras["prior"]}

    return loss_fn


class ACTModel(nn.Module):
    """What the adversarial stage trains: the TTS model and the discriminator head (the recognizer
    whose features the head reads is frozen)."""

    def __init__(self, tts: Model, recognizer: PhoneRecognizer):
        super().__init__()
        self.tts = tts
        self.recognizer = recognizer
        feat_dims = recognizer.args.channels * len(recognizer.args.dilations)
        self.disc = DiscriminatorHead(feat_dims)
        recognizer.freeze()


def _with_stopped_params(module: nn.Module, fn: Callable):
    """Run ``fn()`` with ``module``'s parameters under stop-gradient (no gradient reaches them)."""
    params = module.parameters()
    module.update(tree_map(mx.stop_gradient, params))
    try:
        return fn()
    finally:
        module.update(params)


def act_loss_fn(cfg: StageConfig, total: int) -> Callable:
    """CT + LSGAN with the adaptive weight ``|grad_W L_ct| / (|grad_W L_adv| + 1e-4)`` on the last layer W.

    Deviation (documented): generator and discriminator terms are summed in one objective whose
    stop-gradients give each its own gradient (simultaneous updates), instead of alternating batches.
    """

    def loss_fn(model: ACTModel, *batch, step):
        tts, rec, disc = model.tts, model.recognizer, model.disc
        inp = prepare(tts, batch, cfg)
        head = tts.acoustic
        # the discretisation stays at its final size N = s1 + 1 (FlashSpeech's stage-2 setting)
        ct, student, teacher, x_hi, s_hi, lam = consistency_loss(
            head, inp.x0, inp.mask, inp.cond, inp.tokens, mx.array(total), total, cfg.ct_s0, cfg.ct_s1, cfg)
        prompt_feats = mx.stop_gradient(
            mx.sum(rec.features(inp.prompt, inp.prompt_mask) * inp.prompt_mask[..., None], axis=1)
            / mx.maximum(mx.sum(inp.prompt_mask, axis=1, keepdims=True), 1.0))

        def d_scores(mel):
            return disc(rec.features(mel, inp.mask), prompt_feats)

        def g_adv(mel):
            return _masked_mean((1 - _with_stopped_params(disc, lambda: d_scores(mel))) ** 2, inp.mask)

        # adaptive weight: gradients of both losses w.r.t. the last layer only
        c_skip, c_out, c_in = head.scalings(s_hi)
        feats = mx.stop_gradient(head.net.features(c_in[:, None, None] * x_hi, C.noise_conditioning(s_hi),
                                                   inp.cond, inp.tokens, inp.mask))
        bias = mx.stop_gradient(head.net.out.bias)

        def out_of(w):
            raw = feats @ w.T + bias
            return (c_skip[:, None, None] * x_hi + c_out[:, None, None] * raw) * inp.mask[..., None]

        def ct_of(w):
            return _masked_mean(lam * C.pseudo_huber(out_of(w), teacher, cfg.huber_c), inp.mask)

        w = mx.stop_gradient(head.net.out.weight)
        g_ct = mx.grad(ct_of)(w)
        g_gan = mx.grad(lambda w_: g_adv(out_of(w_)))(w)
        lam_adv = mx.stop_gradient(mx.clip(mx.sqrt(mx.sum(g_ct**2)) / (mx.sqrt(mx.sum(g_gan**2)) + 1e-4), 0, 1e4))
        loss_g = g_adv(student)
        fake = mx.stop_gradient(student)
        loss_d = (_masked_mean((1 - d_scores(inp.x0)) ** 2, inp.mask) + _masked_mean(d_scores(fake) ** 2, inp.mask))
        loss = (ct + inp.dur_loss + inp.pitch_loss + cfg.prior_weight * inp.extras["prior"]
                + cfg.adv_weight * lam_adv * loss_g + loss_d)
        b = inp.x0.shape[0]
        return loss * b, mx.array(b, mx.float32), {"ct": ct, "g": loss_g, "d": loss_d, "lam_adv": lam_adv,
                                                   "dur": inp.dur_loss, "pitch": inp.pitch_loss}

    return loss_fn


def prosody_loss_fn(cfg: StageConfig, total: int) -> Callable:
    """Consistency training of the duration and pitch refiners on the regressors' residuals."""

    def loss_fn(model: Model, *batch, step):
        inp = prepare(model, batch, cfg)
        ex = {k: mx.stop_gradient(v) for k, v in inp.extras.items() if k != "prior"}
        a = model.args
        terms = {}
        for name, head, res, h, mask, scale in (
            ("dur", model.dur_refiner, ex["dur_res"], ex["dur_h"], ex["pmask"], a.dur_residual_scale),
            ("pitch", model.pitch_refiner, ex["pitch_res"], ex["pitch_h"], inp.mask, a.pitch_residual_scale),
        ):
            x0 = (res / scale)[..., None]
            terms[name], *_ = consistency_loss(head, x0, mask, h, None, step, total, cfg.ct_s0, cfg.prosody_s1, cfg)
        loss = cfg.prosody_weight * (terms["dur"] + terms["pitch"])
        b = inp.x0.shape[0]
        return loss * b, mx.array(b, mx.float32), {"ct_dur": terms["dur"], "ct_pitch": terms["pitch"]}

    return loss_fn


def residual_scales(model: Model, data: Dataset, cfg: StageConfig, batches: int = 8) -> tuple[float, float]:
    """Standard deviations of the duration and pitch residuals over a few training batches, divided by
    sigma_data, so the refiners see residuals of the scale their preconditioning assumes."""
    d_sq, d_n, p_sq, p_n = 0.0, 0.0, 0.0, 0.0
    ex = data.train.examples
    mx.random.seed(1234)
    for i in range(batches):
        chunk = ex[i * 8 % len(ex): i * 8 % len(ex) + 8] or ex[:8]
        inp = prepare(model, tuple(mx.array(a) for a in collate(chunk)), cfg)
        d_sq += float(mx.sum(inp.extras["dur_res"] ** 2))
        d_n += float(mx.sum(inp.extras["pmask"]))
        p_sq += float(mx.sum(inp.extras["pitch_res"] ** 2))
        p_n += float(mx.sum(inp.mask))
    sd = model.args.sigma_data
    return max(math.sqrt(d_sq / max(d_n, 1)) / sd, 1e-3), max(math.sqrt(p_sq / max(p_n, 1)) / sd, 1e-3)


# --- judges -------------------------------------------------------------------------------------


def recognizer_loss_fn(cfg: StageConfig) -> Callable:
    def loss_fn(model: PhoneRecognizer, *batch):
        phones, pmask, dur, mel, f0, fmask, fphone, prompt, plen = batch
        labels = mx.take_along_axis(phones[..., 0], fphone, axis=1)
        ends = mx.cumsum(dur, axis=1)
        onset = mx.zeros(fmask.shape)
        starts = (ends - dur)  # (B, P)
        onset = (mx.arange(fmask.shape[1])[None, :, None] == starts[:, None, :]) * (dur[:, None, :] > 0)
        onset = mx.max(onset, axis=-1).astype(mx.float32)
        lengths = mx.sum(fmask, axis=1).astype(mx.int32)
        idx, cm = _crop_index(lengths, 2 * cfg.crop_frames, mel.shape[1])  # the receptive field is local
        mel, fmask, labels, onset = _take(mel, idx), cm, _take(labels, idx), _take(onset, idx)
        logits, on = model(mel, fmask)
        ce = nn.losses.cross_entropy(logits, labels)
        bce = nn.losses.binary_cross_entropy(on, onset, with_logits=True)
        loss = _masked_mean(ce + 0.5 * bce, fmask)
        acc = _masked_mean((mx.argmax(logits, axis=-1) == labels).astype(mx.float32), fmask)
        b = mel.shape[0]
        return loss * b, mx.array(b, mx.float32), {"frame_acc": acc}

    return loss_fn


def speaker_loss_fn(cfg: StageConfig, speaker_ids: dict) -> Callable:
    def loss_fn(model: SpeakerEncoder, *batch):
        phones, pmask, dur, mel, f0, fmask, fphone, prompt, plen, spk = batch
        lengths = mx.sum(fmask, axis=1).astype(mx.int32)
        idx, cm = _crop_index(lengths, cfg.prompt_frames, mel.shape[1])
        emb = model(_take(mel, idx), cm)
        logits = model.logits(emb)
        loss = mx.mean(nn.losses.cross_entropy(logits, spk))
        acc = mx.mean((mx.argmax(logits, axis=-1) == spk).astype(mx.float32))
        b = mel.shape[0]
        return loss * b, mx.array(b, mx.float32), {"acc": acc}

    return loss_fn


# --- building and running stages ----------------------------------------------------------------


def model_args(corpus: Corpus, **overrides) -> ModelArgs:
    a = ModelArgs(symbols=list(corpus.inventory.symbols), mel_mean=corpus.mel_mean.tolist(),
                  mel_std=corpus.mel_std.tolist(), mel=dict(corpus.meta["config"]["mel"]))
    for k, v in overrides.items():
        setattr(a, k, v)
    return a


@dataclass
class RecipeConfig:
    """Steps and batch sizes of every stage: the one recipe behind the shipped model."""

    recognizer_steps: int = 1000
    speaker_steps: int = 300
    edm_steps: int = 600
    ct_steps: int = 250
    act_steps: int = 80
    prosody_steps: int = 150
    batch_size: int = 8
    learning_rate: float = 1e-3
    act_learning_rate: float = 1e-4
    seed: int = 0
    stage: StageConfig = field(default_factory=StageConfig)
    model: dict = field(default_factory=dict)  # ModelArgs overrides (tiny runs in tests)
    judge_channels: int = 128
    compile: bool = True  # compile the loss (one trace per stage; tiny test runs are faster eager)
    learning_rates: dict = field(default_factory=dict)  # per-stage overrides, e.g. {"edm": 3e-3}


def model_dir(out: Path, stage: str) -> Path:
    """Where a stage's model folder goes (its checkpoints sit beside it in ``out/<stage>/checkpoints``)."""
    return Path(out) / stage / "model"


def _train_cfg(steps: int, rc: RecipeConfig, lr: float, resume: bool, progress: bool,
               compile_: bool = True) -> TrainConfig:
    return TrainConfig(batch_size=rc.batch_size, iters=steps, learning_rate=lr, warmup_steps=min(100, steps // 10),
                       min_lr=lr * 0.1, grad_clip=1.0, steps_per_eval=0, save_every=max(steps // 5, 50),
                       keep_checkpoints=1, seed=rc.seed, resume=resume, compile=compile_, progress=progress)


def _speaker_dataset(corpus: Corpus, names: list) -> Dataset:
    ids = {n: i for i, n in enumerate(names)}
    p_max, t_max = padded_sizes(corpus)

    def coll(batch):
        return collate(batch, p_max, t_max) + (np.array([ids[x.utt.speaker] for x in batch], np.int32),)

    train_pairs = [p for p in pairs(corpus, "train") if p.utt.speaker in ids]
    return Dataset(train=TokenizedSplit(train_pairs), collate=coll, length=lambda x: x.utt.frames)


def run_stage(stage: str, corpus: Corpus, out: Path, rc: RecipeConfig, resume: bool = False,
              progress: bool = True, log: Callable[[str], None] = print, from_scratch: bool = False) -> Path:
    """Train one stage into ``out/<stage>`` (model folder + checkpoints); returns the model folder.

    ``from_scratch`` lets ``ct`` start from random weights (the no-warm-start ablation)."""
    if stage not in STAGES + ABLATIONS:
        raise SpeechError(f"unknown stage '{stage}'; choose one of: {', '.join(STAGES + ABLATIONS)}")
    out = Path(out)
    folder = out / stage
    target = model_dir(out, stage)
    scfg = rc.stage
    mx.random.seed(rc.seed)
    fp = {"stage": stage, "settings": json.loads(json.dumps({"stage": asdict(rc.stage), "model": rc.model,
                                                              "batch": rc.batch_size, "seed": rc.seed}))}
    if stage in ("recognizer", "speaker"):
        names = corpus.speakers(held_out=False)
        labels = list(corpus.inventory.symbols) if stage == "recognizer" else names
        args = JudgeArgs(kind="recognizer" if stage == "recognizer" else "speaker", channels=rc.judge_channels,
                         n_classes=len(labels), labels=labels)
        model = build_judge(asdict(args))
        data = dataset(corpus) if stage == "recognizer" else _speaker_dataset(corpus, names)
        data.valid = None
        loss = recognizer_loss_fn(scfg) if stage == "recognizer" else speaker_loss_fn(scfg, {})
        steps = rc.recognizer_steps if stage == "recognizer" else rc.speaker_steps
        lr = 1e-3
        config = asdict(args)

        def save_fn(m):
            files.save(target, m, config)
    else:
        data = dataset(corpus)
        data.valid = None
        # act, prosody and the ct-continue ablation all start from ct and train disjoint parts (the
        # acoustic model, the refiners), so they can run in parallel and export() merges them exactly
        prev = {"edm": (), "ct": ("edm",), "act": ("ct",), "prosody": ("ct",), "ct-continue": ("ct",)}[stage]
        found = [p for p in prev if (model_dir(out, p) / "model.safetensors").exists()]
        if not prev or (stage == "ct" and from_scratch):
            model = Model(model_args(corpus, **rc.model))
        elif found:
            model = load_tts(model_dir(out, found[0]))
        else:
            raise SpeechError(f"stage {stage} starts from stage {prev[0]}, which is not trained in {out}; run it first")
        lr = rc.act_learning_rate if stage in ("act", "ct-continue") else rc.learning_rate
        if stage == "edm":
            steps, loss = rc.edm_steps, edm_loss_fn(scfg)
        elif stage == "ct":
            steps = rc.ct_steps
            loss = ct_loss_fn(scfg, steps)
        elif stage == "ct-continue":
            steps = rc.act_steps
            model.freeze()
            model.acoustic.unfreeze()
            loss = ct_loss_fn(scfg, steps, final_n=True)
        elif stage == "act":
            steps = rc.act_steps
            model.freeze()  # encoders and regressors are trained; ACT tunes the acoustic model
            model.acoustic.unfreeze()
            model = ACTModel(model, load_judge(model_dir(out, "recognizer")))
            loss = act_loss_fn(scfg, steps)
        else:
            steps = rc.prosody_steps
            if not resume:
                model.args.dur_residual_scale, model.args.pitch_residual_scale = residual_scales(model, data, scfg)
            model.freeze()
            model.dur_refiner.unfreeze()
            model.pitch_refiner.unfreeze()
            loss = prosody_loss_fn(scfg, steps)
        tts = model.tts if stage == "act" else model

        def save_fn(m):
            files.save(target, tts, asdict(tts.args))
    # the adaptive adversarial weight nests a gradient inside the loss, which compiled graphs cannot vjp
    lr = rc.learning_rates.get(stage, lr)
    cfg = _train_cfg(steps, rc, lr, resume, progress, compile_=rc.compile and stage != "act")
    result = train(model, data, cfg, folder, save_fn, fingerprint=fp, loss_fn=loss, log=log)
    if not result.interrupted:
        with atomic_file(folder / "metrics.json") as tmp:
            tmp.write_text(json.dumps({"losses": result.losses, "metrics": result.metrics}))
    log(f"{stage}: {result.summary().replace('tokens', 'utterances').replace('tok/s', 'utt/s')}")
    return target


def run_recipe(corpus: Corpus, out: Path, rc: RecipeConfig, stages: tuple = STAGES, resume: bool = True,
               progress: bool = True, log: Callable[[str], None] = print, from_scratch: bool = False) -> Path:
    """Run the stages in order; a stage whose model folder exists is skipped, a started one resumes."""
    out = Path(out)
    for stage in stages:
        folder = out / stage
        done = (model_dir(out, stage) / "model.safetensors").exists() and (folder / "metrics.json").exists()
        if done:
            log(f"{stage}: already trained in {folder}; skipping")
            continue
        started = resume and (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
        run_stage(stage, corpus, out, rc, resume=started, progress=progress, log=log, from_scratch=from_scratch)
    return out


def default_prompt(corpus: Corpus, frames: int = 128) -> np.ndarray:
    """A normalised prompt mel from the first training speaker: the model's voice when none is given."""
    spk = corpus.speakers(held_out=False)[0]
    utts = sorted(corpus.by_speaker("train")[spk], key=lambda u: -u.frames)
    mel = utts[0].mel
    start = max((mel.shape[0] - frames) // 2, 0)
    return mel[start : start + frames]


def export(run: str | Path, dest: str | Path, corpus: Corpus, stage: str = "prosody", half: bool = True) -> Path:
    """Write the shippable folder: the stage's model (float16 when ``half``) plus its default prompt,
    and the two judges beside it."""
    run, dest = Path(run), Path(dest)
    model = load_tts(model_dir(run, stage))
    if stage == "prosody" and (model_dir(run, "act") / "model.safetensors").exists():
        act = load_tts(model_dir(run, "act"))  # same weights as ct except the acoustic model
        model.acoustic.update(act.acoustic.parameters())
    dtype = mx.float16 if half else mx.float32
    target = dest / "flashspeech-mini"
    files.save(target, model, asdict(model.args), dtype=dtype)
    with atomic_file(target / "default_prompt.safetensors") as tmp:
        mx.save_safetensors(str(tmp), {"mel": mx.array(default_prompt(corpus)).astype(mx.float16)})
    for judge, name in (("recognizer", "phone-recognizer"), ("speaker", "speaker-encoder")):
        if (model_dir(run, judge) / "model.safetensors").exists():
            j = load_judge(model_dir(run, judge))
            files.save(dest / name, j, asdict(j.args), dtype=dtype)
    return target
