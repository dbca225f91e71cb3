"""Text to waveform: phonemes -> prosody (regression + alpha x refined residual) -> consistency
sampling of the mel in 1-2 steps -> Griffin-Lim; every stage timed.

``mlx_elm.speech.synthesize("Hello there.")`` uses the model shipped with the package; pass
``model=`` a folder (or a loaded :class:`Synthesizer`) for another one, and ``prompt=`` a WAV file
or samples of the voice to imitate (zero-shot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_elm.diffusion import sampling, schedules
from mlx_elm.errors import SpeechError
from mlx_elm.speech import audio, espeak, files
from mlx_elm.speech.hifigan import Generator, HiFiGANArgs
from mlx_elm.speech.model import Model, expand, frame_index
from mlx_elm.speech.text import Inventory, check_text

PROMPT_FRAMES = 128  # the prompt length the model was trained with (1.5 s)
PROMPT_FILE = "default_prompt.safetensors"
SAMPLERS = ("consistency", "euler", "heun")


@dataclass
class SpeechResult:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    phones: list[str]
    durations: np.ndarray  # frames per phone
    f0: np.ndarray  # predicted Hz per frame (0 = unvoiced)
    mel: np.ndarray  # log-mel (T, n_mels) fed to the vocoder
    timings: dict = field(default_factory=dict)  # seconds per stage

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def rtf(self) -> float:
        """Real-time factor: processing time / audio duration (lower is faster)."""
        return sum(self.timings.values()) / max(self.seconds, 1e-9)


def _sync(*arrays) -> None:
    mx.eval(*arrays)


class Synthesizer:
    """A loaded model with its inventory, normalisation and default prompt."""

    def __init__(self, model: Model | str | Path | None = None, vocoder: str | Path | None = None):
        path = None
        if model is None or isinstance(model, (str, Path)):
            path = Path(model) if model is not None else files.DEFAULT_MODEL
            if model is None and not (path / "model.safetensors").exists():
                raise SpeechError("no shipped speech model in this install; reinstall mlx-elm or pass --model")
            model = files.load_tts(path)
        self.model = model
        a = model.args
        self.inventory = Inventory(list(a.symbols))
        self.mel_cfg = audio.MelConfig(**a.mel) if a.mel else audio.MelConfig()
        self.mean = mx.array(np.asarray(a.mel_mean, np.float32))
        self.std = mx.array(np.asarray(a.mel_std, np.float32))
        self.vocoder = None
        if vocoder is not None:  # a HiFi-GAN folder written by convert/hifigan.py
            self.vocoder = files.load(vocoder, lambda c: Generator(HiFiGANArgs.from_dict(c)), "HiFi-GAN vocoder")
            if self.vocoder.hop != self.mel_cfg.hop or self.vocoder.args.num_mels != a.n_mels:
                raise SpeechError(f"vocoder {vocoder} expects {self.vocoder.args.num_mels} mels at hop "
                                  f"{self.vocoder.hop}, the model makes {a.n_mels} at hop {self.mel_cfg.hop}")
        self.default_prompt = None
        if path is not None and (path / PROMPT_FILE).exists():
            self.default_prompt = mx.load(str(path / PROMPT_FILE))["mel"].astype(mx.float32)

    # --- prompt ------------------------------------------------------------------------------
    def normalise(self, log_mel: mx.array) -> mx.array:
        return (log_mel - self.mean) / self.std * self.model.args.sigma_data

    def denormalise(self, mel: mx.array) -> mx.array:
        return mel / self.model.args.sigma_data * self.std + self.mean

    def prompt_from_samples(self, samples: np.ndarray, sample_rate: int) -> mx.array:
        """Normalised prompt mel (T <= PROMPT_FRAMES, n_mels): silence trimmed, the middle kept."""
        x = audio.resample(np.asarray(samples, np.float32), sample_rate, self.mel_cfg.sample_rate)
        if len(x) < self.mel_cfg.sample_rate // 4:
            raise SpeechError(f"the prompt is {len(x) / self.mel_cfg.sample_rate:.2f} s long; give at least 0.25 s "
                              "(ideally 1.5-3 s) of the target voice")
        if not np.isfinite(x).all() or np.abs(x).max() < 1e-4:
            raise SpeechError("the prompt is silent or corrupt; give a recording of the target voice")
        mel = audio.log_mel(x[: len(x) // self.mel_cfg.hop * self.mel_cfg.hop], self.mel_cfg)
        energy = np.array(mx.max(mel, axis=-1))
        voiced = np.nonzero(energy > energy.max() - 8.0)[0]
        mel = mel[int(voiced[0]) : int(voiced[-1]) + 1] if len(voiced) else mel
        if mel.shape[0] > PROMPT_FRAMES:
            start = (mel.shape[0] - PROMPT_FRAMES) // 2
            mel = mel[start : start + PROMPT_FRAMES]
        return self.normalise(mel)

    def prompt_from_wav(self, path: str | Path) -> mx.array:
        samples, rate = audio.read_wav(path)
        return self.prompt_from_samples(samples, rate)

    def _prompt(self, prompt) -> mx.array:
        if prompt is None:
            if self.default_prompt is None:
                raise SpeechError("this model has no default voice; pass --prompt ref.wav")
            return self.default_prompt
        if isinstance(prompt, (str, Path)):
            return self.prompt_from_wav(prompt)
        if isinstance(prompt, tuple):
            return self.prompt_from_samples(*prompt)
        return mx.array(prompt, dtype=mx.float32)  # an already normalised mel

    # --- stages --------------------------------------------------------------------------------
    def refine(self, head, cond: mx.array, mask: mx.array, scale: float, key: mx.array) -> mx.array:
        """One-step sample of a prosody residual from its consistency model."""
        a = self.model.args
        x = a.sigma_max * mx.random.normal(cond.shape[:2] + (1,), key=key)
        sigma = mx.full((cond.shape[0],), a.sigma_max)
        return head(x, sigma, cond, None, mask)[..., 0] * scale

    def prosody(self, phone_ids: np.ndarray, prompt_mel: mx.array, alpha: float, key: mx.array,
                duration_scale: float = 1.0):
        m, a = self.model, self.model.args
        phones = mx.array(phone_ids)[None]
        pmask = mx.ones(phones.shape[:2])
        prompt = prompt_mel[None]
        text_h, tokens = m.encode(phones, pmask, prompt, mx.ones(prompt.shape[:2]))
        k_dur, k_pitch = mx.random.split(key)
        log_d, dur_h = m.duration(text_h, pmask, tokens)
        if alpha:
            log_d = log_d + alpha * self.refine(m.dur_refiner, dur_h, pmask, a.dur_residual_scale, k_dur)
        dur = mx.maximum(mx.round(mx.expm1(log_d) * duration_scale), 1).astype(mx.int32)
        n_frames = int(mx.sum(dur).item())
        fidx, fmask = frame_index(dur, n_frames)
        frame_h = expand(text_h, fidx)
        log_f0, pitch_h = m.pitch(frame_h, fmask, tokens)
        if alpha:
            log_f0 = log_f0 + alpha * self.refine(m.pitch_refiner, pitch_h, fmask, a.pitch_residual_scale, k_pitch)
        f0 = mx.expm1(mx.maximum(log_f0, 0.0))
        f0 = mx.where(f0 < 0.8 * a.pitch_fmin, 0.0, f0)
        cond = m.frame_condition(frame_h, f0)
        return dur[0], f0[0], cond, tokens, fmask

    def acoustic(self, cond, tokens, mask, steps: int, key: mx.array, sampler: str = "consistency",
                 sigma_inter: float | None = None) -> mx.array:
        """Normalised mel (1, T, n_mels) from noise; ``steps`` network evaluations for consistency
        sampling (Karras levels, or ``[sigma_max, sigma_inter, sigma_min]`` for 2 steps), an
        ``steps``-step Euler/Heun solve of the probability-flow ODE otherwise."""
        a = self.model.args
        head = self.model.acoustic

        def f(x, sigma):
            return head(x, sigma, cond, tokens, mask)

        k_init, k_loop = mx.random.split(key)
        x = a.sigma_max * mx.random.normal(cond.shape[:2] + (a.n_mels,), key=k_init)
        if sampler == "consistency":
            sig = schedules.karras(steps, a.sigma_min, a.sigma_max) if steps > 1 else mx.array([a.sigma_max, a.sigma_min])
            if sigma_inter is not None and steps == 2:
                sig = mx.array([a.sigma_max, sigma_inter, a.sigma_min])
            return sampling.sample_consistency(f, x, sig, key=k_loop, sigma_min=a.sigma_min)
        if sampler not in SAMPLERS:
            raise SpeechError(f"unknown sampler '{sampler}'; choose one of: {', '.join(SAMPLERS)}")
        sig = schedules.karras(steps, a.sigma_min, a.sigma_max)
        out, _ = sampling.sample(sampler, f, x, sig)
        return out

    def vocode(self, log_mel: mx.array, iters: int = 32) -> mx.array:
        """Griffin-Lim, or the converted HiFi-GAN when one was given."""
        if self.vocoder is not None:
            return self.vocoder(log_mel[None] if log_mel.ndim == 2 else log_mel)[0]
        return audio.griffin_lim(log_mel, self.mel_cfg, iters=iters)

    def __call__(self, text: str, prompt=None, steps: int = 2, alpha: float = 0.2, seed: int = 0,
                 sampler: str = "consistency", gl_iters: int = 32, duration_scale: float = 1.0,
                 sigma_inter: float | None = None) -> SpeechResult:
        validate_options(steps, alpha, gl_iters, duration_scale)
        timings = {}
        t0 = time.perf_counter()
        text = check_text(text)
        phones = espeak.phonemize(text)
        ids = self.inventory.encode(phones)
        prompt_mel = self._prompt(prompt)
        _sync(prompt_mel)
        timings["frontend"] = time.perf_counter() - t0
        key = mx.random.key(seed)
        k_pros, k_ac = mx.random.split(key)
        t0 = time.perf_counter()
        dur, f0, cond, tokens, mask = self.prosody(ids, prompt_mel, alpha, k_pros, duration_scale)
        _sync(cond, tokens)
        timings["prosody"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mel = self.denormalise(self.acoustic(cond, tokens, mask, steps, k_ac, sampler, sigma_inter))[0]
        _sync(mel)
        timings["acoustic"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wav = self.vocode(mel, gl_iters)
        peak = mx.max(mx.abs(wav))
        wav = wav * mx.minimum(1.0, 0.95 / mx.maximum(peak, 1e-6))
        _sync(wav)
        timings["vocoder"] = time.perf_counter() - t0
        return SpeechResult(np.array(wav), self.mel_cfg.sample_rate, [p.symbol for p in phones], np.array(dur),
                            np.array(f0), np.array(mel), timings)


def validate_options(steps: int, alpha: float, gl_iters: int = 32, duration_scale: float = 1.0) -> None:
    """Range checks shared by the API and the CLI (the ranges ``--help`` states)."""
    if not 1 <= steps <= 64:
        raise SpeechError(f"--steps must be between 1 and 64 (1 or 2 for consistency sampling), got {steps}")
    if not 0.0 <= alpha <= 2.0:
        raise SpeechError(f"--alpha must be between 0 and 2 (0.2 is the default), got {alpha}")
    if not 0 <= gl_iters <= 500:
        raise SpeechError(f"Griffin-Lim iterations must be between 0 and 500, got {gl_iters}")
    if not 0.25 <= duration_scale <= 4.0:
        raise SpeechError(f"--speed must give a duration scale between 0.25 and 4, got {duration_scale}")


_CACHE: dict = {}


def synthesize(text: str, model: Synthesizer | str | Path | None = None, prompt=None, steps: int = 2,
               alpha: float = 0.2, seed: int = 0, **kwargs) -> SpeechResult:
    """Speak ``text``; returns samples, sample rate, phones, durations and per-stage timings.

    ``prompt``: a WAV path, ``(samples, sample_rate)``, or None for the model's default voice.
    """
    validate_options(steps, alpha, kwargs.get("gl_iters", 32), kwargs.get("duration_scale", 1.0))
    text = check_text(text)  # refuse bad text before loading anything
    vocoder = kwargs.pop("vocoder", None)
    if not isinstance(model, Synthesizer):
        key = f"{model}|{vocoder}"
        if key not in _CACHE:
            _CACHE[key] = Synthesizer(model, vocoder)
        model = _CACHE[key]
    return model(text, prompt=prompt, steps=steps, alpha=alpha, seed=seed, **kwargs)
