"""`mlx-elm moe sizes|stats`, `mlx-elm bench moe`, and the MH-MoE study example's fast mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.model_folder import write_model_folder
from mlx_elm.models.openelm_moe import Model, preset
from mlx_elm.moe.bench import bench_moe, ratios
from mlx_elm.train.tiny import write_text_data


@pytest.fixture
def run(cli):
    def go(*args):
        res = cli(*args)
        assert res.code == 0, res.stderr
        return res.stdout

    return go


def test_sizes_prints_the_v2_rule(run):
    out = run("moe", "sizes", "--base", "paper")
    row = next(line for line in out.splitlines() if line.startswith("paper-mhmoe-h2"))
    assert row.split()[2:6] == ["2", "40", "2", "768"]
    rows = json.loads(run("moe", "sizes", "--base", "tiny", "--json"))
    assert {r["preset"] for r in rows} >= {"tiny-smoe", "tiny-mhmoe-h2", "tiny-v1-h4"}


@pytest.mark.slow
def test_stats_table_plot_and_json(spm_model_path, tmp_path, run):
    mx.random.seed(0)
    model = Model(preset("tiny-mhmoe-h2", num_transformer_layers=4, vocab_size=320))
    folder = write_model_folder(tmp_path / "m", model, model.args.to_dict(), tokenizer=str(spm_model_path))
    data = write_text_data(tmp_path / "data", n_train=8, n_valid=8, words=40)
    out = run("moe", "stats", folder, "--data", data, "--seq-len", 32, "--batch-size", 2, "--batches", 2,
               "--plot", tmp_path / "load.png", "--json", tmp_path / "s.json")
    assert (tmp_path / "load.png").stat().st_size > 1000
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [r["layer"] for r in doc["layers"]] == [1, 3]
    for share in doc["load_share"]:
        assert len(share) == 40 and abs(sum(share) - 1) < 1e-9
    assert "activation (paper basis" in out


def test_stats_refuses_a_dense_model(spm_model_path, tmp_path, cli):
    from mlx_elm.models import openelm

    model = openelm.Model(preset("tiny-dense", num_transformer_layers=2, vocab_size=320))
    folder = write_model_folder(tmp_path / "d", model, model.args.to_dict(), tokenizer=str(spm_model_path))
    (tmp_path / "t.txt").write_text("the sky is blue " * 50)
    res = cli("moe", "stats", folder, "--data", tmp_path / "t.txt")
    assert res.code == 1 and len(res.error_lines) == 1 and "no MoE layers" in res.stderr


@pytest.mark.slow
def test_bench_rows_cover_layers_dispatches_tokens_and_modes(run):
    rows = bench_moe(["dense", "smoe", "mhmoe-h2"], dims=32, experts=4, ffn=32, tokens=(1, 64), runs=1)
    keys = {(r.layer, r.dispatch, r.tokens, r.mode) for r in rows}
    assert len(rows) == len(keys) == 4 + 2 * 2 * 2 * 2
    assert all(r.ms > 0 and r.peak_memory_mb > 0 for r in rows)
    rel = ratios(rows)
    assert all(v == 1.0 for (layer, *_), v in rel.items() if layer == "smoe")
    out = run("bench", "moe", "--dim", 64, "--experts", 4, "--ffn", 64, "--tokens", 1, "--tokens", 32, "--rounds", 1,
               "--layers", "smoe,mhmoe-h2", "--modes", "forward")
    assert "best dispatch, 32 tokens, forward: vs smoe mhmoe-h2" in out


@pytest.mark.slow
def test_study_example_fast_mode(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import mhmoe_lm
    finally:
        sys.path.pop(0)
    assert mhmoe_lm.main(["--fast", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    arms = {t["arm"] for t in doc["table"]}
    assert arms == {"dense", "smoe", "mhmoe-h2", "v1-h4", "smoe-a0"}
    for t in doc["table"]:
        assert np.isfinite(t["ppl_mean"]) and t["ppl_mean"] > 1
    smoe = next(r for r in doc["runs"] if r["arm"] == "smoe")
    assert len(smoe["load_share"]) == 1 and abs(sum(smoe["load_share"][0]) - 1) < 1e-9
    assert any("mhmoe-h2 ppl <= smoe" in k for k in doc["verdicts"])
    out = capsys.readouterr().out
    assert "wrote" in out and "| mhmoe-h2 | 0 |" in out and doc["not_run"] == []
    # a study finished in pieces: another folder's runs merged into a report, nothing trained
    assert mhmoe_lm.main(["--fast", "--out", str(tmp_path / "report"), "--merge", str(tmp_path / "results.json"),
                          "--report-only"]) == 0
    merged = json.loads((tmp_path / "report" / "results.json").read_text())
    assert merged["table"] == doc["table"] and merged["not_run"] == []
    assert mhmoe_lm.main(["--fast", "--out", str(tmp_path / "empty"), "--report-only"]) == 0
    assert len(json.loads((tmp_path / "empty" / "results.json").read_text())["not_run"]) == len(doc["runs"])
