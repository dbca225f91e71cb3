"""The moving-shapes generator, video I/O, transcripts and scoring.

Answers are checked against the *pixels* of the MP4s the generator wrote (colour masks found by
distance to the palette, centroids tracked over frames), never against the generator's own state.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_elm.errors import VideoError
from mlx_elm.video import dataset as D
from mlx_elm.video import questions as Q
from mlx_elm.video import synthetic as S
from mlx_elm.video import transcript as TR
from mlx_elm.video.io import probe, read_frames, write_mp4

SMALL = D.DataConfig(train=6, valid=2, id=24, comp=6, length_per_duration=3, durations=(8, 40), per_family_eval=50)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "data"
    D.make_dataset(out, SMALL, progress=False)
    return out


def _mask(frame: np.ndarray, colour: str, tol: float = 60.0) -> np.ndarray:
    rgb = np.asarray(S.COLOURS[colour], dtype=np.float32)
    return np.linalg.norm(frame.astype(np.float32) - rgb, axis=-1) < tol


def _centroid(frame, colour, min_pixels=6):
    m = _mask(frame, colour)
    if m.sum() < min_pixels:
        return None
    ys, xs = np.nonzero(m)
    return xs.mean(), ys.mean()


def _visible_colours(frame, min_pixels=6):
    return {c for c in S.COLOURS if _mask(frame, c).sum() >= min_pixels}


def test_generator_is_deterministic_per_seed(tmp_path):
    a = D.make_dataset(tmp_path / "a", D.DataConfig(train=3, valid=0, id=3, comp=2, length_per_duration=1,
                                                    durations=(8,), per_family_eval=5), progress=False)
    b = D.make_dataset(tmp_path / "b", D.DataConfig(train=3, valid=0, id=3, comp=2, length_per_duration=1,
                                                    durations=(8,), per_family_eval=5), progress=False)
    assert a == b
    for split in ("train", "id", "comp", "length"):
        for name in ("scenes.jsonl", "questions.jsonl"):
            assert (tmp_path / "a" / split / name).read_text() == (tmp_path / "b" / split / name).read_text()
    other = S.sample_scene(D.clip_rng(1, "id", 0), S.SPLITS["id"])
    same = S.sample_scene(D.clip_rng(0, "id", 0), S.SPLITS["id"])
    assert same.to_dict() == S.sample_scene(D.clip_rng(0, "id", 0), S.SPLITS["id"]).to_dict()
    assert other.to_dict() != same.to_dict()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["generator"] == S.GENERATOR_VERSION


def test_mp4_reads_back_the_frames_it_was_written_from(tmp_path):
    scene = S.sample_scene(np.random.default_rng(3), S.SPLITS["id"])
    frames = S.render(scene, fps=4.0, size=64)
    path = write_mp4(tmp_path / "clip.mp4", frames, fps=4.0)
    info = probe(path)
    assert (info.width, info.height) == (64, 64) and info.duration == pytest.approx(scene.duration, abs=0.01)
    back = read_frames(path, fps=4.0, size=64)
    assert len(back) == len(frames) and back.duration == pytest.approx(scene.duration)
    err = np.abs(back.pixels.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 2.0  # H.264 at crf 8: a few grey levels, larger only at colour edges (4:2:0)
    assert np.percentile(err, 99) < 60
    half = read_frames(path, fps=2.0, size=32)
    assert half.pixels.shape == (16, 32, 32, 3)
    np.testing.assert_allclose(half.times, np.arange(16) / 2.0 + 0.25)


def test_direction_answers_match_the_pixels(data):
    scenes, rows = D.read_split(data, "id")
    checked = 0
    for r in (r for r in rows if r["family"] == "direction"):
        colour = r["question"].split("the ")[1].split()[0]
        f = read_frames(data / "id" / r["clip"], fps=4.0, size=64)
        pts = [(t, _centroid(px, colour)) for t, px in zip(f.times, f.pixels)]
        pts = [(t, c) for t, c in pts if c is not None]
        (x0, y0), (x1, y1) = pts[0][1], pts[-1][1]
        dx, dy = x1 - x0, y1 - y0
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == r["answer"], r
        checked += 1
    assert checked >= 5


@pytest.mark.slow
def test_counts_and_colour_changes_match_the_pixels(data):
    scenes, rows = D.read_split(data, "id")
    checked = 0
    for r in rows:
        f = read_frames(data / "id" / r["clip"], fps=4.0, size=64)
        if r["question"] == "How many objects are visible at the end?":
            scene = scenes[r["clip_id"]]
            if _overlapping(scene, scene.duration - 0.01):
                continue
            assert len(_visible_colours(f.pixels[-1])) == int(r["answer"]), r
            checked += 1
        elif r["question"].startswith("What colour does the"):
            colour = r["question"].split("the ")[1].split()[0]
            first = next(i for i, px in enumerate(f.pixels) if _centroid(px, colour) is not None)
            later = [i for i, px in enumerate(f.pixels) if _centroid(px, r["answer"]) is not None]
            assert later and later[0] > first, r  # the new colour shows up after the old one
            checked += 1
    assert checked >= 4


def _overlapping(scene, t):
    states = [S.object_state(o, t) for o in scene.objects]
    vis = [s for s in states if s.visible]
    for i, a in enumerate(vis):
        for b in vis[i + 1:]:
            if np.hypot(a.x - b.x, a.y - b.y) < 0.3:
                return True
    return False


def test_reversed_twins_flip_direction_and_order(data):
    for split in ("id", "comp"):
        _, rows = D.read_split(data, split)
        for r in rows:
            if r["family"] in Q.REVERSIBLE:
                assert "twin" in r
                assert Q.flipped(r, r["twin"], r["answer"]) == Q.normalise(r["twin"]["answer"])
    # reversing twice gives the original clip back, frame for frame
    scene = S.sample_scene(np.random.default_rng(11), S.SPLITS["id"])
    back = S.reverse_scene(S.reverse_scene(scene))
    for t in (0.3, 2.1, 5.5, 7.9):
        np.testing.assert_array_equal(S.render_frame(scene, t), S.render_frame(back, t))
    rev = S.reverse_scene(scene)
    np.testing.assert_array_equal(S.render_frame(rev, 2.0), S.render_frame(scene, scene.duration - 2.0))


def test_held_out_pairs_stay_out_of_training_and_fill_comp(data):
    train, _ = D.read_split(data, "train")
    comp, _ = D.read_split(data, "comp")
    assert not any(S.shows_held_out_pair(s) for s in train.values())
    assert all(S.shows_held_out_pair(s) for s in comp.values())
    assert all(len(s.objects) >= 5 for s in comp.values())


def test_length_split_places_the_evidence(data):
    scenes, rows = D.read_split(data, "length")
    for r in rows:
        s = scenes[r["clip_id"]]
        if r["family"] == "time":
            placed = np.clip(r["evidence_fraction"] * s.duration, 0.5, s.duration - 1.5)
            assert abs(float(r["answer"]) - placed) <= 0.5
            assert r["tolerance"] == max(1.0, 0.02 * s.duration)
    assert {r["duration"] for r in rows} == {8.0, 40.0}


def test_scoring():
    assert Q.score({"kind": "choice", "answer": "left"}, " Left.") == 1.0
    assert Q.score({"kind": "choice", "answer": "red circle"}, "the red circle") == 1.0
    assert Q.score({"kind": "choice", "answer": "left"}, "right") == 0.0
    assert Q.score({"kind": "number", "answer": "5", "tolerance": 1.0}, "at 6 seconds") == 1.0
    assert Q.score({"kind": "number", "answer": "5", "tolerance": 1.0}, "7") == 0.0
    assert Q.score({"kind": "number", "answer": "3"}, "three") == 1.0
    ref = "the red circle appears; the blue square turns green"
    assert Q.score({"kind": "events", "answer": ref}, ref) == 1.0
    assert Q.score({"kind": "events", "answer": ref}, "the red circle appears") == pytest.approx(2 / 3)
    assert Q.score({"kind": "events", "answer": Q.NOTHING}, "Nothing happens.") == 1.0


def test_transcripts_parse_and_land_in_their_segments(tmp_path):
    srt = tmp_path / "a.srt"
    srt.write_text("1\n00:00:01,500 --> 00:00:03,000\nthe red circle\nturns blue\n\n2\n00:00:05,000 --> 00:00:06,000\nhi\n")
    lines = TR.read_transcript(srt)
    assert [(l.start, l.text) for l in lines] == [(1.5, "the red circle turns blue"), (5.0, "hi")]
    plain = tmp_path / "b.txt"
    plain.write_text("# comment\n[00:03] one\n0:12.5 two\n75 three\n")
    assert [(l.start, l.text) for l in TR.read_transcript(plain)] == [(3.0, "one"), (12.5, "two"), (75.0, "three")]
    assert TR.assign(lines, [(0.0, 4.0), (4.0, 8.0)]) == [["the red circle turns blue"], ["hi"]]
    bad = tmp_path / "c.txt"
    bad.write_text("[00:03] fine\nno time here\n")
    with pytest.raises(VideoError, match="line 2"):
        TR.read_transcript(bad)


def test_bad_videos_give_one_line_errors(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    long = write_mp4(tmp_path / "long.mp4", np.zeros((40, 16, 16, 3), np.uint8), fps=1.0)
    cases = [(junk, {}), (empty, {}), (tmp_path / "missing.mp4", {}), (long, {"max_seconds": 30.0}), (tmp_path, {})]
    for path, kw in cases:
        with pytest.raises(VideoError) as e:
            read_frames(path, **kw)
        assert "\n" not in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(VideoError, match="budget"):
        read_frames(long, max_seconds=30.0)
