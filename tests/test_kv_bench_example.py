"""The KV benchmark library and the passkey example's fast mode (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path


from mlx_elm.kv import bench
from test_kv_reference import tiny_openelm


def test_bench_rows_and_bytes_ratio_is_capacity_over_length():
    model = tiny_openelm()
    rows = bench.run(model, [128, 256], capacity=64, window=16, tokens=1, chunk=100, rounds=1)
    assert [(r.prompt, r.policy) for r in rows] == [
        (128, "full"), (128, "snapkv C=64"), (256, "full"), (256, "snapkv C=64")]
    for full, snap in zip(rows[::2], rows[1::2]):
        assert snap.kv_bytes * full.prompt == full.kv_bytes * 64  # GQA-sized rows, C / L of full
        assert full.decode_tps > 0 and snap.decode_tps > 0
    text = bench.table(rows)
    assert "| 256 |" in text and "0.250" in text


def test_passkey_example_fast_mode(embedded, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import kv_passkey_eval
    finally:
        sys.path.pop(0)
    rows = kv_passkey_eval.main(["--fast"])
    by = {(r.method, r.budget): r for r in rows}
    assert len(rows) == 7 and by[("full", 0)].exact and by[("full", 0)].kl == 0
    # with half the prompt kept, SnapKV still recalls the key and stays close to the full cache
    assert by[("snapkv", 128)].exact and by[("snapkv", 128)].kl < 0.05
    assert by[("snapkv", 64)].kl < by[("streaming", 64)].kl
    assert "| snapkv | 128 |" in capsys.readouterr().out
