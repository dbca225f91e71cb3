"""Audio features and Griffin-Lim in MLX; WAV files, resampling and F0 at the numpy edge.

Features follow the HiFi-GAN convention (22.05 kHz, n_fft 1024, window 1024, hop 256, 80 Slaney
mel bands 0-8 kHz, magnitude spectrogram, natural log clamped at 1e-5, reflect padding of
(n_fft - hop) / 2 on both sides and no centring), so an utterance of N samples has exactly
N // hop frames and a converted public HiFi-GAN vocoder (``convert/hifigan.py``) reads our mels.
"""

from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import SpeechError


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 22050
    n_fft: int = 1024
    hop: int = 256
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5

    @property
    def pad(self) -> int:
        return (self.n_fft - self.hop) // 2


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@lru_cache(maxsize=8)
def mel_filterbank(cfg: MelConfig = MelConfig()) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney scale with Slaney area normalisation."""
    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.n_mels + 2))
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:, None] - edges[1:-1, None])
    fb = np.maximum(0.0, np.minimum(lower, upper))
    fb *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb.astype(np.float32)


@lru_cache(maxsize=8)
def _window(n_fft: int) -> mx.array:
    """Periodic Hann window (torch.hann_window's default)."""
    return mx.array(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft), dtype=mx.float32)


def _reflect_pad(x: mx.array, pad: int) -> mx.array:
    """Reflect-pad the last axis (no edge repeat), as torch's ``F.pad(mode='reflect')``."""
    left = x[..., 1 : pad + 1][..., ::-1]
    right = x[..., -pad - 1 : -1][..., ::-1]
    return mx.concatenate([left, x, right], axis=-1)


def _frames(x: mx.array, n_fft: int, hop: int) -> mx.array:
    """(B, L) -> (B, F, n_fft) overlapping frames, F = 1 + (L - n_fft) // hop."""
    b, length = x.shape
    n = 1 + (length - n_fft) // hop
    x = mx.contiguous(x)
    return mx.as_strided(x, (b, n, n_fft), (length, hop, 1))


def stft(samples: mx.array, cfg: MelConfig = MelConfig()) -> mx.array:
    """Complex STFT (B, F, n_fft/2 + 1) of (B, N) samples; F = N // hop."""
    x = _reflect_pad(samples, cfg.pad)
    return mx.fft.rfft(_frames(x, cfg.n_fft, cfg.hop) * _window(cfg.n_fft), axis=-1)


@lru_cache(maxsize=32)
def _ola_norm(n: int, n_fft: int, hop: int) -> mx.array:
    """Inverse of the summed squared window at each output block (B-independent, cached per length)."""
    win = np.asarray(_window(n_fft))
    r = n_fft // hop
    norm = np.zeros((n + r - 1, hop), np.float32)
    for j in range(r):
        norm[j : j + n] += (win[j * hop : (j + 1) * hop] ** 2)[None, :]
    return mx.array(1.0 / np.maximum(norm, 1e-8))


def istft(spec: mx.array, cfg: MelConfig = MelConfig()) -> mx.array:
    """Least-squares inverse of :func:`stft` (windowed overlap-add), (B, F, K) -> (B, F * hop)."""
    b, n, _ = spec.shape
    r = cfg.n_fft // cfg.hop
    if r * cfg.hop != cfg.n_fft:
        raise SpeechError(f"n_fft {cfg.n_fft} must be a multiple of hop {cfg.hop} for overlap-add")
    frames = mx.fft.irfft(spec, n=cfg.n_fft, axis=-1) * _window(cfg.n_fft)  # (B, F, n_fft)
    parts = frames.reshape(b, n, r, cfg.hop)
    # frame f, part j lands on output block f + j: pad each part to its offset and sum
    out = sum(mx.pad(parts[:, :, j, :], [(0, 0), (j, r - 1 - j), (0, 0)]) for j in range(r))
    y = (out * _ola_norm(n, cfg.n_fft, cfg.hop)).reshape(b, -1)
    return y[:, cfg.pad : cfg.pad + n * cfg.hop]


def log_mel(samples: mx.array | np.ndarray, cfg: MelConfig = MelConfig()) -> mx.array:
    """Log-mel spectrogram (B, F, n_mels) of (B, N) or (N,) float samples."""
    x = mx.array(samples, dtype=mx.float32)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None]
    if x.shape[-1] < cfg.n_fft:
        raise SpeechError(f"audio of {x.shape[-1]} samples is too short for features; give at least {cfg.n_fft}")
    spec = stft(x, cfg)
    mag = mx.sqrt(mx.real(spec) ** 2 + mx.imag(spec) ** 2 + 1e-9)
    mel = mx.log(mx.maximum(mag @ mx.array(mel_filterbank(cfg)).T, cfg.log_floor))
    return mel[0] if squeeze else mel


@lru_cache(maxsize=8)
def _mel_pinv(cfg: MelConfig) -> mx.array:
    return mx.array(np.linalg.pinv(mel_filterbank(cfg)).T.astype(np.float32))  # (n_mels, K)


def griffin_lim(mel: mx.array, cfg: MelConfig = MelConfig(), iters: int = 24, momentum: float = 0.99,
                seed: int = 0) -> mx.array:
    """Waveform (B, F * hop) from log-mels (B, F, n_mels): pseudo-inverse to a linear magnitude,
    then the fast Griffin-Lim iteration (Perraudin, Balazs, Sondergaard 2013) with ``momentum``."""
    squeeze = mel.ndim == 2
    if squeeze:
        mel = mel[None]
    mag = mx.maximum(mx.exp(mel.astype(mx.float32)) @ _mel_pinv(cfg), 0.0)
    phase = mx.random.uniform(0, 2 * math.pi, mag.shape, key=mx.random.key(seed))
    re, im = mag * mx.cos(phase), mag * mx.sin(phase)
    step = _gl_step(cfg, float(momentum))
    prev_re, prev_im = re, im
    for _ in range(iters):
        re, im, prev_re, prev_im = step(mag, re, im, prev_re, prev_im)
    y = istft(re + 1j * im, cfg)
    return y[0] if squeeze else y


@lru_cache(maxsize=8)
def _gl_step(cfg: MelConfig, momentum: float):
    """One compiled fast-Griffin-Lim update on (real, imaginary) parts."""

    def step(mag, re, im, prev_re, prev_im):
        spec = stft(istft(re + 1j * im, cfg), cfg)
        new_re, new_im = mx.real(spec), mx.imag(spec)
        a_re = new_re + momentum * (new_re - prev_re)
        a_im = new_im + momentum * (new_im - prev_im)
        scale = mag * mx.rsqrt(a_re * a_re + a_im * a_im + 1e-16)
        return a_re * scale, a_im * scale, new_re, new_im

    return mx.compile(step)


# --- numpy edge: F0, WAV files, resampling ------------------------------------------------------


def f0_autocorrelation(samples: np.ndarray, cfg: MelConfig = MelConfig(), fmin: float = 60.0,
                       fmax: float = 500.0, threshold: float = 0.5) -> np.ndarray:
    """Per-frame F0 in Hz (0 = unvoiced), aligned with :func:`log_mel`'s frames.

    Normalised autocorrelation (via FFT) of each Hann-windowed frame, peak picked in the lag range
    of [fmin, fmax] and refined by parabolic interpolation; a frame is voiced when the peak exceeds
    ``threshold`` and the frame is not near-silent.
    """
    x = np.asarray(samples, np.float64)
    x = np.pad(x, (cfg.pad, cfg.pad), mode="reflect")
    n = 1 + (len(x) - cfg.n_fft) // cfg.hop
    idx = np.arange(cfg.n_fft)[None, :] + cfg.hop * np.arange(n)[:, None]
    fr = x[idx]
    fr = fr - fr.mean(axis=1, keepdims=True)
    win = np.hanning(cfg.n_fft)
    spec = mx.fft.rfft(mx.array((fr * win).astype(np.float32)), n=2 * cfg.n_fft, axis=1)  # MLX: faster FFT
    power = mx.real(spec) ** 2 + mx.imag(spec) ** 2
    ac = np.array(mx.fft.irfft(power, axis=1)[:, : cfg.n_fft]).astype(np.float64)
    wac = np.fft.irfft(np.abs(np.fft.rfft(win, n=2 * cfg.n_fft)) ** 2)[: cfg.n_fft]
    ac = ac / np.maximum(wac[None, :], 1e-9)  # unbias the window's own decay
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = int(cfg.sample_rate / fmax), int(cfg.sample_rate / fmin)
    seg = ac[:, lo:hi]
    best = seg.max(axis=1, keepdims=True)
    # the first local maximum within 90% of the best peak: avoids picking twice the period
    local = np.zeros_like(seg, dtype=bool)
    local[:, 1:-1] = (seg[:, 1:-1] >= seg[:, :-2]) & (seg[:, 1:-1] >= seg[:, 2:])
    k = np.argmax(local & (seg >= 0.9 * best), axis=1)
    k = np.where((local & (seg >= 0.9 * best)).any(axis=1), k, np.argmax(seg, axis=1))
    peak = seg[np.arange(n), k]
    lag = (k + lo).astype(np.float64)
    inner = (k > 0) & (k < seg.shape[1] - 1)
    a, b, c = (seg[np.arange(n), np.clip(k + d, 0, seg.shape[1] - 1)] for d in (-1, 0, 1))
    denom = a - 2 * b + c
    shift = np.where(inner & (np.abs(denom) > 1e-12), 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    lag = lag + np.clip(shift, -1, 1)
    energy = np.sqrt(np.mean(fr**2, axis=1))
    voiced = (peak > threshold) & (energy > 1e-3)
    return np.where(voiced, cfg.sample_rate / lag, 0.0).astype(np.float32)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """16-bit mono PCM WAV, written atomically."""
    path = Path(path)
    pcm = (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    with atomic_file(path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm.tobytes())
    return path


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """The bytes of a 16-bit mono WAV (for notebooks and servers)."""
    buf = io.BytesIO()
    pcm = (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a PCM WAV (8/16/24/32-bit; channels are averaged)."""
    path = Path(path)
    if not path.is_file():
        raise SpeechError(f"prompt file {path} does not exist; pass a WAV file of the target voice")
    try:
        with wave.open(str(path), "rb") as w:
            ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise SpeechError(f"{path} is not a readable PCM WAV file ({e}); convert it, e.g. "
                          "`ffmpeg -i in.mp3 -ac 1 -ar 22050 out.wav`") from None
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 2**23, v - 2**24, v)).astype(np.float32) / 2**23
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise SpeechError(f"{path} has {8 * width}-bit samples; use 16-bit PCM")
    if ch > 1:
        x = x[: len(x) // ch * ch].reshape(-1, ch).mean(axis=1)
    return x, rate


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by FFT (whole signal; prompts are a few seconds)."""
    if rate_in == rate_out:
        return np.asarray(samples, np.float32)
    x = np.asarray(samples, np.float64)
    n_out = int(round(len(x) * rate_out / rate_in))
    spec = np.fft.rfft(x)
    keep = min(len(spec), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    out[:keep] = spec[:keep]
    return (np.fft.irfft(out, n=n_out) * (n_out / len(x))).astype(np.float32)
