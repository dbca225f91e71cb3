"""``mlx-elm video make-data``: MP4 clips, transcripts and a JSONL of questions with exact answers.

Layout of a data folder::

    meta.json                       generator version, seed, split sizes, frame size and rate
    <split>/clips/000123.mp4        a clip (H.264), and 000123.srt when it is narrated
    <split>/scenes.jsonl            the scene each clip was rendered from (its ground truth)
    <split>/questions.jsonl         questions, answers, scoring kind, reversed twins

Splits: ``train`` / ``valid`` / ``id`` (in-distribution, 1-4 objects, 8 s, held-out colour x
direction pairs never shown), ``comp`` (5-6 objects and at least one held-out pair), ``length``
(8 s to 10 min, two target objects at controlled positions and gaps). Every clip is a pure
function of ``(generator version, seed, split, index)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from mlx_elm.atomic import atomic_file, atomic_folder
from mlx_elm.errors import VideoError
from mlx_elm.video import questions as Q
from mlx_elm.video import synthetic as S
from mlx_elm.video.io import write_mp4

SPLIT_IDS = {"train": 1, "valid": 2, "id": 3, "comp": 4, "length": 5, "demo": 6}
LENGTH_DURATIONS = (8, 30, 60, 120, 300, 600)
EVIDENCE_FRACTIONS = (0.1, 0.5, 0.9)
LENGTH_FAMILIES = ("direction", "speed", "order", "time")


@dataclass
class DataConfig:
    train: int = 3000
    valid: int = 100
    id: int = 300  # clips; questions are drawn per family up to ``per_family``
    comp: int = 200
    length_per_duration: int = 6
    durations: Tuple[int, ...] = LENGTH_DURATIONS
    per_family_eval: int = 60  # questions per family and split (id / comp)
    size: int = 64
    fps: float = 4.0
    seed: int = 0

    def validate(self) -> "DataConfig":
        if self.size % 2 or self.size < 16:
            raise VideoError(f"--size must be an even number >= 16 (got {self.size})")
        if self.fps <= 0 or self.fps > 30:
            raise VideoError(f"--fps must be in (0, 30] (got {self.fps})")
        if min(self.train, self.valid, self.id, self.comp, self.length_per_duration) < 0:
            raise VideoError("clip counts must not be negative")
        if any(d < 2 for d in self.durations):
            raise VideoError(f"--durations must be >= 2 s each (got {list(self.durations)})")
        return self


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def write_srt(path: Path, lines: Sequence[Tuple[float, str]], duration: float) -> None:
    def stamp(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    blocks = [f"{i}\n{stamp(t)} --> {stamp(min(t + 2.0, duration))}\n{text}\n" for i, (t, text) in enumerate(lines, 1)]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(blocks))


def _question_row(q: Q.Question, scene: S.Scene, clip: str, cid: int) -> dict:
    row = {"clip": clip, "clip_id": cid, "duration": scene.duration, **q.to_dict()}
    twin = Q.reversed_twin(scene, q)
    if twin is not None:
        row["twin"] = {"question": twin.question, "answer": twin.answer, "choices": twin.choices}
    return row


def _write_clip(folder: Path, cid: int, scene: S.Scene, cfg: DataConfig) -> str:
    name = f"clips/{cid:06d}.mp4"
    write_mp4(folder / name, S.render(scene, cfg.fps, cfg.size), cfg.fps)
    if scene.narration:
        write_srt(folder / f"clips/{cid:06d}.srt", scene.narration, scene.duration)
    return name


def _jsonl(path: Path, rows: Iterable[dict]) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def make_split(folder: Path, split: str, n: int, cfg: DataConfig, tick: Callable[[], None] = lambda: None) -> int:
    """Clips and questions of one ``id``-style split (train / valid / id / comp); returns #questions.

    Training clips carry every question they support (two per family); evaluation splits stop
    adding a family once it has ``per_family_eval`` questions, so families are equally weighted.
    """
    scfg = S.SPLITS["comp" if split == "comp" else "id"]
    folder.mkdir(parents=True, exist_ok=True)
    scenes, rows = [], []
    quota: Dict[str, int] = {f: 0 for f in Q.FAMILIES}
    for i in range(n):
        rng = clip_rng(cfg.seed, split, i)
        scene = S.sample_scene(rng, scfg, seed=(cfg.seed, SPLIT_IDS[split], i))
        clip = _write_clip(folder, i, scene, cfg)
        scenes.append({"clip": clip, "clip_id": i, "scene": scene.to_dict()})
        per = 2 if split in ("train", "valid") else 1
        for q in Q.sample_questions(scene, rng, per_family=per):
            if split in ("id", "comp"):
                if quota[q.family] >= cfg.per_family_eval:
                    continue
                quota[q.family] += 1
            rows.append(_question_row(q, scene, clip, i))
        tick()
    _jsonl(folder / "scenes.jsonl", scenes)
    _jsonl(folder / "questions.jsonl", rows)
    return len(rows)


def make_length_split(folder: Path, cfg: DataConfig, tick: Callable[[], None] = lambda: None) -> int:
    """Clips of every duration with the evidence at 10%, 50% or 90% of the clip and the two
    target events near (3 s apart) or far (40% of the clip apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes, rows = [], []
    cid = 0
    for duration in cfg.durations:
        for k in range(cfg.length_per_duration):
            rng = clip_rng(cfg.seed, "length", cid)
            frac = EVIDENCE_FRACTIONS[k % len(EVIDENCE_FRACTIONS)]
            gap_kind = "near" if (k // len(EVIDENCE_FRACTIONS)) % 2 == 0 else "far"
            gap = 3.0 if gap_kind == "near" or duration < 20 else 0.4 * duration
            scene = S.sample_long_scene(rng, duration, frac, gap, seed=(cfg.seed, SPLIT_IDS["length"], cid))
            clip = _write_clip(folder, cid, scene, cfg)
            scenes.append({"clip": clip, "clip_id": cid, "scene": scene.to_dict()})
            tol = max(1.0, 0.02 * duration)
            for spec in ({"family": "direction", "oid": 0}, {"family": "speed", "oid": 0},
                         {"family": "time", "oid": 0, "kind": "appear", "tolerance": tol},
                         {"family": "order", "events": [[0, "appear"], [1, "appear"]] if rng.random() < 0.5
                          else [[1, "appear"], [0, "appear"]]}):
                q = Q.build(scene, spec)
                row = _question_row(q, scene, clip, cid)
                row.update({"evidence_fraction": frac, "gap": gap_kind, "gap_seconds": gap})
                rows.append(row)
            cid += 1
            tick()
    _jsonl(folder / "scenes.jsonl", scenes)
    _jsonl(folder / "questions.jsonl", rows)
    return len(rows)


def make_dataset(out: Path, cfg: DataConfig, splits: Sequence[str] = ("train", "valid", "id", "comp", "length"),
                 progress: bool = True) -> Dict[str, int]:
    """Write the data folder atomically; returns questions per split."""
    cfg.validate()
    out = Path(out)
    counts = {"train": cfg.train, "valid": cfg.valid, "id": cfg.id, "comp": cfg.comp}
    total = sum(counts[s] for s in splits if s in counts) + (
        cfg.length_per_duration * len(cfg.durations) if "length" in splits else 0)
    bar = tqdm(total=total, desc="make-data", unit="clip", disable=not progress)
    result = {}
    with atomic_folder(out) as tmp:
        for split in splits:
            if split == "length":
                result[split] = make_length_split(tmp / split, cfg, lambda: bar.update(1))
            elif split in counts:
                result[split] = make_split(tmp / split, split, counts[split], cfg, lambda: bar.update(1))
            else:
                raise VideoError(f"unknown split {split!r}; choose from train, valid, id, comp, length")
        meta = {"generator": S.GENERATOR_VERSION, "seed": cfg.seed, "size": cfg.size, "fps": cfg.fps,
                "clips": {s: counts.get(s, cfg.length_per_duration * len(cfg.durations)) for s in splits},
                "questions": result, "durations": list(cfg.durations), "per_family_eval": cfg.per_family_eval}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    bar.close()
    return result


def read_jsonl(path: Path) -> List[dict]:
    if not Path(path).exists():
        raise VideoError(f"{path} does not exist; create the data with `mlx-elm video make-data`")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split(data_dir: Path, split: str) -> Tuple[Dict[int, S.Scene], List[dict]]:
    """Scenes by clip id and the question rows of one split."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise VideoError(f"{data_dir} has no {split!r} split; create it with `mlx-elm video make-data`")
    scenes = {r["clip_id"]: S.Scene.from_dict(r["scene"]) for r in read_jsonl(folder / "scenes.jsonl")}
    return scenes, read_jsonl(folder / "questions.jsonl")


def demo_scene(seed: int = 0, duration: float = 8.0) -> S.Scene:
    """A clear demo clip: two or three objects, at least one moving without bouncing."""
    for i in range(1000):
        rng = clip_rng(seed, "demo", i)
        scene = S.sample_scene(rng, S.SplitConfig("demo", min_objects=2, max_objects=3, duration=duration,
                                                  p_bounce=0.0, p_still=0.0), seed=(seed, SPLIT_IDS["demo"], i))
        if Q.candidate_specs(scene)["direction"]:
            return scene
    raise VideoError("could not draw a demo clip; try another --seed")


def write_demo(out: Path, seed: int = 0, duration: float = 8.0, size: int = 64, fps: float = 4.0) -> S.Scene:
    """Write :func:`demo_scene` as an MP4 (and its narration as .srt beside it); returns the scene."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise VideoError(f"the output must end in .mp4, got '{out}'")
    if not 2 <= duration <= 600 or size % 2 or not 16 <= size <= 512:
        raise VideoError("--duration must be in [2, 600] s and --size an even number in [16, 512]")
    scene = demo_scene(seed, duration)
    write_mp4(out, S.render(scene, fps, size), fps)
    if scene.narration:
        write_srt(out.with_suffix(".srt"), scene.narration, scene.duration)
    return scene
