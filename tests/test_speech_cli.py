"""`mlx-elm speak` on the shipped model, the API's timings, and one-line errors for bad input."""

from __future__ import annotations

import sys
import wave

import numpy as np
import pytest

from mlx_elm.cli import main as cli
from mlx_elm.speech import audio, espeak, files, pipeline
from mlx_elm.speech.evaluate import Judges, phone_error_rate
from mlx_elm.speech.text import Inventory

shipped = pytest.mark.skipif(not (files.DEFAULT_MODEL / "model.safetensors").exists(),
                             reason="the shipped speech model is not in this checkout")


def _run(monkeypatch, capsys, *args, stdin=None):
    monkeypatch.setattr(sys, "argv", ["mlx-elm", *args])
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@shipped
def test_speak_writes_a_wav_whose_length_follows_the_predicted_durations(tmp_path, monkeypatch, capsys):
    out = tmp_path / "hi.wav"
    code, stdout, _ = _run(monkeypatch, capsys, "speak", "The small garden was quiet today.", "-o", str(out),
                           "--seed", "3")
    assert code == 0 and "RTF" in stdout and "peak memory" in stdout
    with wave.open(str(out)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == 22050
        n = w.getnframes()
    r = pipeline.synthesize("The small garden was quiet today.", seed=3)
    assert n == len(r.samples) == int(r.durations.sum()) * 256
    assert len(r.durations) == len(r.phones) and r.durations.min() >= 1


@shipped
@pytest.mark.xfail(reason="target not met: the shipped model, trained ~1,000 steps on a loaded 2-core CPU, is "
                          "not yet intelligible to the recognizer (PER > 1, docs/speech.md)", strict=True)  # a pass means: remove the mark
def test_the_recognizer_hears_the_input_phonemes_in_the_output():
    syn = pipeline.Synthesizer()
    judges = Judges(None, None)
    text = "Did the careful teacher see a yellow kitten near the station?"
    r = syn(text, steps=2, seed=0)
    mel = np.array(syn.normalise(audio.log_mel(r.samples)))
    index = {s: i for i, s in enumerate(judges.labels)}
    ref = [index.get(p, -1) for p in r.phones if p != espeak.PAUSE]
    per = phone_error_rate(judges.transcript(mel), ref)
    assert per < 0.5, f"phone error rate {per:.2f} of the vocoded output"


@shipped
def test_speak_reads_stdin_and_the_api_reports_stage_timings(tmp_path, monkeypatch, capsys):
    code, stdout, _ = _run(monkeypatch, capsys, "speak", "-o", str(tmp_path / "a.wav"), "--steps", "1",
                           stdin="Hello from standard input.")
    assert code == 0 and (tmp_path / "a.wav").exists()
    r = pipeline.synthesize("Hello there.", steps=1, alpha=0.0)
    assert set(r.timings) == {"frontend", "prosody", "acoustic", "vocoder"} and r.rtf > 0


@pytest.mark.parametrize("args,needle", [
    (["speak", "caf\u00e9 \u4e2d\u6587", "-o", "x.wav"], "unsupported character"),
    (["speak", "   ", "-o", "x.wav"], "empty"),
    (["speak", "hello", "-o", "x.wav", "--prompt", "missing.wav"], "does not exist"),
    (["speak", "hello", "-o", "x.wav", "--steps", "0"], "--steps"),
    (["speak", "hello", "-o", "x.wav", "--alpha", "5"], "--alpha"),
    (["speak", "hello", "-o", "x.mp3"], ".wav"),
])
def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(monkeypatch, capsys, *args)
    assert code == 1 and needle in err and err.strip().count("\n") == 0


@shipped
def test_a_bad_prompt_file_gives_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.wav").write_bytes(b"not a wav at all")
    audio.write_wav(tmp_path / "short.wav", np.zeros(100, np.float32), 22050)
    for name, needle in (("bad.wav", "not a readable PCM WAV"), ("short.wav", "at least 0.25 s")):
        code, _, err = _run(monkeypatch, capsys, "speak", "hello", "-o", str(tmp_path / "o.wav"),
                            "--prompt", str(tmp_path / name))
        assert code == 1 and needle in err and err.strip().count("\n") == 0


@shipped
def test_a_prompt_wav_changes_the_voice_and_is_resampled(tmp_path):
    u = espeak.synthesize("This is my voice, listen to it.", espeak.VoiceSettings("en-us+f3", 170, 70, 60))
    audio.write_wav(tmp_path / "ref.wav", audio.resample(u.samples, 22050, 16000), 16000)
    a = pipeline.synthesize("A quiet river.", prompt=tmp_path / "ref.wav", seed=1)
    b = pipeline.synthesize("A quiet river.", seed=1)
    assert np.isfinite(a.samples).all()
    assert a.mel.shape != b.mel.shape or not np.allclose(a.mel, b.mel)  # the prompt changes the output


def test_inventory_maps_unknown_phones_to_the_unknown_id():
    inv = Inventory.from_symbols(["a", "b"])
    ids = inv.encode([espeak.Phone("a", 1, True, 0), espeak.Phone("zz", 0, False, 5)])
    assert ids.tolist() == [[2, 1, 1], [1, 0, 0]]
