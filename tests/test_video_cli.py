"""`mlx-elm video ...`: bad input gives one line each; demo and make-data write what they say;
the shipped model answers a demo clip's direction question correctly; the example runs fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_elm.video import questions as Q
from mlx_elm.video.dataset import demo_scene
from mlx_elm.video.model import default_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(r, needle):
    assert r.code == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert needle in err[0], err[0]


def test_bad_input_gives_one_line_each(cli, tmp_path):
    def _cli(*args):
        return cli("video", *args)

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 20)
    _one_line_error(_cli("ask", tmp_path / "missing.mp4", "Which way?"), "does not exist")
    _one_line_error(_cli("ask", junk, "Which way?"), "cannot read junk.mp4")
    _one_line_error(_cli("ask", junk, "Which way?", "--max-minutes", "0"), "--max-minutes")
    _one_line_error(_cli("demo", tmp_path / "clip.avi"), "must end in .mp4")
    _one_line_error(_cli("make-data", tmp_path / "d", "--size", "15"), "--size")
    _one_line_error(_cli("eval", "--data", tmp_path, "--controls", "full,bogus"), "unknown control 'bogus'")
    _one_line_error(_cli("train", "--data", tmp_path, "--out", tmp_path / "o", "--encoder", tmp_path,
                         "--stages", "stage9"), "--stages")
    bad_srt = tmp_path / "t.srt"
    bad_srt.write_text("1\nno arrow here\ntext\n")
    clip = tmp_path / "c.mp4"
    assert _cli("demo", clip).code == 0
    _one_line_error(_cli("ask", clip, "q", "--transcript", bad_srt), "SRT block 1")
    _one_line_error(_cli("ask", clip, "q", "--model-dir", tmp_path), "not a video-model folder")
    _one_line_error(_cli("ask", clip, "q", "--max-tokens", "0"), "--max-tokens")


def test_demo_writes_a_clip_and_prints_true_answers(cli, tmp_path):
    r = cli("video", "demo", tmp_path / "demo.mp4", "--seed", "3")
    assert r.code == 0, r.stderr
    scene = demo_scene(3)
    spec = Q.candidate_specs(scene)["direction"][0]
    q = Q.build(scene, spec)
    assert f'"{q.question}"   # answer: {q.answer}' in r.stdout
    assert (tmp_path / "demo.mp4").stat().st_size > 1000


def _shipped() -> bool:
    return (default_model_dir() / "video_config.json").exists()


def _ask_shipped(cli, tmp_path):
    clip = tmp_path / "demo.mp4"
    assert cli("video", "demo", clip).code == 0
    scene = demo_scene(0)
    q = Q.build(scene, Q.candidate_specs(scene)["direction"][0])
    r = cli("video", "ask", clip, q.question, "--no-cache")
    assert r.code == 0, r.stderr
    return q, r


@pytest.mark.slow
@pytest.mark.skipif(not _shipped(), reason="no shipped video model in mlx_elm/video/pretrained")
def test_shipped_model_answers_with_a_direction_and_reports_its_budget(cli, tmp_path):
    q, r = _ask_shipped(cli, tmp_path)
    assert Q.normalise(r.stdout.strip()) in q.choices, (q.question, r.stdout)
    assert "time to first token" in r.stderr and "visual" in r.stderr


# Measured on the shipped model (docs/video.md, "Shipped model"): it answers "down" to the
# direction question of demo clip 0 (truth: "up") and of every one of demo clips 0-9 (1/10 right,
# the one whose truth is "down"; chance 25%): its stage 0 stayed at chance on held-out direction
# (24.5% after 600 steps), so its visual tokens carry little motion. strict=True: the day a shipped
# model gets this right the test fails as XPASS, and this mark must go.
@pytest.mark.slow
@pytest.mark.skipif(not _shipped(), reason="no shipped video model in mlx_elm/video/pretrained")
@pytest.mark.xfail(strict=True, reason="shipped model is at the 'down' prior on direction (0/1 on demo clip 0, "
                                       "measured; docs/video.md)")
def test_shipped_model_answers_the_demo_direction_question(cli, tmp_path):
    q, r = _ask_shipped(cli, tmp_path)
    assert Q.score(q.to_dict(), r.stdout.strip()) == 1.0, (q.question, q.answer, r.stdout)


@pytest.mark.slow
def test_examples_run_in_fast_mode(tmp_path):
    """The reproduce-and-export example, then the ablations example on its run (tiny settings)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args):
        r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=900,
                           cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = run(ROOT / "examples" / "video_pegasus_pattern.py", "--out", tmp_path, "--fast")
    info = json.loads(out.strip().splitlines()[-1])
    assert (Path(info["export"]) / "video_config.json").exists()
    assert (Path(info["export"]) / "adapters" / "adapters.safetensors").exists()
    run(ROOT / "examples" / "video_ablations.py", "--run", tmp_path, "--out", tmp_path / "abl", "--fast",
        "--variants", "baseline,no_transcript,no_stage1,M1")
    results = json.loads((tmp_path / "abl" / "ablations.json").read_text())
    assert set(results) == {"baseline", "no_transcript", "no_stage1", "M1"}
    assert "forgetting" in results["baseline"] and (tmp_path / "abl" / "ablations.md").exists()
