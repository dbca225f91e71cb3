"""An offline speech corpus synthesized by eSpeak NG: mels, per-phone durations, F0, speakers.

A *speaker* is an eSpeak voice variant with its own base rate, pitch and pitch range; each
utterance jitters rate and pitch around them, so duration and pitch are not a function of the text
alone (the prosody refiner has something to model). Sentences are split train/valid/test by
sentence; a set of speakers is held out and speaks only test sentences (zero-shot voices).

Durations come from eSpeak's phoneme events: phone onsets in samples are rounded to frame
boundaries, every phone gets at least one frame (borrowed from the longest phone), and the
durations of an utterance sum to its frame count, ``len(samples) // hop``.

On disk (one folder, written atomically): ``meta.json`` (settings, speakers, inventory, per-bin
mel statistics, one record per utterance) and one ``<split>.safetensors`` per split holding the
concatenated arrays (mel float16, F0, phones, durations).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import SpeechError
from mlx_elm.speech import audio, espeak
from mlx_elm.speech.text import Inventory, sentences

META = "meta.json"
SPLITS = ("train", "valid", "test")
EXCLUDED_VARIANTS = ("whisper", "whisperf")  # no voicing: F0 is undefined
SIGMA_DATA = 0.5  # normalised mels have this per-bin standard deviation


@dataclass
class CorpusConfig:
    """What to synthesize; the defaults built the shipped model's corpus."""

    n_sentences: int = 2600
    n_valid: int = 100
    n_test: int = 100
    n_train_speakers: int = 40
    n_test_speakers: int = 10
    base_voice: str = "en-us"
    rate_range: tuple = (145, 195)  # words per minute, per speaker
    pitch_range: tuple = (25, 75)
    range_range: tuple = (20, 80)
    rate_jitter: float = 0.12  # per utterance, relative
    pitch_jitter: int = 8
    seed: int = 0
    mel: dict = field(default_factory=lambda: asdict(audio.MelConfig()))

    def fingerprint(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class Speaker:
    name: str  # e.g. "s07"
    voice: str  # eSpeak voice, e.g. "en-us+m3"
    rate: int
    pitch: int
    range: int
    held_out: bool


@dataclass
class Utt:
    """One utterance in memory: normalised mel (T, n_mels), F0 Hz (T,), phones (P, 3), durations (P,)."""

    uid: int
    split: str
    text: str
    speaker: str
    mel: np.ndarray
    f0: np.ndarray
    phones: np.ndarray
    durations: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.mel.shape[0])


def speakers_for(cfg: CorpusConfig) -> list[Speaker]:
    """Draw the training and held-out speakers (voice variant + base prosody) from ``cfg.seed``."""
    variants = [v for v in espeak.voice_variants() if v not in EXCLUDED_VARIANTS]
    need = cfg.n_train_speakers + cfg.n_test_speakers
    if not variants:
        raise SpeechError("eSpeak's data has no voice variants (voices/!v); reinstall espeakng-loader")
    rng = np.random.default_rng([cfg.seed, 1])
    picked = [variants[i] for i in rng.permutation(len(variants))]
    picked = (picked * (need // len(picked) + 1))[:need]
    out = []
    for i, v in enumerate(picked):
        out.append(Speaker(
            name=f"s{i:02d}", voice=f"{cfg.base_voice}+{v}",
            rate=int(rng.integers(*cfg.rate_range)), pitch=int(rng.integers(*cfg.pitch_range)),
            range=int(rng.integers(*cfg.range_range)), held_out=i >= cfg.n_train_speakers))
    return out


def frame_durations(starts: list[int], n_frames: int, hop: int) -> np.ndarray:
    """Per-phone frame counts from sample onsets: round onsets to frames, at least 1 frame each
    (taken from the longest phone), summing to ``n_frames``."""
    p = len(starts)
    if p > n_frames:
        raise SpeechError(f"{p} phones cannot fit in {n_frames} frames; the utterance is too short")
    bounds = np.clip(np.round(np.asarray(starts, np.float64) / hop).astype(np.int64), 0, n_frames)
    bounds = np.maximum.accumulate(bounds)
    bounds[0] = 0
    d = np.diff(np.append(bounds, n_frames))
    while (d < 1).any():
        short = int(np.argmin(d))
        long_ = int(np.argmax(d))
        d[short] += 1
        d[long_] -= 1
    return d.astype(np.int32)


def analyse(utt: espeak.Utterance, mel_cfg: audio.MelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-mel (T, n_mels), F0 (T,), durations (P,) of one synthesized utterance."""
    n_frames = len(utt.samples) // mel_cfg.hop
    x = utt.samples[: n_frames * mel_cfg.hop]
    mel = np.array(audio.log_mel(x, mel_cfg))
    f0 = audio.f0_autocorrelation(x, mel_cfg)
    d = frame_durations([ph.start for ph in utt.phones], n_frames, mel_cfg.hop)
    return mel, f0, d


def _voice_for(spk: Speaker, rng: np.random.Generator, cfg: CorpusConfig) -> espeak.VoiceSettings:
    rate = int(round(spk.rate * (1 + rng.uniform(-cfg.rate_jitter, cfg.rate_jitter))))
    pitch = int(np.clip(spk.pitch + rng.integers(-cfg.pitch_jitter, cfg.pitch_jitter + 1), 0, 100))
    return espeak.VoiceSettings(spk.voice, rate, pitch, spk.range)


def plan(cfg: CorpusConfig, speakers: list[Speaker]) -> list[tuple[str, int, str, Speaker]]:
    """(split, sentence id, text, speaker) for every utterance: train/valid sentences by one training
    speaker each, test sentences by one held-out and one training speaker."""
    texts = sentences(cfg.n_sentences, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2])
    order = rng.permutation(len(texts))
    n_test, n_valid = cfg.n_test, cfg.n_valid
    split_of = {int(i): ("test" if k < n_test else "valid" if k < n_test + n_valid else "train")
                for k, i in enumerate(order)}
    seen = [s for s in speakers if not s.held_out]
    unseen = [s for s in speakers if s.held_out]
    jobs = []
    for sid, text in enumerate(texts):
        split = split_of[sid]
        jobs.append((split, sid, text, seen[int(rng.integers(len(seen)))]))
        if split == "test" and unseen:
            jobs.append((split, sid, text, unseen[sid % len(unseen)]))
    return jobs


def build(out: str | Path, cfg: CorpusConfig = CorpusConfig(), progress: bool = True,
          log: Callable[[str], None] = print) -> Path:
    """Synthesize and analyse the corpus into ``out`` (reused when it exists with the same settings)."""
    out = Path(out)
    if (out / META).exists():
        meta = json.loads((out / META).read_text())
        if meta.get("config") == cfg.fingerprint():
            log(f"corpus {out} is up to date ({len(meta['utterances'])} utterances); reusing it")
            return out
    mel_cfg = audio.MelConfig(**cfg.mel)
    speakers = speakers_for(cfg)
    jobs = plan(cfg, speakers)
    rng = np.random.default_rng([cfg.seed, 3])
    arrays = {s: {"mel": [], "f0": [], "phones": [], "durations": []} for s in SPLITS}
    records, symbols = [], set()
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="synthesize", unit="utt", dynamic_ncols=True)
    for uid, (split, sid, text, spk) in enumerate(it):
        voice = _voice_for(spk, rng, cfg)
        utt = espeak.synthesize(text, voice)
        mel, f0, dur = analyse(utt, mel_cfg)
        symbols.update(p.symbol for p in utt.phones)
        a = arrays[split]
        a["mel"].append(mel.astype(np.float16))
        a["f0"].append(f0)
        a["phones"].append(utt.phones)
        a["durations"].append(dur)
        records.append({"uid": uid, "split": split, "sentence": sid, "text": text, "speaker": spk.name,
                        "voice": asdict(voice), "frames": int(mel.shape[0]), "phones": len(utt.phones)})
    inv = Inventory.from_symbols(symbols)
    train_mel = np.concatenate(arrays["train"]["mel"]).astype(np.float32)
    stats = {"mean": train_mel.mean(axis=0).tolist(), "std": np.maximum(train_mel.std(axis=0), 1e-3).tolist()}
    with atomic_folder(out) as tmp:
        for split in SPLITS:
            a = arrays[split]
            if not a["mel"]:
                continue
            tensors = {
                "mel": np.concatenate(a["mel"]),
                "f0": np.concatenate(a["f0"]).astype(np.float32),
                "phones": np.concatenate([inv.encode(p) for p in a["phones"]]),
                "durations": np.concatenate(a["durations"]).astype(np.int32),
                "frames": np.array([len(m) for m in a["mel"]], np.int32),
                "n_phones": np.array([len(p) for p in a["phones"]], np.int32),
            }
            mx.save_safetensors(str(tmp / f"{split}.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
        meta = {"config": cfg.fingerprint(), "speakers": [asdict(s) for s in speakers],
                "inventory": inv.symbols, "mel_stats": stats, "utterances": records}
        (tmp / META).write_text(json.dumps(meta))
    hours = sum(r["frames"] for r in records) * mel_cfg.hop / mel_cfg.sample_rate / 3600
    log(f"corpus {out}: {len(records)} utterances, {hours:.2f} h, {len(inv)} phoneme symbols, "
        f"{len(speakers)} speakers ({cfg.n_test_speakers} held out)")
    return out


@dataclass
class Corpus:
    """A loaded corpus: utterances per split with normalised mels, plus its metadata."""

    folder: Path
    meta: dict
    splits: dict

    @property
    def inventory(self) -> Inventory:
        return Inventory(self.meta["inventory"])

    @property
    def mel_mean(self) -> np.ndarray:
        return np.asarray(self.meta["mel_stats"]["mean"], np.float32)

    @property
    def mel_std(self) -> np.ndarray:
        return np.asarray(self.meta["mel_stats"]["std"], np.float32)

    @property
    def mel_config(self) -> audio.MelConfig:
        return audio.MelConfig(**self.meta["config"]["mel"])

    def speakers(self, held_out: bool | None = None) -> list[str]:
        return [s["name"] for s in self.meta["speakers"] if held_out is None or s["held_out"] == held_out]

    def by_speaker(self, split: str) -> dict[str, list[Utt]]:
        out: dict[str, list[Utt]] = {}
        for u in self.splits.get(split, []):
            out.setdefault(u.speaker, []).append(u)
        return out


def load(folder: str | Path) -> Corpus:
    """Read a corpus written by :func:`build`; mels are normalised to per-bin std ``SIGMA_DATA``."""
    folder = Path(folder)
    if not (folder / META).exists():
        raise SpeechError(f"{folder} is not a speech corpus (no {META}); build one with `mlx-elm speech build-data`")
    meta = json.loads((folder / META).read_text())
    mean = np.asarray(meta["mel_stats"]["mean"], np.float32)
    std = np.asarray(meta["mel_stats"]["std"], np.float32)
    recs: dict[str, list[dict]] = {}
    for r in meta["utterances"]:
        recs.setdefault(r["split"], []).append(r)
    splits = {}
    for split, rs in recs.items():
        t = {k: np.array(v) for k, v in mx.load(str(folder / f"{split}.safetensors")).items()}
        fo = np.concatenate([[0], np.cumsum(t["frames"])])
        po = np.concatenate([[0], np.cumsum(t["n_phones"])])
        utts = []
        for i, r in enumerate(rs):
            mel = (t["mel"][fo[i] : fo[i + 1]].astype(np.float32) - mean) / std * SIGMA_DATA
            utts.append(Utt(r["uid"], split, r["text"], r["speaker"], mel, t["f0"][fo[i] : fo[i + 1]],
                            t["phones"][po[i] : po[i + 1]], t["durations"][po[i] : po[i + 1]]))
        splits[split] = utts
    return Corpus(folder, meta, splits)
