"""Questions with exact answers about a :class:`~mlx_elm.video.synthetic.Scene`, and their scoring.

Families mirror TempCompass plus counting and grounding: motion direction, speed, relative speed,
event order, attribute before/after, counting, time of an event (numeric tolerance) and a
structured event-list summary (scored by F1). Answers are closed-vocabulary words, object names,
numbers or event lists, so scoring is exact match and needs no LLM judge.

A question is built from a *spec* (family plus the object ids and event kinds it is about), so the
same spec applied to the reversed scene gives the question a viewer of the reversed clip must
answer: direction and order answers flip there, which is what the reversal control checks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mlx_elm.video.synthetic import (
    COLOURS,
    Event,
    Scene,
    bounce_times,
    event_phrase,
    object_name,
    object_state,
    reverse_scene,
    scene_events,
)

FAMILIES = ("direction", "speed", "relative_speed", "order", "attribute", "count", "time", "summary")
REVERSIBLE = ("direction", "order")  # families whose answers flip when the clip is played backwards
REVERSE_KIND = {"appear": "disappear", "disappear": "appear", "colour": "colour", "size": "size", "bounce": "bounce"}
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10}
MIN_ORDER_GAP = 1.5  # seconds between the two events of an order question
NOTHING = "nothing happens"


@dataclass
class Question:
    family: str
    question: str
    answer: str
    kind: str = "choice"  # "choice" | "number" | "events"
    tolerance: float = 0.0  # seconds, for "number"
    choices: Optional[List[str]] = None  # the closed answer set (None: open numbers / event lists)
    spec: dict = field(default_factory=dict)
    evidence_time: Optional[float] = None  # when the answer can be seen (for length analyses)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# --- building questions from specs -------------------------------------------------------------


def _name(scene: Scene, oid: int) -> str:
    return object_name(scene.objects[oid])


def _find_event(scene: Scene, oid: int, kind: str) -> Optional[Event]:
    hits = [e for e in scene_events(scene) if e.oid == oid and e.kind == kind]
    return hits[0] if len(hits) == 1 else None


def build(scene: Scene, spec: dict) -> Question:
    """The question (and exact answer) that ``spec`` asks about ``scene``."""
    fam = spec["family"]
    if fam == "direction":
        o = scene.objects[spec["oid"]]
        s = object_state(o, o.t_in + 1e-3)
        return Question(fam, f"Which way does the {object_name(o)} move?", s.direction,
                        choices=["left", "right", "up", "down"], spec=spec, evidence_time=o.t_in)
    if fam == "speed":
        o = scene.objects[spec["oid"]]
        return Question(fam, f"Does the {object_name(o)} move slowly or fast?",
                        "slowly" if o.speed == "slow" else "fast", choices=["slowly", "fast"], spec=spec,
                        evidence_time=o.t_in)
    if fam == "relative_speed":
        a, b = (scene.objects[i] for i in spec["oids"])
        faster = a if a.speed == "fast" else b
        return Question(fam, f"Which moves faster, the {object_name(a)} or the {object_name(b)}?",
                        object_name(faster), choices=[object_name(a), object_name(b)], spec=spec,
                        evidence_time=max(a.t_in, b.t_in))
    if fam == "order":
        (oa, ka), (ob, kb) = spec["events"]
        ea, eb = _find_event(scene, oa, ka), _find_event(scene, ob, kb)
        first = ea if ea.time < eb.time else eb
        return Question(fam, f"Which happens first: {event_phrase(ea, scene)}, or {event_phrase(eb, scene)}?",
                        _name(scene, first.oid), choices=[_name(scene, oa), _name(scene, ob)], spec=spec,
                        evidence_time=max(ea.time, eb.time))
    if fam == "attribute":
        o = scene.objects[spec["oid"]]
        if spec["what"] == "colour_after":
            t, new = o.colour_change
            return Question(fam, f"What colour does the {object_name(o)} turn?", new, choices=_colours(),
                            spec=spec, evidence_time=t)
        if spec["what"] == "colour_before":
            t, new = o.colour_change
            return Question(fam, f"The {o.shape} that turns {new}: what colour is it before?", o.colour,
                            choices=_colours(), spec=spec, evidence_time=t)
        t, new = o.size_change
        when = "at the end" if spec["what"] == "size_after" else "at the start"
        answer = new if spec["what"] == "size_after" else o.size
        return Question(fam, f"Is the {object_name(o)} small or large {when}?", answer,
                        choices=["small", "large"], spec=spec, evidence_time=t)
    if fam == "count":
        if spec["what"] == "total":
            return Question(fam, "How many objects appear in the video?", str(len(scene.objects)),
                            kind="number", spec=spec, evidence_time=scene.duration)
        t = scene.duration - 1e-3
        n = sum(object_state(o, t).visible for o in scene.objects)
        return Question(fam, "How many objects are visible at the end?", str(n), kind="number", spec=spec,
                        evidence_time=scene.duration)
    if fam == "time":
        e = _find_event(scene, spec["oid"], spec["kind"])
        verb = event_phrase(e, scene).split(" ", 3)[3]  # "the red circle turns blue" -> "turns blue"
        tol = spec.get("tolerance", 1.0)
        return Question(fam, f"At what second does the {_name(scene, e.oid)} {_bare(verb)}?",
                        str(int(math.floor(e.time + 0.5))), kind="number", tolerance=tol, spec=spec,
                        evidence_time=e.time)
    if fam == "summary":
        return Question(fam, "List the events in order.", summary_text(scene), kind="events", spec=spec,
                        evidence_time=scene.duration)
    raise ValueError(f"unknown question family {fam!r}")


def _bare(verb: str) -> str:
    """Third person to infinitive for our few verbs ("turns blue" -> "turn blue")."""
    word, _, rest = verb.partition(" ")
    base = {"appears": "appear", "disappears": "disappear", "turns": "turn", "grows": "grow",
            "shrinks": "shrink", "bounces": "bounce"}.get(word, word)
    return f"{base} {rest}".strip()


def _colours() -> List[str]:
    return list(COLOURS)


def summary_events(scene: Scene) -> List[Event]:
    """Events a summary lists: everything but bounces (those are motion, not state changes)."""
    return [e for e in scene_events(scene) if e.kind != "bounce"]


def summary_text(scene: Scene) -> str:
    """``"the red circle appears; the blue square turns green"`` (time order), or ``"nothing happens"``."""
    parts = [event_phrase(e, scene) for e in summary_events(scene)]
    return "; ".join(parts) if parts else NOTHING


# --- choosing specs ----------------------------------------------------------------------------


def _moving_without_bounce(scene: Scene, min_life: float = 3.0) -> List[int]:
    out = []
    for o in scene.objects:
        life = min(o.t_out, scene.duration) - o.t_in
        if o.direction != "still" and not bounce_times(o, scene.duration) and life >= min_life:
            out.append(o.oid)
    return out


def candidate_specs(scene: Scene) -> Dict[str, List[dict]]:
    """Every question this scene supports, grouped by family."""
    specs: Dict[str, List[dict]] = {f: [] for f in FAMILIES}
    movers = _moving_without_bounce(scene)
    specs["direction"] = [{"family": "direction", "oid": i} for i in movers]
    moving = [o.oid for o in scene.objects if o.direction != "still"
              and min(o.t_out, scene.duration) - o.t_in >= 3.0]
    specs["speed"] = [{"family": "speed", "oid": i} for i in moving]
    for i in moving:
        for j in moving:
            if i < j and scene.objects[i].speed != scene.objects[j].speed:
                specs["relative_speed"].append({"family": "relative_speed", "oids": [i, j]})
    events = [e for e in scene_events(scene) if _find_event(scene, e.oid, e.kind) is not None]
    for a in events:
        for b in events:
            if a.oid < b.oid and abs(a.time - b.time) >= MIN_ORDER_GAP:
                specs["order"].append({"family": "order", "events": [[a.oid, a.kind], [b.oid, b.kind]]})
    for o in scene.objects:
        if o.colour_change:
            specs["attribute"] += [{"family": "attribute", "oid": o.oid, "what": w}
                                   for w in ("colour_after", "colour_before")]
        if o.size_change:
            specs["attribute"] += [{"family": "attribute", "oid": o.oid, "what": w}
                                   for w in ("size_after", "size_before")]
    specs["count"] = [{"family": "count", "what": "total"}, {"family": "count", "what": "end"}]
    specs["time"] = [{"family": "time", "oid": e.oid, "kind": e.kind} for e in events if e.kind != "bounce"]
    specs["summary"] = [{"family": "summary"}]
    return specs


def _shuffle_pair(rng: np.random.Generator, spec: dict) -> dict:
    """Randomise which object is named first, so position never gives the answer away."""
    spec = dict(spec)
    key = "oids" if "oids" in spec else "events"
    if key in spec and rng.random() < 0.5:
        spec[key] = list(reversed(spec[key]))
    return spec


def sample_questions(scene: Scene, rng: np.random.Generator, per_family: int = 1,
                     families: Sequence[str] = FAMILIES) -> List[Question]:
    """Up to ``per_family`` questions of each family (fewer where the scene has none to ask)."""
    out = []
    cands = candidate_specs(scene)
    for fam in families:
        pool = cands[fam]
        if not pool:
            continue
        picks = rng.choice(len(pool), size=min(per_family, len(pool)), replace=False)
        for k in picks:
            out.append(build(scene, _shuffle_pair(rng, pool[int(k)])))
    return out


def reversed_twin(scene: Scene, q: Question) -> Optional[Question]:
    """The same question asked about the reversed clip (direction and order only)."""
    if q.family not in REVERSIBLE:
        return None
    rev = reverse_scene(scene)
    spec = dict(q.spec)
    if q.family == "order":
        spec["events"] = [[oid, REVERSE_KIND[k]] for oid, k in spec["events"]]
    return build(rev, spec)


# --- scoring -----------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, no articles, no punctuation at the ends, single spaces."""
    t = text.strip().lower()
    t = re.sub(r"[.!?,;:\"']+$", "", t)
    t = re.sub(r"^(the|a|an)\s+", "", t)
    return re.sub(r"\s+", " ", t).strip()


def parse_number(text: str) -> Optional[float]:
    m = re.search(r"-?\d+(?:\.\d+)?", text)
    if m:
        return float(m.group())
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in NUMBER_WORDS:
            return float(NUMBER_WORDS[w])
    return None


def parse_events(text: str) -> List[str]:
    """An event list answer as normalised phrases, in order."""
    t = text.strip().lower().rstrip(".")
    if normalise(t) == NOTHING:
        return []
    return [normalise(p) for p in re.split(r";|\n", t) if normalise(p)]


def event_f1(predicted: str, reference: str) -> float:
    """F1 between the event sets of two summaries (1.0 when both say nothing happens)."""
    p, r = parse_events(predicted), parse_events(reference)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    ps, rs = set(p), set(r)
    tp = len(ps & rs)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(ps), tp / len(rs)
    return 2 * precision * recall / (precision + recall)


def score(q: dict, predicted: str) -> float:
    """1.0 for a correct answer, 0.0 otherwise; summaries score their event F1 (exact match is F1 = 1)."""
    kind = q.get("kind", "choice")
    if kind == "number":
        value = parse_number(predicted)
        if value is None:
            return 0.0
        ref = float(q["answer"])
        return float(abs(value - ref) <= max(q.get("tolerance", 0.0), 0.0) + 1e-9)
    if kind == "events":
        return event_f1(predicted, q["answer"])
    return float(normalise(predicted) == normalise(q["answer"]))


def flipped(q: dict, twin: dict, answer: str) -> Optional[str]:
    """What an answer about the original clip must become about the reversed one (``twin`` is
    :func:`reversed_twin`'s question): the opposite direction, or the other event's object (the twin
    lists the same two events in the same order, so choices align by position)."""
    a = normalise(answer)
    if q["family"] == "direction":
        return {"left": "right", "right": "left", "up": "down", "down": "up"}.get(a)
    if q["family"] == "order":
        choices = [normalise(c) for c in q.get("choices") or []]
        twin_choices = [normalise(c) for c in twin.get("choices") or []]
        if a in choices and len(choices) == 2 == len(twin_choices):
            return twin_choices[1 - choices.index(a)]
    return None
