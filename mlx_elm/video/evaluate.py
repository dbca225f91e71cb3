"""``mlx-elm video eval``: exact-match accuracy per family and split, with controls in the same run.

Conditions (all on the same questions, same model, same run):

- ``full``: the video as it is;
- ``question``: no video tokens at all (and no transcript): what language priors alone get;
- ``middle``: every frame replaced by the middle frame (appearance kept, time removed);
- ``shuffle``: frames permuted at random (their times kept);
- ``reverse``: frames in reverse order (without the transcript, which cannot be reversed);
  direction and order questions are asked as their reversed twins, whose answers flip. *Consistency* is the share of questions whose answer on the reversed
  clip is the flip of the answer on the original (whether or not either is right).

Chance per question: ``1 / len(choices)`` for closed choices; for counts, times and summaries the
best constant answer of the family on the split (computed from the ground truth).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from mlx_elm.errors import VideoError
from mlx_elm.generation import SamplingOptions
from mlx_elm.video import dataset as D
from mlx_elm.video import features as FT
from mlx_elm.video import questions as Q
from mlx_elm.video import transcript as TR

MAX_TOKENS = {"choice": 8, "number": 6, "events": 64}


def chance(rows: Sequence[dict]) -> Dict[str, float]:
    """Expected accuracy of guessing, per family (see the module docstring)."""
    by_family: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        by_family[r["family"]].append(r)
    out = {}
    for fam, rs in by_family.items():
        if all(r.get("choices") for r in rs):
            out[fam] = float(np.mean([1.0 / len(r["choices"]) for r in rs]))
            continue
        candidates = Counter(r["answer"] for r in rs).most_common(20)
        best = 0.0
        for answer, _ in candidates:
            best = max(best, float(np.mean([Q.score(r, answer) for r in rs])))
        out[fam] = best
    return out


@dataclass
class EvalConfig:
    splits: Tuple[str, ...] = ("id", "comp", "length")
    controls: Tuple[str, ...] = ("full", "question", "middle", "shuffle", "reverse")
    control_splits: Tuple[str, ...] = ("id",)  # controls other than "full" run on these splits
    limit: int = 0  # questions per split and family (0: all)
    transcript: bool = True
    seed: int = 0


@dataclass
class Record:
    split: str
    control: str
    family: str
    score: float
    answer: str
    reference: str
    extra: dict = field(default_factory=dict)


def _limit(rows: List[dict], n: int) -> List[dict]:
    if n <= 0:
        return rows
    seen: Dict[str, int] = Counter()
    out = []
    for r in rows:
        if seen[r["family"]] < n:
            out.append(r)
            seen[r["family"]] += 1
    return out


def evaluate(assistant, data_dir: Path, cfg: EvalConfig, log: Callable[[str], None] = print,
             progress: Optional[Callable[[int], None]] = None) -> dict:
    """Run every (split, control, question); returns a JSON-able report (see :func:`summarise`)."""
    data_dir = Path(data_dir)
    files = FT.prepare_split_features(data_dir, assistant.encoder, assistant.cfg.fps, cfg.splits, log)
    records: List[Record] = []
    chances: Dict[str, Dict[str, float]] = {}
    t0 = time.time()
    for split in cfg.splits:
        scenes, rows = D.read_split(data_dir, split)
        rows = _limit(rows, cfg.limit)
        chances[split] = chance(rows)
        feats = FT.load_split(files[split])
        controls = [c for c in cfg.controls if c == "full" or split in cfg.control_splits]
        for r in rows:
            scene = scenes[r["clip_id"]]
            lines = TR.from_pairs(scene.narration) if cfg.transcript else []
            ff = feats[r["clip_id"]]
            opts = SamplingOptions(max_tokens=MAX_TOKENS[r.get("kind", "choice")], temp=0.0)
            full_answer = None
            for control in controls:
                if control == "reverse" and "twin" not in r:
                    continue
                q = r if control != "reverse" else {**r, **r["twin"]}
                # narration cannot be played backwards ("turns blue" would be a lie), so the
                # reversed clip is shown without it; the question-only control has no video at all
                shown_lines = [] if control in ("reverse", "question") else lines
                ans = assistant.ask_features(None if control == "question" else ff, q["question"], shown_lines, opts, control)
                s = Q.score(q, ans.text)
                extra = {"clip_id": r["clip_id"], "tokens": len(ans.layout.tokens), "ttft": ans.seconds_to_first_token}
                for k in ("evidence_fraction", "gap", "duration"):
                    if k in r:
                        extra[k] = r[k]
                if control == "full":
                    full_answer = ans.text
                if control == "reverse" and full_answer is not None:
                    flip = Q.flipped(r, r["twin"], full_answer)
                    extra["consistent"] = float(flip is not None and Q.normalise(ans.text) == flip)
                records.append(Record(split, control, r["family"], s, ans.text, q["answer"], extra))
                if progress is not None:
                    progress(1)
    return summarise(records, chances, time.time() - t0)


def summarise(records: List[Record], chances: Dict[str, Dict[str, float]], seconds: float) -> dict:
    table: Dict[str, Dict[str, Dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    groups: Dict[Tuple[str, str, str], List[Record]] = defaultdict(list)
    for r in records:
        groups[(r.split, r.control, r.family)].append(r)
    for (split, control, fam), rs in sorted(groups.items()):
        cell = {"n": len(rs), "accuracy": float(np.mean([r.score for r in rs]))}
        if fam == "summary":
            cell["exact"] = float(np.mean([r.score == 1.0 for r in rs]))
        cons = [r.extra["consistent"] for r in rs if "consistent" in r.extra]
        if cons:
            cell["consistency"] = float(np.mean(cons))
        table[split][control][fam] = cell
    overall = {}
    for split, by_control in table.items():
        overall[split] = {}
        for control, fams in by_control.items():
            overall[split][control] = float(np.mean([c["accuracy"] for c in fams.values()]))
    length = _length_breakdown([r for r in records if r.split == "length" and r.control == "full"])
    return {"table": json.loads(json.dumps(table)), "overall": overall, "chance": chances,
            "chance_overall": {s: float(np.mean(list(c.values()))) for s, c in chances.items()},
            "length": length, "seconds": seconds,
            "records": [r.__dict__ for r in records]}


def _length_breakdown(records: List[Record]) -> dict:
    out: Dict[str, dict] = {}
    by_dur: Dict[float, List[Record]] = defaultdict(list)
    for r in records:
        by_dur[r.extra.get("duration", 0)].append(r)
    for dur, rs in sorted(by_dur.items()):
        fams = defaultdict(list)
        for r in rs:
            fams[r.family].append(r.score)
        by_pos = defaultdict(list)
        for r in rs:
            by_pos[str(r.extra.get("evidence_fraction"))].append(r.score)
        out[str(int(dur))] = {"accuracy": float(np.mean([r.score for r in rs])), "n": len(rs),
                              "families": {f: float(np.mean(v)) for f, v in fams.items()},
                              "by_evidence_position": {k: float(np.mean(v)) for k, v in by_pos.items()},
                              "tokens": int(np.mean([r.extra.get("tokens", 0) for r in rs]))}
    return out


def markdown(report: dict, families: Sequence[str] = Q.FAMILIES) -> str:
    """Tables: accuracy per family for each split and control, chance, consistency, length."""
    lines = []
    for split, by_control in report["table"].items():
        controls = list(by_control)
        lines.append(f"\n**{split}** (exact match; summary: event F1, exact match in brackets)\n")
        lines.append("| family | " + " | ".join(controls) + " | chance |")
        lines.append("|---|" + "---|" * (len(controls) + 1))
        for fam in families:
            cells = []
            for c in controls:
                cell = by_control[c].get(fam)
                if cell is None:
                    cells.append("–")
                    continue
                txt = f"{100 * cell['accuracy']:.0f}"
                if "exact" in cell:
                    txt += f" [{100 * cell['exact']:.0f}]"
                if "consistency" in cell:
                    txt += f" (cons. {100 * cell['consistency']:.0f})"
                cells.append(txt + f" n={cell['n']}" if c == "full" else txt)
            ch = report["chance"].get(split, {}).get(fam)
            if any(by_control[c].get(fam) for c in controls):
                lines.append(f"| {fam} | " + " | ".join(cells) + f" | {100 * ch:.0f} |" if ch is not None else " | – |")
        ov = report["overall"][split]
        lines.append("| **mean** | " + " | ".join(f"**{100 * ov[c]:.0f}**" for c in controls)
                     + f" | {100 * report['chance_overall'][split]:.0f} |")
    if report.get("length"):
        lines.append("\n**length** (full video; accuracy over direction, speed, order, time)\n")
        lines.append("| duration | tokens | accuracy | direction | speed | order | time | evidence at 10% / 50% / 90% |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for dur, row in report["length"].items():
            f = row["families"]
            pos = row["by_evidence_position"]
            lines.append(f"| {dur} s | {row['tokens']} | {100 * row['accuracy']:.0f} | "
                         + " | ".join(f"{100 * f.get(k, float('nan')):.0f}" for k in ("direction", "speed", "order", "time"))
                         + " | " + " / ".join(f"{100 * pos.get(k, float('nan')):.0f}" for k in ("0.1", "0.5", "0.9")) + " |")
    return "\n".join(lines) + "\n"


def forgetting_markdown(f: dict) -> str:
    return ("\n**forgetting** (text only, base decoder vs base + video adapters)\n\n"
            "| metric | base | tuned | change |\n|---|---|---|---|\n"
            f"| prose perplexity | {f['base']['prose_ppl']:.2f} | {f['tuned']['prose_ppl']:.2f} | {f['prose_ppl_change_pct']:+.1f}% |\n"
            f"| base answers' perplexity | {f['base']['answer_ppl']:.2f} | {f['tuned']['answer_ppl']:.2f} | "
            f"{f['answer_ppl_change_pct']:+.1f}% |\n")


def efficiency_markdown(rows: list) -> str:
    lines = ["\n**efficiency** (features with a cold cache; time to first token from the warm cache)\n",
             "| video | segments x s | visual tokens | prompt tokens | features (s) | time to first token (s) | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['duration']:.0f} s | {r['segments']} x {r['segment_seconds']} | {r['visual_tokens']} | "
                     f"{r['prompt_tokens']} | {r['features_seconds']:.1f} | {r['ttft_seconds']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"
