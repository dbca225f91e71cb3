"""Moving-shapes videos with exact ground truth (the generator is versioned and seeded).

A scene is a list of objects, each with a shape, a colour, a size, a constant-velocity motion
that bounces off the walls, a visible interval (appear / disappear events) and at most one colour
change and one size change. The state at any time is computed analytically
(:func:`object_state`), so frames, events and answers all come from the same description and
agree exactly. Every clip is a pure function of ``(GENERATOR_VERSION, seed, split, index)``.

Geometry is in frame units (the frame is the unit square, y down), so the same scene renders at
any resolution; speeds are in frame sides per second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

GENERATOR_VERSION = "moving-shapes/1"

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (35, 190, 50), "blue": (50, 80, 235), "yellow": (235, 220, 40),
    "magenta": (215, 50, 215), "cyan": (40, 205, 215), "white": (235, 235, 235), "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.075, "large": 0.12}  # radius, frame sides
SPEEDS = {"slow": 0.03, "fast": 0.09}  # frame sides per second
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
BACKGROUND = (18, 18, 22)
# colour x direction pairs never shown in training (the compositional split is built from them)
HELD_OUT_PAIRS = frozenset({("red", "left"), ("green", "right"), ("blue", "up"), ("yellow", "down"),
                            ("magenta", "left"), ("cyan", "right"), ("white", "up"), ("orange", "down")})
EVENT_KINDS = ("appear", "disappear", "colour", "size", "bounce")


@dataclass
class ObjectSpec:
    """One object: what it looks like, how it moves, when it is visible and what changes."""

    oid: int
    shape: str
    colour: str  # colour when it first appears
    size: str  # size when it first appears
    direction: str  # initial direction, or "still"
    speed: str  # "slow" | "fast" (ignored when still)
    x0: float  # centre at t_in (frame units)
    y0: float
    t_in: float = 0.0  # visible on [t_in, t_out)
    t_out: float = math.inf
    colour_change: Optional[Tuple[float, str]] = None  # (time, new colour)
    size_change: Optional[Tuple[float, str]] = None  # (time, new size)


@dataclass
class Scene:
    """A clip: duration, objects and narration lines ``(time, text)`` (the stand-in for ASR)."""

    duration: float
    objects: List[ObjectSpec]
    narration: List[Tuple[float, str]] = field(default_factory=list)
    seed: Tuple[int, ...] = ()
    split: str = "id"
    version: str = GENERATOR_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        for o in d["objects"]:
            if o["t_out"] == math.inf:
                o["t_out"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = []
        for o in d["objects"]:
            o = dict(o)
            o["t_out"] = math.inf if o.get("t_out") is None else o["t_out"]
            for k in ("colour_change", "size_change"):
                if o.get(k) is not None:
                    o[k] = (float(o[k][0]), str(o[k][1]))
            objs.append(ObjectSpec(**o))
        return cls(float(d["duration"]), objs, [(float(t), s) for t, s in d.get("narration", [])],
                   tuple(d.get("seed", ())), d.get("split", "id"), d.get("version", GENERATOR_VERSION))


@dataclass
class ObjectState:
    oid: int
    visible: bool
    x: float
    y: float
    colour: str
    size: str
    shape: str
    direction: str  # current direction of motion ("still" when not moving)


@dataclass
class Event:
    """Something that happens at one instant; ``detail`` is e.g. ``("red", "blue")`` for a colour change."""

    time: float
    kind: str
    oid: int
    detail: Tuple[str, ...] = ()


# --- motion ------------------------------------------------------------------------------------


def _bounds(size: str) -> Tuple[float, float]:
    r = SIZES[size]
    return r, 1.0 - r


def _reflect(p0: float, v: float, t: float, lo: float, hi: float) -> Tuple[float, float]:
    """Position at time ``t`` of a point bouncing between ``lo`` and ``hi``, and +1 while it
    moves along ``v`` (-1 after an odd number of bounces). The path is unfolded onto a circle of
    length ``2 (hi - lo)``: the first half is the forward leg, the second the way back."""
    span = hi - lo
    if v == 0 or span <= 0:
        return p0, 1.0
    u = (p0 - lo + v * t) % (2 * span)
    if u <= span:
        return lo + u, 1.0
    return hi - (u - span), -1.0


def _velocity(o: ObjectSpec) -> Tuple[float, float]:
    if o.direction == "still":
        return 0.0, 0.0
    dx, dy = DIRECTIONS[o.direction]
    s = SPEEDS[o.speed]
    return dx * s, dy * s


def _size_at(o: ObjectSpec, t: float) -> str:
    if o.size_change is not None and t >= o.size_change[0]:
        return o.size_change[1]
    return o.size


def _colour_at(o: ObjectSpec, t: float) -> str:
    if o.colour_change is not None and t >= o.colour_change[0]:
        return o.colour_change[1]
    return o.colour


def _motion_bounds(o: ObjectSpec) -> Tuple[float, float]:
    """Walls for the centre: the larger of the object's sizes keeps it inside the frame throughout."""
    sizes = [o.size] + ([o.size_change[1]] if o.size_change else [])
    r = max(SIZES[s] for s in sizes)
    return r, 1.0 - r


def object_state(o: ObjectSpec, t: float) -> ObjectState:
    """Where ``o`` is and what it looks like at time ``t`` (seconds from the start of the clip)."""
    vx, vy = _velocity(o)
    lo, hi = _motion_bounds(o)
    dt = max(t - o.t_in, 0.0)
    x, sx = _reflect(o.x0, vx, dt, lo, hi)
    y, sy = _reflect(o.y0, vy, dt, lo, hi)
    if o.direction == "still":
        direction = "still"
    elif vx != 0:
        direction = "right" if vx * sx > 0 else "left"
    else:
        direction = "down" if vy * sy > 0 else "up"
    visible = o.t_in <= t < o.t_out
    return ObjectState(o.oid, visible, x, y, _colour_at(o, t), _size_at(o, t), o.shape, direction)


def bounce_times(o: ObjectSpec, until: float) -> List[float]:
    """Times in ``(t_in, min(t_out, until))`` when ``o`` hits a wall and turns back."""
    vx, vy = _velocity(o)
    v, p0 = (vx, o.x0) if vx != 0 else (vy, o.y0)
    if v == 0:
        return []
    lo, hi = _motion_bounds(o)
    span = hi - lo
    end = min(o.t_out, until) - o.t_in
    u0 = p0 - lo if v > 0 else hi - p0  # distance already travelled towards the first wall's far side
    first = (span - u0) / abs(v)
    out, t = [], first
    while t < end - 1e-9:
        if t > 1e-9:
            out.append(o.t_in + t)
        t += span / abs(v)
    return out


def scene_events(scene: Scene) -> List[Event]:
    """All events of the clip in time order (ties broken by object id)."""
    ev: List[Event] = []
    for o in scene.objects:
        if o.t_in > 0:
            ev.append(Event(o.t_in, "appear", o.oid))
        if o.t_out < scene.duration:
            ev.append(Event(o.t_out, "disappear", o.oid))
        if o.colour_change is not None:
            ev.append(Event(o.colour_change[0], "colour", o.oid, (o.colour, o.colour_change[1])))
        if o.size_change is not None:
            ev.append(Event(o.size_change[0], "size", o.oid, (o.size, o.size_change[1])))
        for t in bounce_times(o, scene.duration):
            before = object_state(o, t - 1e-4).direction
            ev.append(Event(t, "bounce", o.oid, (before, OPPOSITE[before])))
    return sorted(ev, key=lambda e: (e.time, e.oid, e.kind))


# --- reversal ----------------------------------------------------------------------------------


def reverse_scene(scene: Scene) -> Scene:
    """The same clip played backwards, as a scene of its own (appear and disappear swap, colour and
    size changes invert, motion turns around), so questions about it get exact answers too."""
    T = scene.duration
    objs = []
    for o in scene.objects:
        t_out = min(o.t_out, T)
        t_in_r, t_out_r = T - t_out, T - o.t_in
        end = object_state(o, max(t_out - 1e-6, o.t_in))
        colour, size = end.colour, end.size
        cc = (T - o.colour_change[0], o.colour) if o.colour_change else None
        sc = (T - o.size_change[0], o.size) if o.size_change else None
        objs.append(ObjectSpec(o.oid, o.shape, colour, size, OPPOSITE[end.direction], o.speed, end.x, end.y,
                               t_in_r, math.inf if t_out_r >= T else t_out_r, cc, sc))
    narration = [(T - t, text) for t, text in reversed(scene.narration)]
    return Scene(T, objs, narration, scene.seed, scene.split, scene.version)


# --- rendering ---------------------------------------------------------------------------------


def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # an upward triangle inscribed in the circle of radius r
    top, bottom = -r, r * 0.6
    inside_y = (dy >= top) & (dy <= bottom)
    half = (dy - top) / (bottom - top) * r * 0.95
    return inside_y & (np.abs(dx) <= half)


def render_frame(scene: Scene, t: float, size: int = 64) -> np.ndarray:
    """The frame at time ``t`` as ``[size, size, 3]`` uint8 (pixel centres sampled, no anti-aliasing)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    coords = (np.arange(size) + 0.5) / size
    xs, ys = np.meshgrid(coords, coords)
    for o in scene.objects:
        s = object_state(o, t)
        if s.visible:
            img[shape_mask(s.shape, xs, ys, s.x, s.y, SIZES[s.size])] = COLOURS[s.colour]
    return img


def frame_times(duration: float, fps: float) -> np.ndarray:
    """Presentation times of the frames a clip of ``duration`` seconds has at ``fps``."""
    return np.arange(int(round(duration * fps))) / fps


def render(scene: Scene, fps: float = 4.0, size: int = 64) -> np.ndarray:
    """All frames ``[T, size, size, 3]`` at ``fps``; frame ``k`` shows time ``k / fps``."""
    return np.stack([render_frame(scene, float(t), size) for t in frame_times(scene.duration, fps)])


# --- sampling scenes ---------------------------------------------------------------------------


@dataclass
class SplitConfig:
    """How the scenes of one split are drawn."""

    name: str
    min_objects: int = 1
    max_objects: int = 4
    duration: float = 8.0
    held_out: str = "exclude"  # "exclude": never show HELD_OUT_PAIRS; "require": feature one
    p_event: float = 0.5  # chance that an object gets an appear/disappear/colour/size event
    p_bounce: float = 0.15  # chance that a moving object is placed to hit a wall
    p_still: float = 0.15
    p_narration: float = 0.5  # chance that a clip is narrated


SPLITS = {
    "id": SplitConfig("id"),
    "comp": SplitConfig("comp", min_objects=5, max_objects=6, held_out="require"),
}


def colour_direction_pairs(o: ObjectSpec, duration: float) -> set:
    """(colour, direction) pairs the object shows while visible."""
    times = [o.t_in + 1e-3] + [t + 1e-3 for t in bounce_times(o, duration)]
    if o.colour_change:
        times.append(o.colour_change[0] + 1e-3)
    out = set()
    for t in times:
        if t < min(o.t_out, duration):
            s = object_state(o, t)
            out.add((s.colour, s.direction))
    return out


def _place(rng: np.random.Generator, o: ObjectSpec, duration: float, want_bounce: bool) -> None:
    """Choose the start so the object either stays clear of the walls or hits one mid-clip."""
    lo, hi = _motion_bounds(o)
    vx, vy = _velocity(o)
    life = min(o.t_out, duration) - o.t_in
    for axis, v in (("x", vx), ("y", vy)):
        travel = abs(v) * life
        if v == 0:
            p = rng.uniform(lo, hi)
        elif want_bounce and travel > 0.15:
            # reach the wall between 30% and 70% of the way through
            d = abs(v) * life * rng.uniform(0.3, 0.7)
            p = hi - d if v > 0 else lo + d
            p = float(np.clip(p, lo, hi))
        else:
            room = (hi - lo) - travel
            if room > 0:
                start = rng.uniform(lo, lo + room)
                p = start if v > 0 else hi - (start - lo)
            else:  # cannot avoid the wall: start at the far side
                p = lo if v > 0 else hi
        setattr(o, f"{axis}0", float(p))


def sample_scene(rng: np.random.Generator, cfg: SplitConfig, seed: Tuple[int, ...] = ()) -> Scene:
    """One scene of ``cfg``'s distribution (rejection-sampled for the held-out pair rule)."""
    for _ in range(200):
        scene = _draw(rng, cfg, seed)
        pairs = set().union(*(colour_direction_pairs(o, cfg.duration) for o in scene.objects))
        held = pairs & HELD_OUT_PAIRS
        if (cfg.held_out == "exclude" and not held) or (cfg.held_out == "require" and held) or cfg.held_out == "any":
            return scene
    raise RuntimeError(f"could not draw a scene for split {cfg.name!r}; its constraints are too tight")


def _draw(rng: np.random.Generator, cfg: SplitConfig, seed: Tuple[int, ...]) -> Scene:
    T = cfg.duration
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colours = list(rng.permutation(list(COLOURS)))
    objects: List[ObjectSpec] = []
    spare = colours[n:]  # colours no object starts with: targets of colour changes
    for i in range(n):
        direction = "still" if rng.random() < cfg.p_still else str(rng.choice(list(DIRECTIONS)))
        o = ObjectSpec(i, str(rng.choice(SHAPES)), str(colours[i]), str(rng.choice(list(SIZES))), direction,
                       str(rng.choice(list(SPEEDS))), 0.5, 0.5)
        if rng.random() < cfg.p_event:
            kind = str(rng.choice(["appear", "disappear", "colour", "size"]))
            t = float(np.round(rng.uniform(1.0, T - 1.0), 1))
            if kind == "appear":
                o.t_in = t
            elif kind == "disappear":
                o.t_out = t
            elif kind == "colour" and spare:
                o.colour_change = (t, str(spare.pop()))
            elif kind == "size":
                o.size_change = (t, "large" if o.size == "small" else "small")
        _place(rng, o, T, want_bounce=direction != "still" and rng.random() < cfg.p_bounce)
        objects.append(o)
    scene = Scene(T, objects, [], seed, cfg.name)
    if rng.random() < cfg.p_narration:
        scene.narration = narrate(scene, rng)
    return scene


# --- names and narration -----------------------------------------------------------------------


def object_name(o: ObjectSpec) -> str:
    """How questions refer to an object: its first colour and its shape (unique within a clip)."""
    return f"{o.colour} {o.shape}"


def event_phrase(e: Event, scene: Scene) -> str:
    """``"the red circle turns blue"`` and the like."""
    o = scene.objects[e.oid]
    name = f"the {object_name(o)}"
    if e.kind == "appear":
        return f"{name} appears"
    if e.kind == "disappear":
        return f"{name} disappears"
    if e.kind == "colour":
        return f"{name} turns {e.detail[1]}"
    if e.kind == "size":
        return f"{name} {'grows' if e.detail[1] == 'large' else 'shrinks'}"
    return f"{name} bounces"


def narrate(scene: Scene, rng: np.random.Generator) -> List[Tuple[float, str]]:
    """A few spoken lines: about half of the events, announced when they happen."""
    lines = []
    for e in scene_events(scene):
        if e.kind != "bounce" and rng.random() < 0.5:
            text = event_phrase(e, scene)
            lines.append((round(e.time, 1), "Look, " + text + "."))
    return lines


# --- long clips for the length split -----------------------------------------------------------


def sample_long_scene(rng: np.random.Generator, duration: float, evidence_fraction: float, gap: float,
                      seed: Tuple[int, ...] = ()) -> Scene:
    """A clip of ``duration`` seconds with steady distractor traffic and two *target* objects.

    Target A appears at ``evidence_fraction * duration`` (within [0.5 s, duration - 1.5 s]) and
    moves (no bounce) for up to 6 s;
    target B appears ``gap`` seconds before or after it. Distractors never use the targets'
    colours, so questions about A and B are unambiguous however long the clip is.
    """
    T = float(duration)
    colours = list(rng.permutation(list(COLOURS)))
    ca, cb, rest = str(colours[0]), str(colours[1]), [str(c) for c in colours[2:]]
    t_a = float(np.clip(np.round(evidence_fraction * T, 1), 0.5, T - 1.5))
    life = min(6.0, T - t_a)
    after = t_a + gap
    t_b = after if after + 1.0 <= T and (rng.random() < 0.5 or t_a - gap < 0.5) else t_a - gap
    t_b = float(np.clip(np.round(t_b, 1), 0.5, T - 1.0))
    objects = []
    for oid, (c, t) in enumerate(((ca, t_a), (cb, t_b))):
        o = ObjectSpec(oid, str(rng.choice(SHAPES)), c, str(rng.choice(list(SIZES))),
                       str(rng.choice(list(DIRECTIONS))), str(rng.choice(list(SPEEDS))), 0.5, 0.5,
                       t_in=t, t_out=min(t + life, T) if t + life < T else math.inf)
        _place(rng, o, T, want_bounce=False)
        objects.append(o)
    t = float(rng.uniform(0.0, 2.0))
    while t < T - 1.0:
        o = ObjectSpec(len(objects), str(rng.choice(SHAPES)), str(rng.choice(rest)), str(rng.choice(list(SIZES))),
                       "still" if rng.random() < 0.2 else str(rng.choice(list(DIRECTIONS))),
                       str(rng.choice(list(SPEEDS))), 0.5, 0.5, t_in=round(t, 1) if t > 0.05 else 0.0)
        end = t + float(rng.uniform(4.0, 8.0))
        o.t_out = round(end, 1) if end < T else math.inf
        _place(rng, o, T, want_bounce=False)
        objects.append(o)
        t += float(rng.uniform(2.0, 4.0))
    return Scene(T, objects, [], seed, "length")


# --- captions for alignment (stage 1) ----------------------------------------------------------


def segment_caption(scene: Scene, start: float, end: float) -> str:
    """What a segment shows: each visible object's motion, then the events inside it."""
    parts = []
    for o in scene.objects:
        if o.t_in >= end or min(o.t_out, scene.duration) <= start:
            continue
        mid = object_state(o, max(start, o.t_in) + 1e-3)
        motion = "is still" if mid.direction == "still" else f"moves {mid.direction} {'slowly' if o.speed == 'slow' else 'fast'}"
        parts.append(f"{object_name(o)} {motion}")
    events = [event_phrase(e, scene) for e in scene_events(scene) if start <= e.time < end]
    text = ", ".join(parts) if parts else "nothing is visible"
    return text + ("; " + "; ".join(events) if events else "") + "."


def shows_held_out_pair(scene: Scene) -> bool:
    """True when some object shows a colour x direction pair of HELD_OUT_PAIRS."""
    return any(colour_direction_pairs(o, scene.duration) & HELD_OUT_PAIRS for o in scene.objects)
