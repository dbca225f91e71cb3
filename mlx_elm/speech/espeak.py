"""eSpeak NG through its C API (ctypes): speech with exact per-phoneme sample boundaries.

The library and its data come from the ``espeakng-loader`` wheel (see
:func:`mlx_elm.platform.espeak_paths`), so nothing beyond pip is needed. eSpeak is initialised in
synchronous mode with phoneme events: every ``espeakEVENT_PHONEME`` carries the phoneme mnemonic
and the absolute sample index where it starts, which gives durations without an aligner. The same
event stream phonemizes text at inference time (the audio of that pass is thrown away), so
training and inference see identical symbols.

eSpeak keeps global state (one voice, one callback), so one process-wide engine serialises calls.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_elm import platform
from mlx_elm.errors import SpeechError

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_EV_LIST_TERMINATED, _EV_WORD, _EV_PHONEME = 0, 1, 7
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
PAUSE = "_"  # the silence symbol (eSpeak spells short/long pauses "_" and "_:")


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class VoiceSettings:
    """An eSpeak voice (``language+variant``) with its rate (words/min), pitch and range (0-100)."""

    name: str = "en-us"
    rate: int = 175
    pitch: int = 50
    range: int = 50


@dataclass(frozen=True)
class Phone:
    """One phoneme event: base symbol, stress (0 none, 1 primary, 2 secondary), word start, onset sample."""

    symbol: str
    stress: int
    word_start: bool
    start: int


@dataclass
class Utterance:
    """Synthesized speech: float32 samples in [-1, 1], the rate, and phones covering [0, len)."""

    samples: np.ndarray
    sample_rate: int
    phones: list[Phone]


def split_stress(name: str) -> tuple[str, int]:
    """``"'oU"`` -> ``("oU", 1)``, ``",oU"`` -> ``("oU", 2)``; pauses are folded into one symbol."""
    stress = 0
    while name and name[0] in "',":
        stress = 1 if name[0] == "'" else 2
        name = name[1:]
    if name.startswith("_"):
        return PAUSE, 0
    return name, stress


class _Engine:
    """The process-wide eSpeak instance (lazy, thread-safe)."""

    def __init__(self) -> None:
        lib_path, data_path = platform.espeak_paths()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise SpeechError(f"cannot load eSpeak NG from {lib_path} ({e}); reinstall espeakng-loader") from e
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(Path(data_path)).encode(), _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise SpeechError(f"eSpeak NG failed to initialise with data {data_path}; reinstall espeakng-loader")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, str]] = []
        self._cb = _CALLBACK(self._callback)  # keep a reference: eSpeak calls it from C
        self.lib.espeak_SetSynthCallback(self._cb)
        self.lock = threading.Lock()
        self._voice: str | None = None

    def _callback(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EV_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EV_PHONEME:
                self._events.append((_EV_PHONEME, ev.sample, ev.id.string.decode("utf-8", "replace")))
            elif ev.type == _EV_WORD:
                self._events.append((_EV_WORD, ev.sample, ""))
            i += 1
        return 0

    def synthesize(self, text: str, voice: VoiceSettings) -> Utterance:
        with self.lock:
            if voice.name != self._voice:
                if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                    raise SpeechError(f"eSpeak NG has no voice '{voice.name}'; use e.g. en-us or en-us+m3")
                self._voice = voice.name
            for param, value in ((_PARAM_RATE, voice.rate), (_PARAM_PITCH, voice.pitch), (_PARAM_RANGE, voice.range)):
                self.lib.espeak_SetParameter(param, int(value), 0)
            self._chunks, self._events = [], []
            data = text.encode("utf-8")
            err = self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
            self.lib.espeak_Synchronize()
            if err != 0:
                raise SpeechError(f"eSpeak NG could not synthesize the text (error {err}); simplify the text")
            chunks, events = self._chunks, self._events
        samples = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
        return Utterance(samples, self.sample_rate, _phones_from_events(events, len(samples)))


def _phones_from_events(events: list[tuple[int, int, str]], n_samples: int) -> list[Phone]:
    """Phones with monotone starts covering [0, n_samples): a leading pause fills the start, a
    zero-length final pause is dropped, consecutive pauses are merged."""
    phones: list[Phone] = []
    word_start = False
    for kind, sample, name in events:
        if kind == _EV_WORD:
            word_start = True
            continue
        symbol, stress = split_stress(name)
        start = min(max(sample, phones[-1].start if phones else 0), n_samples)
        if symbol == PAUSE and phones and phones[-1].symbol == PAUSE:
            continue  # "_:" then "_": one pause
        if symbol != PAUSE:
            phones.append(Phone(symbol, stress, word_start, start))
            word_start = False
        else:
            phones.append(Phone(PAUSE, 0, False, start))
    if phones and phones[0].start > 0:
        phones.insert(0, Phone(PAUSE, 0, False, 0))
    elif phones and phones[0].symbol != PAUSE:
        phones[0] = Phone(phones[0].symbol, phones[0].stress, phones[0].word_start, 0)
    while len(phones) > 1 and phones[-1].start >= n_samples:
        phones.pop()
    return phones


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def engine() -> _Engine:
    """The shared eSpeak engine (initialised on first use)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def synthesize(text: str, voice: VoiceSettings = VoiceSettings()) -> Utterance:
    """Speak ``text`` with eSpeak NG and return samples plus exact phone onsets."""
    return engine().synthesize(text, voice)


def phonemize(text: str, voice: VoiceSettings = VoiceSettings()) -> list[Phone]:
    """Phones of ``text`` from eSpeak's event stream (sample onsets are those of ``voice``)."""
    return synthesize(text, voice).phones


def voice_variants() -> list[str]:
    """Names of the voice variants shipped with eSpeak's data (``en-us+NAME`` selects one)."""
    _, data = platform.espeak_paths()
    folder = Path(data) / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
