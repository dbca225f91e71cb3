"""`bench lora` gives both tools data they can batch, and a failing peer is one line."""

from __future__ import annotations

import sys

import pytest

from mlx_elm.errors import MlxElmError
from mlx_elm.train import bench


@pytest.mark.parametrize("batch_size", [2, 8, 40])
def test_both_splits_hold_a_batch(monkeypatch, tmp_path, batch_size):
    seen = {}

    def fake(tool):
        def run(model, data, iters, bs, rank, max_seq, work):
            seen[tool] = {split: sum(1 for _ in open(data / f"{split}.jsonl")) for split in ("train", "valid")}
            return bench.BenchRun(tool, 1.0, 0.1, 1.0)
        return run

    monkeypatch.setattr(bench, "make_bench_model", lambda kind, out: out)
    monkeypatch.setattr(bench, "run_ours", fake("mlx-elm lora"))
    monkeypatch.setattr(bench, "run_mlx_lm", fake("mlx_lm.lora"))
    bench.compare("smollm2", tmp_path, batch_size=batch_size)
    for counts in seen.values():  # mlx-lm refuses a split with fewer examples than the batch size
        assert counts["train"] >= batch_size and counts["valid"] >= batch_size


def test_a_failing_peer_is_one_line(tmp_path):
    with pytest.raises(MlxElmError) as e:
        bench._run([sys.executable, "-c", "import sys; print('ValueError: boom', file=sys.stderr); sys.exit(3)"])
    assert "\n" not in str(e.value) and "exited with 3" in str(e.value) and "boom" in str(e.value)
