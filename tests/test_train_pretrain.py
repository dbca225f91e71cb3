"""`mlx-elm train`: a scaled-down OpenELM preset pre-trained from scratch, with exact resume."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx

from mlx_elm.train.tiny import write_text_data

CONFIG = {"preset": "OpenELM-270M",
          "overrides": {"num_transformer_layers": 2, "model_dim": 64, "head_dim": 16, "vocab_size": 512,
                        "ffn_dim_divisor": 16, "max_context_length": 128}}


def test_pretrain_from_scratch_learns_and_resumes_exactly(cli, spm_model_path, tmp_path):
    def _train(*args):
        res = cli("train", *args)
        assert res.code == 0, res.stderr
        return res.stdout + res.stderr

    from mlx_elm.loading import load_with_info

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG))
    data = write_text_data(tmp_path / "data", n_train=48, n_valid=8, words=24)
    common = ["--config", cfg, "--data", data, "--tokenizer", spm_model_path, "--iters", 8, "--batch-size", 4,
              "--max-seq-length", 32, "--learning-rate", 3e-3, "--save-every", 4, "--steps-per-eval", 4,
              "--warmup", 2]
    out = _train(*common, "--out", tmp_path / "a")
    assert "val loss" in out and "tok/s" in out
    vals = [float(l.split("val loss ")[1].split(",")[0]) for l in out.splitlines() if "val loss" in l]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.5  # from ~ln(512) towards the pattern
    model, tok, info = load_with_info(str(tmp_path / "a"))
    assert info.model_type == "openelm" and info.config["num_transformer_layers"] == 2
    logits = model(mx.array([tok.encode("the sky is blue")]))
    assert logits.shape[-1] == 512

    # simulate a crash after step 4: keep only that checkpoint, resume, and compare bitwise
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000008")
    (tmp_path / "b" / "model.safetensors").unlink()
    _train(*common, "--out", tmp_path / "b", "--resume")
    a, b = mx.load(str(tmp_path / "a" / "model.safetensors")), mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
