"""`mlx-elm speech eval`: held-out sentences spoken in seen and held-out voices, scored by

- MCD (dB) between mel-cepstra of the generated and the eSpeak target mels, DTW-aligned (durations
  are predicted, so frames do not correspond one to one);
- PER of the frozen phone recognizer against the input phones (pauses dropped); its PER on the
  ground-truth mels is the ceiling;
- speaker cosine similarity to the prompt (ceiling: the target recording; floor: another voice);
- prosody diversity across alpha: per-text spread of total duration and mean log-F0 over seeds, and
  the Jensen-Shannon divergence of phone-duration and F0 histograms against the ground truth;
- real-time factor per stage.

Consistency sampling at 1/2/4 steps and the same network solved as a probability-flow ODE
(Euler/Heun from ``mlx_elm.diffusion``) are scored on the acoustic model's mels (the vocoder is
the same for all); the default setting is also scored after Griffin-Lim and re-analysis.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_elm.speech import audio, espeak, files
from mlx_elm.speech.corpus import Corpus, SIGMA_DATA, Utt
from mlx_elm.speech.judges import edit_distance
from mlx_elm.speech.pipeline import PROMPT_FRAMES, Synthesizer


def mel_cepstrum(log_mel: np.ndarray, n: int = 13) -> np.ndarray:
    """MFCC-style cepstra c_1..c_n: orthonormal DCT-II of the log-mel frames (c_0, the energy, dropped)."""
    m = log_mel.shape[-1]
    k = np.arange(1, n + 1)[:, None]
    basis = np.sqrt(2.0 / m) * np.cos(np.pi * k * (np.arange(m)[None, :] + 0.5) / m)
    return np.asarray(log_mel, np.float64) @ basis.T


def dtw_path_cost(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean frame distance along the optimal DTW path (steps (1,0), (0,1), (1,1))."""
    d = np.sqrt(np.maximum(np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2 * a @ b.T, 0.0))
    n, m = d.shape
    acc = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1), np.int64)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        row, prev = acc[i], acc[i - 1]
        srow, sprev = steps[i], steps[i - 1]
        for j in range(1, m + 1):
            c0, c1, c2 = prev[j - 1], prev[j], row[j - 1]
            if c0 <= c1 and c0 <= c2:
                row[j], srow[j] = c0 + d[i - 1, j - 1], sprev[j - 1] + 1
            elif c1 <= c2:
                row[j], srow[j] = c1 + d[i - 1, j - 1], sprev[j] + 1
            else:
                row[j], srow[j] = c2 + d[i - 1, j - 1], srow[j - 1] + 1
    return float(acc[n, m] / steps[n, m])


def mcd_dtw(gen_log_mel: np.ndarray, ref_log_mel: np.ndarray, n: int = 13) -> float:
    """Mel-cepstral distortion in dB, ``10 / ln 10 * sqrt(2 * sum (c - c')^2)``, along the DTW path."""
    a, b = mel_cepstrum(gen_log_mel, n), mel_cepstrum(ref_log_mel, n)
    return 10.0 / math.log(10.0) * math.sqrt(2.0) * dtw_path_cost(a, b)


def phone_error_rate(hyp: list, ref: list) -> float:
    return edit_distance(hyp, ref) / max(len(ref), 1)


def jsd(p_samples: np.ndarray, q_samples: np.ndarray, bins: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats) between histograms of two sample sets on shared bins."""
    p, _ = np.histogram(p_samples, bins=bins)
    q, _ = np.histogram(q_samples, bins=bins)
    p = p / max(p.sum(), 1) + 1e-12
    q = q / max(q.sum(), 1) + 1e-12
    mid = 0.5 * (p + q)
    return float(0.5 * np.sum(p * np.log(p / mid)) + 0.5 * np.sum(q * np.log(q / mid)))


class Judges:
    """The frozen recognizer and speaker encoder, applied to normalised mels."""

    def __init__(self, recognizer: str | Path | None, speaker: str | Path | None):
        self.recognizer = files.load_judge(recognizer or files.DEFAULT_RECOGNIZER)
        self.speaker = files.load_judge(speaker or files.DEFAULT_SPEAKER)
        self.labels = list(self.recognizer.args.labels)
        self.pause = self.labels.index(espeak.PAUSE) if espeak.PAUSE in self.labels else -1

    def transcript(self, mel_norm: np.ndarray) -> list[int]:
        seq = self.recognizer.transcribe(mx.array(mel_norm))[0]
        return [s for s in seq if s != self.pause]

    def embed(self, mel_norm: np.ndarray) -> np.ndarray:
        m = mx.array(mel_norm)[None]
        return np.array(self.speaker(m, mx.ones(m.shape[:2])))[0]


def _ref_phones(u: Utt, judges: Judges, inv_symbols: list[str]) -> list[int]:
    """The utterance's phones in the recognizer's label ids, pauses dropped."""
    index = {s: i for i, s in enumerate(judges.labels)}
    return [index.get(inv_symbols[int(p)], -1) for p in u.phones[:, 0] if inv_symbols[int(p)] != espeak.PAUSE]


def test_items(corpus: Corpus, n: int) -> list[tuple[str, Utt, Utt]]:
    """(group, target, prompt) triples: the prompt is another test utterance of the same voice."""
    held = set(corpus.speakers(held_out=True))
    groups: dict[str, list] = {"held-out": [], "seen": []}
    for spk, utts in corpus.by_speaker("test").items():
        if len(utts) < 2:
            continue
        g = "held-out" if spk in held else "seen"
        for i, u in enumerate(utts):
            groups[g].append((g, u, utts[(i + 1) % len(utts)]))
    out = []
    for g, items in groups.items():
        items.sort(key=lambda x: x[1].uid)
        out += items[:n]
    return out


def _prompt_mel(p: Utt) -> mx.array:
    mel = p.mel
    if mel.shape[0] > PROMPT_FRAMES:
        s = (mel.shape[0] - PROMPT_FRAMES) // 2
        mel = mel[s : s + PROMPT_FRAMES]
    return mx.array(mel)


def run(corpus: Corpus, model=None, recognizer=None, speaker=None, n: int = 40,
        configs: list[tuple[str, int]] = (("cm", 1), ("cm", 2), ("cm", 4), ("euler", 8)),
        alphas: list[float] = (0.0, 0.2, 0.5, 1.0), vocoded: bool = True, seed: int = 0,
        diversity_texts: int = 10, diversity_seeds: int = 5, alpha: float = 0.2, rtf: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """The whole evaluation; returns a JSON-able report (see :func:`format_report`)."""
    from tqdm import tqdm

    syn = model if isinstance(model, Synthesizer) else Synthesizer(model)
    judges = Judges(recognizer, speaker)
    symbols = list(corpus.inventory.symbols)
    items = test_items(corpus, n)
    std, mean = corpus.mel_std, corpus.mel_mean
    denorm = lambda m: np.asarray(m) / SIGMA_DATA * std + mean  # noqa: E731
    report: dict = {"n_items": len(items), "groups": {}, "configs": {}, "diversity": {}, "rtf": {}}

    # ceilings on the ground truth
    for g in ("seen", "held-out"):
        sub = [it for it in items if it[0] == g]
        if not sub:
            continue
        per = [phone_error_rate(judges.transcript(u.mel), _ref_phones(u, judges, symbols)) for _, u, _ in sub]
        sim = [float(judges.embed(u.mel) @ judges.embed(p.mel)) for _, u, p in sub]
        other = [float(judges.embed(sub[(i + 1) % len(sub)][1].mel) @ judges.embed(p.mel))
                 for i, (_, u, p) in enumerate(sub) if sub[(i + 1) % len(sub)][1].speaker != u.speaker]
        by_text = {}
        for u in corpus.splits["test"]:
            by_text.setdefault(u.text, []).append(u)
        cross = [mcd_dtw(denorm(u.mel), denorm(v.mel)) for _, u, _ in sub for v in by_text[u.text]
                 if v.speaker != u.speaker]
        report["groups"][g] = {"n": len(sub), "per_ground_truth": float(np.mean(per)),
                               "mcd_same_text_other_voice": float(np.mean(cross)) if cross else float("nan"),
                               "sim_ground_truth": float(np.mean(sim)),
                               "sim_other_voice": float(np.mean(other)) if other else float("nan")}

    def one(u: Utt, p: Utt, sampler: str, steps: int, alpha: float, s: int, with_vocoder: bool):
        prompt = _prompt_mel(p)
        key = mx.random.key(s)
        k_pros, k_ac = mx.random.split(key)
        ids = u.phones
        t0 = time.perf_counter()
        dur, f0, cond, tokens, mask = syn.prosody(ids, prompt, alpha, k_pros)
        mx.eval(cond)
        t1 = time.perf_counter()
        mel_n = syn.acoustic(cond, tokens, mask, steps, k_ac, "consistency" if sampler == "cm" else sampler)[0]
        mx.eval(mel_n)
        t2 = time.perf_counter()
        out = {"mel_n": np.array(mel_n), "dur": np.array(dur), "f0": np.array(f0),
               "t_prosody": t1 - t0, "t_acoustic": t2 - t1}
        if with_vocoder:
            log_mel = syn.denormalise(mel_n)
            wav = syn.vocode(log_mel)
            mx.eval(wav)
            out["t_vocoder"] = time.perf_counter() - t2
            re = audio.log_mel(wav, syn.mel_cfg)
            out["vocoded_n"] = np.array(syn.normalise(re))
        return out

    for sampler, steps in configs:
        name = f"{sampler}:{steps}"
        rows = {"seen": [], "held-out": []}
        voc = vocoded and sampler == "cm" and steps == 2
        for g, u, p in tqdm(items, desc=f"eval {name}", unit="utt", dynamic_ncols=True, leave=False):
            r = one(u, p, sampler, steps, alpha, seed + u.uid, voc)
            ref = _ref_phones(u, judges, symbols)
            row = {"mcd": mcd_dtw(denorm(r["mel_n"]), denorm(u.mel)),
                   "per": phone_error_rate(judges.transcript(r["mel_n"]), ref),
                   "sim": float(judges.embed(r["mel_n"]) @ judges.embed(_prompt_mel(p))),
                   "t_acoustic": r["t_acoustic"], "t_prosody": r["t_prosody"],
                   "seconds": r["mel_n"].shape[0] * syn.mel_cfg.hop / syn.mel_cfg.sample_rate}
            if voc:
                row["mcd_vocoded"] = mcd_dtw(denorm(r["vocoded_n"]), denorm(u.mel))
                row["per_vocoded"] = phone_error_rate(judges.transcript(r["vocoded_n"]), ref)
                row["sim_vocoded"] = float(judges.embed(r["vocoded_n"]) @ judges.embed(_prompt_mel(p)))
                row["t_vocoder"] = r["t_vocoder"]
            rows[g].append(row)
        report["configs"][name] = {g: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
                                   for g, rs in rows.items() if rs}
        log(f"{name}: " + "; ".join(f"{g} MCD {v['mcd']:.2f} PER {v['per']:.3f} sim {v['sim']:.3f}"
                                     for g, v in report["configs"][name].items()))

    # prosody diversity across alpha (seen voices' prompts, a few texts, several seeds)
    div_items = [it for it in items][:diversity_texts]
    gt_d = np.concatenate([u.durations for _, u, _ in items])
    gt_f = np.concatenate([np.log(u.f0[u.f0 > 0]) for _, u, _ in items])
    for a in alphas:
        spreads_d, spreads_f, all_d, all_f = [], [], [], []
        for g, u, p in div_items:
            tot, mf = [], []
            for s in range(diversity_seeds):
                dur, f0, *_ = syn.prosody(u.phones, _prompt_mel(p), a, mx.random.key(1000 + s))
                dur, f0 = np.array(dur), np.array(f0)
                tot.append(dur.sum())
                v = f0[f0 > 0]
                mf.append(np.log(v).mean() if len(v) else 0.0)
                all_d.append(dur)
                all_f.append(np.log(v) if len(v) else np.zeros(0))
            spreads_d.append(np.std(tot) / max(np.mean(tot), 1))
            spreads_f.append(np.std(mf))
        report["diversity"][str(a)] = {
            "duration_spread": float(np.mean(spreads_d)), "logf0_spread": float(np.mean(spreads_f)),
            "duration_jsd": jsd(np.concatenate(all_d), gt_d, np.arange(0.5, 40.5)),
            "pitch_jsd": jsd(np.concatenate(all_f), gt_f, np.linspace(np.log(50), np.log(600), 41))}

    if not rtf:
        return report
    # end-to-end real-time factor on a fixed sentence, default settings, after a warm-up
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    syn(text, steps=2, prompt=_prompt_mel(items[0][2]))
    runs = [syn(text, steps=2, seed=i, prompt=_prompt_mel(items[0][2])) for i in range(5)]
    secs = float(np.mean([r.seconds for r in runs]))
    for k in runs[0].timings:
        report["rtf"][k] = float(np.mean([r.timings[k] for r in runs])) / secs
    report["rtf"]["total"] = float(sum(report["rtf"].values()))
    report["rtf"]["audio_seconds"] = secs
    return report


def format_report(report: dict) -> list[str]:
    """Markdown tables of a report."""
    lines = ["| voices | n | PER ground truth (ceiling) | sim ground truth | sim other voice | "
             "MCD same text, other voice |", "|---|---|---|---|---|---|"]
    for g, v in report["groups"].items():
        lines.append(f"| {g} | {v['n']} | {v['per_ground_truth']:.3f} | {v['sim_ground_truth']:.3f} | "
                     f"{v['sim_other_voice']:.3f} | {v.get('mcd_same_text_other_voice', float('nan')):.2f} |")
    lines += ["", "| sampler:steps | voices | MCD dB | PER | speaker sim | acoustic RTF |", "|---|---|---|---|---|---|"]
    for name, groups in report["configs"].items():
        for g, v in groups.items():
            lines.append(f"| {name} | {g} | {v['mcd']:.2f} | {v['per']:.3f} | {v['sim']:.3f} | "
                         f"{v['t_acoustic'] / v['seconds']:.4f} |")
    voc = [(n, g, v) for n, gs in report["configs"].items() for g, v in gs.items() if "mcd_vocoded" in v]
    if voc:
        lines += ["", "| after Griffin-Lim | voices | MCD dB | PER | speaker sim |", "|---|---|---|---|---|"]
        for n, g, v in voc:
            lines.append(f"| {n} | {g} | {v['mcd_vocoded']:.2f} | {v['per_vocoded']:.3f} | {v['sim_vocoded']:.3f} |")
    lines += ["", "| alpha | duration spread | log-F0 spread | duration JSD | pitch JSD |", "|---|---|---|---|---|"]
    for a, v in report["diversity"].items():
        lines.append(f"| {a} | {v['duration_spread']:.4f} | {v['logf0_spread']:.4f} | {v['duration_jsd']:.4f} | "
                     f"{v['pitch_jsd']:.4f} |")
    r = report["rtf"]
    if r:
        stages = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("total", "audio_seconds"))
        lines += ["", f"end-to-end RTF {r['total']:.4f} on {r['audio_seconds']:.2f} s of audio ({stages})"]
    return lines
