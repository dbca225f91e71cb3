"""Stage 0: pretraining the segment encoder and resampler on segment facts, without the decoder.

Our stand-in for the pretrained video encoder of the Pegasus pattern (Pegasus-1 builds on its
Marengo embedding model). For every segment the ``M`` resampled tokens must tell, per colour:
whether an object of that colour is visible, its shape and size, its direction and speed, which
events happen inside the segment (appear, disappear, colour from / to, grow, shrink, bounce) and
when the first one happens; plus how many objects are visible at the segment's end. A linear-MLP
probe reads these from the concatenated ``M`` tokens, so the information must be in them (with
``M = 1`` one vector has to hold it all). This costs no decoder passes, so it runs on thousands of
clips in minutes; stage 1 then only has to map the tokens into the decoder's space.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.video import synthetic as S
from mlx_elm.video.aligner import Aligner

COLOURS = list(S.COLOURS)
DIRS = ["left", "right", "up", "down", "still"]
EVENT_FLAGS = ["appear", "disappear", "colour_from", "colour_to", "grow", "shrink", "bounce"]
MAX_COUNT = 6
# per colour: present, shape(3), size, direction(5), fast, events(7), event time
PER_COLOUR = 1 + len(S.SHAPES) + 1 + len(DIRS) + 1 + len(EVENT_FLAGS) + 1
N_OUT = len(COLOURS) * PER_COLOUR + MAX_COUNT + 1


def segment_facts(scene: S.Scene, start: float, end: float) -> np.ndarray:
    """Targets of one segment: ``[colours, 6]`` (present, shape, size, direction, fast, event time)
    plus event flags ``[colours, 7]`` and the visible count, packed in one float vector."""
    facts = np.zeros((len(COLOURS), 6), dtype=np.float32)
    facts[:, 5] = -1.0  # no event time
    flags = np.zeros((len(COLOURS), len(EVENT_FLAGS)), dtype=np.float32)
    span = max(end - start, 1e-6)
    for o in scene.objects:
        t0, t1 = max(start, o.t_in), min(end, o.t_out, scene.duration)
        if t0 >= t1:
            continue
        for t in (t0 + 1e-3, t1 - 1e-3):  # the colours it shows in the segment
            s = S.object_state(o, t)
            c = COLOURS.index(s.colour)
            if facts[c, 0] == 0:
                facts[c, :5] = (1.0, S.SHAPES.index(o.shape), float(s.size == "large"), DIRS.index(s.direction),
                                float(o.speed == "fast" and s.direction != "still"))
    for e in S.scene_events(scene):
        if not start <= e.time < end:
            continue
        o = scene.objects[e.oid]
        before = S.object_state(o, max(e.time - 1e-3, 0.0)).colour
        after = S.object_state(o, e.time + 1e-3).colour
        if e.kind == "colour":
            marks = [(before, "colour_from"), (after, "colour_to")]
        elif e.kind == "size":
            marks = [(after, "grow" if e.detail[1] == "large" else "shrink")]
        else:
            marks = [(before if e.kind == "disappear" else after, e.kind)]
        for colour, flag in marks:
            c = COLOURS.index(colour)
            flags[c, EVENT_FLAGS.index(flag)] = 1.0
            if facts[c, 5] < 0:
                facts[c, 5] = (e.time - start) / span
    count = sum(S.object_state(o, end - 1e-3).visible for o in scene.objects)
    return np.concatenate([facts.ravel(), flags.ravel(), [min(count, MAX_COUNT)]]).astype(np.float32)


FACT_SIZE = len(COLOURS) * 6 + len(COLOURS) * len(EVENT_FLAGS) + 1


class SegmentProbe(nn.Module):
    """Reads segment facts from the concatenated ``M`` resampled tokens."""

    def __init__(self, dim: int, queries: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(dim * queries, hidden)
        self.fc2 = nn.Linear(hidden, N_OUT)

    def __call__(self, tokens: mx.array) -> mx.array:
        B, S_, M, D = tokens.shape
        return self.fc2(nn.gelu_approx(self.fc1(tokens.reshape(B, S_, M * D))))


class Stage0Model(nn.Module):
    def __init__(self, aligner: Aligner):
        super().__init__()
        self.aligner = aligner
        self.probe = SegmentProbe(aligner.cfg.dim, aligner.cfg.queries)

    def __call__(self, feats: mx.array, times: mx.array) -> mx.array:
        return self.probe(self.aligner.summarise(feats, times))


def _split_targets(y: mx.array):
    C = len(COLOURS)
    facts = y[..., : C * 6].reshape(*y.shape[:-1], C, 6)
    flags = y[..., C * 6 : C * 6 + C * len(EVENT_FLAGS)].reshape(*y.shape[:-1], C, len(EVENT_FLAGS))
    return facts, flags, y[..., -1]


def probe_loss(model: Stage0Model, feats, times, targets, seg_mask):
    """Summed fact losses over real segments, and the number of segments."""
    out = model(feats, times)
    C, nS, nD = len(COLOURS), len(S.SHAPES), len(DIRS)
    per = out[..., : C * PER_COLOUR].reshape(*out.shape[:-1], C, PER_COLOUR)
    count_logits = out[..., C * PER_COLOUR :]
    facts, flags, count = _split_targets(targets)
    present = facts[..., 0]
    i = 0
    l_present = nn.losses.binary_cross_entropy(per[..., 0], present, with_logits=True, reduction="none")
    i = 1
    l_shape = nn.losses.cross_entropy(per[..., i : i + nS], facts[..., 1].astype(mx.int32), reduction="none")
    i += nS
    l_size = nn.losses.binary_cross_entropy(per[..., i], facts[..., 2], with_logits=True, reduction="none")
    i += 1
    l_dir = nn.losses.cross_entropy(per[..., i : i + nD], facts[..., 3].astype(mx.int32), reduction="none")
    i += nD
    l_fast = nn.losses.binary_cross_entropy(per[..., i], facts[..., 4], with_logits=True, reduction="none")
    moving = (facts[..., 3] < 4).astype(mx.float32)
    i += 1
    l_flags = nn.losses.binary_cross_entropy(per[..., i : i + len(EVENT_FLAGS)], flags, with_logits=True,
                                             reduction="none").sum(-1)
    i += len(EVENT_FLAGS)
    has_t = (facts[..., 5] >= 0).astype(mx.float32)
    l_time = 10.0 * (mx.sigmoid(per[..., i]) - mx.maximum(facts[..., 5], 0.0)) ** 2
    per_colour = l_present + present * (l_shape + l_size + l_dir + moving * l_fast) + l_flags + has_t * l_time
    l_count = nn.losses.cross_entropy(count_logits, count.astype(mx.int32), reduction="none")
    per_segment = per_colour.sum(-1) + l_count
    total = (per_segment * seg_mask).sum()
    n = seg_mask.sum()
    dir_ok = ((mx.argmax(per[..., 1 + nS + 1 : 1 + nS + 1 + nD], axis=-1) == facts[..., 3].astype(mx.int32))
              * present * seg_mask[..., None]).sum() / mx.maximum((present * seg_mask[..., None]).sum(), 1.0)
    return total, n, {"direction_acc": dir_ok}


def probe_accuracy(model: Stage0Model, batches) -> Dict[str, float]:
    """Held-out accuracy of the probe's readings: direction (of visible objects), speed (moving
    ones), presence, event flags (exact per colour and flag) and the end-of-segment count."""
    sums: Dict[str, float] = {}
    counts: Dict[str, float] = {}
    C, nS, nD = len(COLOURS), len(S.SHAPES), len(DIRS)
    for feats, times, targets, seg_mask in batches:
        out = np.asarray(model(mx.array(feats), mx.array(times)))
        per = out[..., : C * PER_COLOUR].reshape(*out.shape[:-1], C, PER_COLOUR)
        facts = targets[..., : C * 6].reshape(*targets.shape[:-1], C, 6)
        flags = targets[..., C * 6 : C * 6 + C * len(EVENT_FLAGS)].reshape(*targets.shape[:-1], C, len(EVENT_FLAGS))
        seg = seg_mask[..., None] > 0
        present = (facts[..., 0] > 0.5) & seg
        moving = present & (facts[..., 3] < 4)
        i_dir = 1 + nS + 1
        checks = {
            "presence": ((per[..., 0] > 0) == (facts[..., 0] > 0.5), seg),
            "direction": (per[..., i_dir : i_dir + nD].argmax(-1) == facts[..., 3], present),
            "speed": ((per[..., i_dir + nD] > 0) == (facts[..., 4] > 0.5), moving),
            "events": (((per[..., i_dir + nD + 1 : i_dir + nD + 1 + len(EVENT_FLAGS)] > 0) == (flags > 0.5)).all(-1), seg),
            "count": (out[..., C * PER_COLOUR :].argmax(-1) == targets[..., -1], seg_mask > 0),
        }
        for k, (ok, where) in checks.items():
            where = np.broadcast_to(where, ok.shape)
            sums[k] = sums.get(k, 0.0) + float((ok & where).sum())
            counts[k] = counts.get(k, 0.0) + float(where.sum())
    return {k: sums[k] / max(counts[k], 1.0) for k in sums}
