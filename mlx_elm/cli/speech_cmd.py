"""``mlx-elm speak`` and ``mlx-elm speech build-data | train | eval``: parse, call mlx_elm.speech, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mlx_elm.errors import SpeechError

speech_app = typer.Typer(help="Consistency-model text-to-speech (FlashSpeech-style): data, training, evaluation.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command()(speak)
    app.add_typer(speech_app, name="speech")


def _err(text: str) -> None:
    typer.echo(text, err=True)


def _peak_mb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 2**20


def speak(
    text: Optional[str] = typer.Argument(None, help="What to say (read from stdin when omitted)."),
    output: Path = typer.Option(Path("speech.wav"), "--output", "-o", help="WAV file to write (16-bit mono)."),
    prompt: Optional[Path] = typer.Option(None, "--prompt", help="WAV of the voice to imitate (1.5-3 s is best); "
                                          "default: the model's own voice."),
    steps: int = typer.Option(2, "--steps", help="Network evaluations: 1 or 2 for consistency sampling "
                              "(1-64 with --sampler euler/heun)."),
    alpha: float = typer.Option(0.2, "--alpha", help="Prosody diversity in [0, 2]: 0 = regression only, "
                                "1 = a full sample of the residual."),
    seed: int = typer.Option(0, "--seed", help="Random seed (noise of the prosody and acoustic samplers)."),
    speed: float = typer.Option(1.0, "--speed", help="Speaking rate factor in [0.25, 4] (2 = twice as fast)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Speech model folder (default: the shipped one)."),
    sampler: str = typer.Option("consistency", "--sampler", help="consistency, euler or heun."),
    gl_iters: int = typer.Option(32, "--gl-iters", help="Griffin-Lim iterations in [0, 500]."),
    vocoder: Optional[Path] = typer.Option(None, "--vocoder", help="HiFi-GAN folder from `mlx-elm speech "
                                           "convert-hifigan` instead of Griffin-Lim."),
) -> None:
    """Speak text into a WAV file with the shipped consistency model (or --model)."""
    import mlx.core as mx

    from mlx_elm.speech import audio, pipeline

    if text is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise SpeechError("no text given; pass it as an argument or pipe it in: echo hi | mlx-elm speak -o hi.wav")
        text = sys.stdin.read()
    if not 0.25 <= speed <= 4.0:
        raise SpeechError(f"--speed must be between 0.25 and 4, got {speed}")
    if sampler == "consistency" and steps > 8:
        raise SpeechError(f"--steps {steps} is too many for consistency sampling; use 1 or 2 (or --sampler heun)")
    if output.suffix.lower() != ".wav":
        raise SpeechError(f"--output {output} must end in .wav")
    pipeline.validate_options(steps, alpha, gl_iters, 1.0 / speed)
    if prompt is not None and not prompt.is_file():
        raise SpeechError(f"prompt file {prompt} does not exist; pass a WAV file of the target voice")
    mx.reset_peak_memory()
    result = pipeline.synthesize(text, model=model, prompt=prompt, steps=steps, alpha=alpha, seed=seed,
                                   sampler=sampler, gl_iters=gl_iters, duration_scale=1.0 / speed, vocoder=vocoder)
    audio.write_wav(output, result.samples, result.sample_rate)
    t = result.timings
    stages = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in t.items())
    typer.echo(f"wrote {output}: {result.seconds:.2f} s of audio, {len(result.phones)} phones, "
               f"RTF {result.rtf:.3f} ({stages}), peak memory {_peak_mb():.0f} MB")


@speech_app.command("convert-hifigan")
def convert_hifigan_cmd(
    checkpoint: Path = typer.Argument(..., help="HiFi-GAN generator checkpoint (g_XXXXXXXX, torch zip format)."),
    config: Path = typer.Argument(..., help="Its config.json."),
    out: Path = typer.Argument(..., help="MLX vocoder folder to write."),
) -> None:
    """Convert a public PyTorch HiFi-GAN generator (22.05 kHz, 80 mels, hop 256) for --vocoder."""
    from convert import convert_hifigan

    if not checkpoint.is_file():
        raise SpeechError(f"{checkpoint} does not exist; pass a HiFi-GAN generator checkpoint")
    typer.echo(f"wrote {convert_hifigan(checkpoint, config, out)}")


@speech_app.command("build-data")
def build_data(
    out: Path = typer.Argument(..., help="Corpus folder to write (reused when it holds the same settings)."),
    sentences: int = typer.Option(2600, "--sentences", help="Distinct sentences (>= 30)."),
    valid: int = typer.Option(100, "--valid", help="Validation sentences."),
    test: int = typer.Option(100, "--test", help="Test sentences (spoken by seen and by held-out voices)."),
    train_speakers: int = typer.Option(40, "--train-speakers", help="Training voices (>= 2)."),
    test_speakers: int = typer.Option(10, "--test-speakers", help="Held-out voices for zero-shot tests (>= 1)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of sentences, voices and prosody."),
) -> None:
    """Synthesize an eSpeak NG corpus: mels, exact phone durations, F0, voices, splits."""
    from mlx_elm.speech import corpus

    if sentences < 30 or valid < 1 or test < 1 or valid + test >= sentences:
        raise SpeechError("need --sentences >= 30 and 1 <= --valid, --test with valid + test < sentences")
    if train_speakers < 2 or test_speakers < 1:
        raise SpeechError("need --train-speakers >= 2 and --test-speakers >= 1")
    cfg = corpus.CorpusConfig(n_sentences=sentences, n_valid=valid, n_test=test, n_train_speakers=train_speakers,
                              n_test_speakers=test_speakers, seed=seed)
    corpus.build(out, cfg, log=typer.echo)


@speech_app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Corpus folder from `mlx-elm speech build-data` (built with "
                              "the default settings when it does not exist yet)."),
    out: Path = typer.Option(Path("runs/speech"), "--out", help="Run folder (one subfolder per stage)."),
    stages: str = typer.Option(",".join(("recognizer", "speaker", "edm", "ct", "act", "prosody")), "--stages",
                               help="Comma-separated stages, in order; add ct-continue for the ACT ablation."),
    edm_steps: int = typer.Option(600, "--edm-steps", help="Denoising warm-start steps (0 = from-scratch CT)."),
    ct_steps: int = typer.Option(250, "--ct-steps"),
    act_steps: int = typer.Option(80, "--act-steps"),
    prosody_steps: int = typer.Option(150, "--prosody-steps"),
    recognizer_steps: int = typer.Option(1000, "--recognizer-steps"),
    speaker_steps: int = typer.Option(300, "--speaker-steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    faithful_weighting: bool = typer.Option(False, "--faithful-weighting", help="iCT's raw 1/dsigma weight "
                                            "instead of its batch-normalised form."),
    denoise_weight: float = typer.Option(0.2, "--denoise-weight", help="Denoising term added to CT (0 = pure CT)."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue started stages from checkpoints."),
    export: Optional[Path] = typer.Option(None, "--export", help="Also write the shippable folders here."),
) -> None:
    """Train the judges and the TTS stages (each resumable; Ctrl-C saves a checkpoint)."""
    from mlx_elm.speech import corpus, training

    names = [s.strip() for s in stages.split(",") if s.strip()]
    for s in names:
        if s not in training.STAGES + training.ABLATIONS:
            raise SpeechError(f"unknown stage '{s}'; choose from {', '.join(training.STAGES + training.ABLATIONS)}")
    for name, v in (("--ct-steps", ct_steps), ("--act-steps", act_steps), ("--prosody-steps", prosody_steps),
                    ("--recognizer-steps", recognizer_steps), ("--speaker-steps", speaker_steps),
                    ("--batch-size", batch_size)):
        if v < 1:
            raise SpeechError(f"{name} must be >= 1, got {v}")
    if edm_steps < 0 or denoise_weight < 0:
        raise SpeechError("--edm-steps and --denoise-weight must not be negative")
    if edm_steps == 0:
        names = [s for s in names if s != "edm"]
    stage_cfg = training.StageConfig(faithful_weighting=faithful_weighting, denoise_weight=denoise_weight)
    rc = training.RecipeConfig(recognizer_steps=recognizer_steps, speaker_steps=speaker_steps, edm_steps=edm_steps,
                               ct_steps=ct_steps, act_steps=act_steps, prosody_steps=prosody_steps,
                               batch_size=batch_size, seed=seed, stage=stage_cfg)
    if not (data / corpus.META).exists():
        corpus.build(data, corpus.CorpusConfig(), log=typer.echo)
    c = corpus.load(data)
    training.run_recipe(c, out, rc, stages=tuple(names), resume=resume, log=typer.echo,
                        from_scratch=edm_steps == 0)
    if export is not None:
        folder = training.export(out, export, c)
        typer.echo(f"exported {folder}")


@speech_app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Corpus folder (its test split is used)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Speech model folder (default: shipped)."),
    recognizer: Optional[Path] = typer.Option(None, "--recognizer", help="Phone recognizer folder (default: shipped)."),
    speaker: Optional[Path] = typer.Option(None, "--speaker", help="Speaker encoder folder (default: shipped)."),
    n: int = typer.Option(40, "--n", help="Test utterances per voice group (seen / held-out), >= 1."),
    configs: str = typer.Option("cm:1,cm:2,cm:4,euler:4,euler:8,euler:16,euler:32,heun:8",
                                "--configs", help="sampler:steps list (cm = consistency)."),
    alphas: str = typer.Option("0,0.2,0.5,1", "--alphas", help="Diversity factors for the prosody study."),
    vocoded: bool = typer.Option(True, "--vocoded/--no-vocoded", help="Also score the Griffin-Lim output of cm:2."),
    alpha: float = typer.Option(0.2, "--alpha", help="Prosody diversity used for the sampler comparison."),
    rtf: bool = typer.Option(True, "--rtf/--no-rtf", help="Also time the whole pipeline on a fixed sentence."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the full report as JSON here."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Score held-out sentences and voices: MCD, PER, speaker similarity, prosody diversity, RTF."""
    from mlx_elm.atomic import atomic_file
    from mlx_elm.speech import corpus, evaluate

    if n < 1:
        raise SpeechError(f"--n must be >= 1, got {n}")
    try:
        cfgs = [(s.split(":")[0], int(s.split(":")[1])) for s in configs.split(",") if s.strip()]
        alpha_list = [float(a) for a in alphas.split(",") if a.strip()]
    except (IndexError, ValueError):
        raise SpeechError("--configs must look like cm:1,cm:2,euler:8 and --alphas like 0,0.2,1") from None
    report = evaluate.run(corpus.load(data), model, recognizer, speaker, n=n, configs=cfgs, alphas=alpha_list,
                          vocoded=vocoded, seed=seed, alpha=alpha, rtf=rtf, log=_err)
    for line in evaluate.format_report(report):
        typer.echo(line)
    if out is not None:
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        typer.echo(f"report written to {out}")
