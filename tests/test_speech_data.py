"""eSpeak phone events, features, durations and the corpus builder, against independent references."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_elm.errors import SpeechError
from mlx_elm.speech import audio, corpus, espeak
from mlx_elm.speech.text import check_text, sentences


def test_espeak_phone_events_cover_the_utterance_in_order():
    u = espeak.synthesize("Hello world, twelve dogs.", espeak.VoiceSettings("en-us+m3", 160, 40, 50))
    assert u.sample_rate == 22050 and len(u.samples) > 22050 // 2
    starts = [p.start for p in u.phones]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(u.samples)
    symbols = [p.symbol for p in u.phones]
    assert symbols[0] == espeak.PAUSE and "h" in symbols and "w" in symbols
    assert any(p.stress == 1 for p in u.phones) and sum(p.word_start for p in u.phones) == 4
    same = espeak.phonemize("Hello world, twelve dogs.")  # inference phonemes = the corpus's symbols
    assert [p.symbol for p in same] == symbols


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.integers(0, 300))
def test_frame_durations_sum_to_the_frame_count_and_are_positive(onsets, extra):
    starts = sorted(onsets)
    starts[0] = 0
    n_frames = max(len(starts), (max(starts) + 1) // 256 + 1) + extra // 10
    d = corpus.frame_durations(starts, n_frames, 256)
    assert d.sum() == n_frames and d.min() >= 1 and len(d) == len(starts)


def test_log_mel_matches_a_torch_stft_reference_and_has_the_documented_shape():
    cfg = audio.MelConfig()
    x = np.random.default_rng(0).normal(size=256 * 50).astype(np.float32) * 0.1
    mel = np.array(audio.log_mel(x, cfg))
    assert mel.shape == (len(x) // cfg.hop, cfg.n_mels)
    xt = torch.nn.functional.pad(torch.tensor(x)[None, None], (cfg.pad, cfg.pad), mode="reflect")[0]
    spec = torch.stft(xt, cfg.n_fft, hop_length=cfg.hop, win_length=cfg.n_fft, window=torch.hann_window(cfg.n_fft),
                      center=False, return_complex=True)
    mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)[0].T.numpy()
    ref = np.log(np.maximum(mag @ audio.mel_filterbank(cfg).T, 1e-5))
    np.testing.assert_allclose(mel, ref, atol=2e-4)


def test_slaney_mel_filterbank_properties():
    cfg = audio.MelConfig()
    fb = audio.mel_filterbank(cfg)
    assert fb.shape == (80, 513) and fb.min() >= 0
    assert audio._hz_to_mel(np.array([1000.0]))[0] == pytest.approx(15.0)
    f = np.array([50.0, 999.0, 1000.0, 3000.0, 7999.0])
    np.testing.assert_allclose(audio._mel_to_hz(audio._hz_to_mel(f)), f, rtol=1e-9)
    freqs = np.linspace(0, cfg.sample_rate / 2, 513)
    edges = audio._mel_to_hz(np.linspace(0, audio._hz_to_mel(np.array([8000.0]))[0], 82))
    df = freqs[1] - freqs[0]
    # Slaney normalisation: each triangle has area ~ 1 in Hz (height 2 / (f_hi - f_lo)), sampled on the FFT grid
    areas = fb[20:].sum(axis=1) * df
    np.testing.assert_allclose(areas, 1.0, rtol=0.08)  # grid sampling of narrow triangles
    assert np.all(np.abs(freqs[np.argmax(fb[20:], axis=1)] - edges[21:-1]) <= df)


def test_istft_inverts_stft_and_griffin_lim_reduces_spectral_error():
    x = mx.array(np.random.default_rng(1).normal(size=(1, 256 * 40)).astype(np.float32))
    y = audio.istft(audio.stft(x))
    np.testing.assert_allclose(np.array(y), np.array(x), atol=1e-4)
    u = espeak.synthesize("A short test.")
    s = u.samples[: len(u.samples) // 256 * 256]
    mel = audio.log_mel(s)
    err = [float(mx.mean(mx.abs(audio.log_mel(audio.griffin_lim(mel, iters=k)) - mel))) for k in (0, 16)]
    assert err[1] < 0.7 * err[0]


def test_f0_of_a_pure_tone():
    t = np.arange(22050) / 22050
    f0 = audio.f0_autocorrelation(0.5 * np.sin(2 * np.pi * 150.0 * t))
    assert np.median(f0[5:-5]) == pytest.approx(150.0, rel=0.01)
    assert np.all(audio.f0_autocorrelation(np.zeros(22050, np.float32)) == 0)


def test_wav_round_trip_and_resampling(tmp_path):
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050).astype(np.float32)
    audio.write_wav(tmp_path / "a.wav", x, 22050)
    y, rate = audio.read_wav(tmp_path / "a.wav")
    assert rate == 22050 and np.abs(y - x).max() < 1e-4
    z = audio.resample(x, 22050, 16000)
    assert len(z) == 16000 and np.abs(np.abs(np.fft.rfft(z)).argmax() - 440) <= 1


def test_text_checks_name_the_problem_in_one_line():
    assert check_text("  Hello,   world! ") == "Hello, world!"
    for bad, needle in (("", "empty"), ("   ", "empty"), ("caf\u00e9 \u4e2d", "unsupported character"),
                        ("...", "no letters")):
        with pytest.raises(SpeechError, match=needle) as e:
            check_text(bad)
        assert "\n" not in str(e.value)


def test_sentences_are_distinct_and_reproducible():
    a, b = sentences(50, seed=3), sentences(50, seed=3)
    assert a == b and len(set(a)) == 50 and all(s[-1] in ".?!" for s in a)


def test_corpus_builder_durations_shapes_splits_and_reuse(tmp_path):
    cfg = corpus.CorpusConfig(n_sentences=24, n_valid=3, n_test=3, n_train_speakers=3, n_test_speakers=2, seed=5)
    out = corpus.build(tmp_path / "c", cfg, progress=False, log=lambda s: None)
    c = corpus.load(out)
    assert set(c.splits) == {"train", "valid", "test"}
    for utts in c.splits.values():
        for u in utts:
            assert u.mel.shape == (u.frames, 80) and u.f0.shape == (u.frames,)
            assert int(u.durations.sum()) == u.frames and u.durations.min() >= 1
            assert u.phones.shape == (len(u.durations), 3)
    meta = json.loads((out / corpus.META).read_text())
    held = {s["name"] for s in meta["speakers"] if s["held_out"]}
    by_split = {}
    for r in meta["utterances"]:
        by_split.setdefault(r["split"], set()).add(r["sentence"])
        if r["speaker"] in held:
            assert r["split"] == "test"  # held-out voices never reach training
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["valid"])
    train_mel = np.concatenate([u.mel for u in c.splits["train"]])
    np.testing.assert_allclose(train_mel.std(axis=0), corpus.SIGMA_DATA, rtol=1e-2)
    stamp = (out / corpus.META).stat().st_mtime_ns
    logs = []
    corpus.build(out, cfg, progress=False, log=logs.append)
    assert (out / corpus.META).stat().st_mtime_ns == stamp and "reusing" in logs[0]
