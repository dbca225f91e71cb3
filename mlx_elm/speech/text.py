"""Text in, phoneme ids out: input validation, the phoneme inventory, and offline sentences.

Text is checked at the edge (``check_text``) so a user sees one line naming the character to fix;
phonemes come from eSpeak NG's event stream (:mod:`mlx_elm.speech.espeak`). A phone is three ids:
its symbol, its stress (0 none, 1 primary, 2 secondary) and whether it starts a word.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass

import numpy as np

from mlx_elm.errors import SpeechError
from mlx_elm.speech import espeak

PAD, UNK = "<pad>", "<unk>"
ALLOWED = set(string.ascii_letters + string.digits + " \t\n.,;:!?'\"-()&%$/")
MAX_CHARS = 2000


def check_text(text: str) -> str:
    """Normalise whitespace and typographic quotes; refuse empty text and characters we cannot speak."""
    if text is None or not text.strip():
        raise SpeechError("the text is empty; pass a sentence, e.g. mlx-elm speak \"Hello there.\" -o hi.wav")
    text = unicodedata.normalize("NFKC", text)
    for a, b in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2013", "-"), ("\u2014", "-")):
        text = text.replace(a, b)
    for i, ch in enumerate(text):
        if ch not in ALLOWED:
            raise SpeechError(f"unsupported character {ch!r} (U+{ord(ch):04X}) at position {i}; "
                              "use English letters, digits and .,;:!?'\"-()&%$/ only")
    if len(text) > MAX_CHARS:
        raise SpeechError(f"the text has {len(text)} characters; split it into pieces of at most {MAX_CHARS}")
    if not any(ch.isalnum() for ch in text):
        raise SpeechError("the text has no letters or digits to speak; pass a sentence")
    return " ".join(text.split())


@dataclass
class Inventory:
    """Phoneme symbols known to a model (index 0 padding, 1 unknown)."""

    symbols: list[str]

    def __post_init__(self):
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_symbols(cls, seen) -> "Inventory":
        return cls([PAD, UNK] + sorted(set(seen) - {PAD, UNK}))

    def encode(self, phones: list[espeak.Phone]) -> np.ndarray:
        """(P, 3) int32 rows of (symbol id, stress, word start)."""
        return np.array([[self.index.get(p.symbol, 1), p.stress, int(p.word_start)] for p in phones],
                        dtype=np.int32).reshape(-1, 3)

    def decode(self, ids) -> list[str]:
        return [self.symbols[int(i)] if 0 <= int(i) < len(self.symbols) else UNK for i in ids]

    def __len__(self) -> int:
        return len(self.symbols)


# --- offline sentences -----------------------------------------------------------------------

_NAMES = ("Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maya Noah Olga Paul Quinn Rosa Sam "
          "Tara Victor Wendy Yusuf Zoe Martin Laura Oscar Nina Peter Sofia").split()
_ADJ = ("small large bright quiet heavy gentle ancient modern yellow purple silver golden narrow wide curious "
        "careful lazy happy tired clever strange simple busy empty frozen warm cold hidden famous broken "
        "early distant lovely noisy sudden").split()
_NOUN = ("river mountain garden window teacher doctor engine village kitten bottle letter window planet "
         "forest market ladder pencil rabbit island harbour kitchen bridge candle feather journey machine "
         "orchestra painter question sandwich thunder umbrella valley whistle zebra ocean morning voice "
         "picture station blanket dragon music").split()
_VERB_T = ("found carried painted watched opened borrowed followed repaired described noticed cleaned "
           "visited admired counted packed moved measured answered chased dropped").split()
_VERB_I = ("laughed waited slept smiled arrived vanished travelled listened shouted danced whispered "
           "wandered returned trembled").split()
_ADV = ("slowly quickly quietly suddenly carefully happily early again together outside yesterday today "
        "tonight sometimes rarely").split()
_PLACE = ("near the station", "in the garden", "under the bridge", "by the river", "at the market",
          "on the island", "behind the house", "across the valley", "inside the kitchen", "along the road")
_NUM = ("two three four five seven nine twelve twenty forty a hundred").split()


def _np(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.25:
        return str(rng.choice(_NAMES))
    det = rng.choice(["the", "a", "my", "her", "his", "our", "that", "every"])
    adj = f"{rng.choice(_ADJ)} " if rng.random() < 0.6 else ""
    if r < 0.35:
        return f"{rng.choice(_NUM)} {adj}{rng.choice(_NOUN)}s"
    noun = rng.choice(_NOUN)
    if det == "a" and (adj or noun)[0] in "aeiou":
        det = "an"
    return f"{det} {adj}{noun}"


def sentence(rng: np.random.Generator) -> str:
    """One grammatical English sentence from a small grammar (statements, questions, exclamations)."""
    form = rng.random()
    adv = f" {rng.choice(_ADV)}" if rng.random() < 0.4 else ""
    place = f" {rng.choice(_PLACE)}" if rng.random() < 0.4 else ""
    if form < 0.45:
        s = f"{_np(rng)} {rng.choice(_VERB_T)} {_np(rng)}{adv}{place}."
    elif form < 0.65:
        s = f"{_np(rng)} {rng.choice(_VERB_I)}{adv}{place}."
    elif form < 0.8:
        s = f"Did {_np(rng)} see {_np(rng)}{place}?"
    elif form < 0.9:
        s = f"{_np(rng)} {rng.choice(_VERB_I)}, and then {_np(rng)} {rng.choice(_VERB_T)} {_np(rng)}."
    else:
        s = f"What a {rng.choice(_ADJ)} {rng.choice(_NOUN)} that was!"
    return s[0].upper() + s[1:]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        s = sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
