"""A tiny end-to-end run of every training stage: losses fall, checkpoints load, resume is exact."""

from __future__ import annotations

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.errors import SpeechError
from mlx_elm.speech import corpus, training
from mlx_elm.speech.pipeline import Synthesizer
from mlx_elm.train import checkpoint as ckpt

TINY = dict(d_model=32, enc_layers=1, prompt_layers=1, pred_layers=1, wn_channels=32, wn_dilations=[1, 2],
            refiner_channels=16, refiner_dilations=[1])


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    cfg = corpus.CorpusConfig(n_sentences=30, n_valid=3, n_test=3, n_train_speakers=3, n_test_speakers=1, seed=1)
    return corpus.load(corpus.build(tmp_path_factory.mktemp("corpus") / "c", cfg, progress=False, log=lambda s: None))


def _recipe(**kw):
    base = dict(recognizer_steps=30, speaker_steps=10, edm_steps=40, ct_steps=12, act_steps=4, prosody_steps=6,
                batch_size=4, model=TINY, judge_channels=16, compile=False,
                learning_rates={"edm": 3e-3, "recognizer": 3e-3},
                stage=training.StageConfig(crop_frames=48, prompt_frames=48))
    base.update(kw)
    return training.RecipeConfig(**base)


@pytest.mark.slow
def test_every_stage_trains_lowers_its_loss_and_exports_a_loadable_model(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    training.run_recipe(tiny_corpus, run, _recipe(), progress=False, log=lambda s: None)
    for stage in training.STAGES:
        assert (training.model_dir(run, stage) / "model.safetensors").exists()
        assert ckpt.latest_checkpoint(run / stage) is not None
    losses = json.loads((run / "edm" / "metrics.json").read_text())["losses"]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    rec = json.loads((run / "recognizer" / "metrics.json").read_text())["losses"]
    assert np.mean(rec[-5:]) < np.mean(rec[:5])
    act = json.loads((run / "act" / "metrics.json").read_text())["metrics"]
    assert all(m["lam_adv"] > 0 and np.isfinite(m["lam_adv"]) for m in act)
    out = training.export(run, tmp_path / "ship", tiny_corpus)
    syn = Synthesizer(out)
    r = syn("Hello there.", steps=2, gl_iters=2)
    assert len(r.samples) == int(r.durations.sum()) * 256 and np.isfinite(r.samples).all()
    assert set(r.timings) == {"frontend", "prosody", "acoustic", "vocoder"}


def test_an_interrupted_stage_resumes_exactly(tiny_corpus, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    rc = _recipe(edm_steps=10)
    training.run_stage("edm", tiny_corpus, full, rc, progress=False, log=lambda s: None)
    real_train = training.train

    def interrupted(*args, **kwargs):  # Ctrl-C after step 4: the loop saves a checkpoint and stops
        kwargs["on_step"] = lambda step, loss, m: os.kill(os.getpid(), signal.SIGINT) if step == 4 else None
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", interrupted)
    training.run_stage("edm", tiny_corpus, part, rc, progress=False, log=lambda s: None)
    assert not (part / "edm" / "metrics.json").exists()  # an interrupted stage is not marked done
    monkeypatch.setattr(training, "train", real_train)
    training.run_recipe(tiny_corpus, part, rc, stages=("edm",), progress=False, log=lambda s: None)
    a = json.loads((full / "edm" / "metrics.json").read_text())["losses"]
    b = json.loads((part / "edm" / "metrics.json").read_text())["losses"]
    assert len(b) == 6  # steps 5..10 after resuming from the checkpoint at step 4
    np.testing.assert_allclose(a[4:], b, rtol=1e-4)  # same crops, noise and optimizer state


def test_stage_order_and_names_are_checked(tiny_corpus, tmp_path):
    with pytest.raises(SpeechError, match="unknown stage"):
        training.run_stage("gan", tiny_corpus, tmp_path, _recipe())
    with pytest.raises(SpeechError, match="run it first"):
        training.run_stage("act", tiny_corpus, tmp_path, _recipe())
