"""Every command's options against bad values (issue 11, class 9): a result or one line, never a
traceback, a hang, escape bytes on the terminal, or a silently wrong run.

The audit's cases are pinned one by one; a seeded hypothesis search then throws edge values at
every option of every command. Commands run in-process through the real entry point on tiny
inputs, so a value that happens to be valid only costs a tiny run.
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when a command runs longer than ``seconds``."""
    def alarm(signum, frame):
        raise TimeoutError(f"command ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(result) -> None:
    """The contract every command keeps, whatever the input."""
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "\x1b" not in result.stderr.replace("\x1b[31m", "").replace("\x1b[0m", "")  # only our own colour
    assert result.code in (0, 1, 2, 130), result
    if result.code != 0:
        errors = [line for line in result.error_lines if line.startswith("error:")]
        assert len(errors) == 1, result.stderr[-2000:]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, spm_model_path):
    from mlx_elm.train.tiny import make_tiny_openelm, write_text_data

    root = tmp_path_factory.mktemp("fuzz_flags")
    model = make_tiny_openelm(root / "model", spm_model_path, num_transformer_layers=2)
    data = write_text_data(root / "data", n_train=8, n_valid=2, words=8)
    (root / "a_file").write_text("not a folder")
    return {"model": str(model), "data": str(data), "root": root}


def base_commands(inputs, tmp):
    m, d, r = inputs["model"], inputs["data"], inputs["root"]
    return {
        "generate": ["generate", "the sky", "--model", m, "-n", "2"],
        "chat": ["chat", "--model", m, "-n", "2"],
        "lora": ["lora", "--model", m, "--data", d, "--adapter-path", str(tmp / "ad"), "--iters", "1",
                 "--batch-size", "2", "--steps-per-eval", "0", "--save-every", "0", "--no-compile"],
        "ays schedule": ["ays", "schedule", "karras"],
        "ays optimize": ["ays", "optimize", "--denoiser", "gmm:ring8", "--steps", "4", "--mc-samples", "32",
                         "--max-sweeps", "1", "--check-samples", "0", "--out", str(tmp / "s.json")],
        "convert": ["convert", str(r / "missing.pt"), str(tmp / "out")],
        "bench lora": ["bench", "lora", "--workdir", str(tmp / "bl")],
    }


# option -> the commands that take it (numeric ranges checked by the library or typer)
OPTIONS = {
    "generate": ["--max-tokens", "--temp", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                 "--kv-policy", "--kv-capacity", "--kv-window", "--kv-kernel", "--kv-pool", "--kv-bits", "--model",
                 "--weights", "--adapter", "--tokenizer"],
    "chat": ["--temp", "--seed", "--kv-capacity", "--kv-bits"],
    "lora": ["--rank", "--alpha", "--dropout", "--learning-rate", "--grad-accumulation", "--batch-size", "--iters",
             "--epochs", "--warmup", "--max-seq-length", "--seed", "--num-layers", "--targets", "--weight-decay",
             "--grad-clip", "--min-lr", "--val-batches"],
    "ays schedule": ["--steps", "--sigma-min", "--sigma-max"],
    "ays optimize": ["--steps", "--mc-samples", "--check-samples", "--max-ratio", "--max-sweeps", "--solver",
                     "--init", "--seed", "--plot"],
    "convert": ["--dtype", "--bits", "--group-size", "--vocab-size", "--lora-scale", "--max-shard-size", "--preset"],
    "bench lora": ["--model", "--repeats", "--iters", "--rank", "--batch-size"],
}
BAD = ["-1", "0", "-0", str(2**63), str(2**31), "9" * 40, "nan", "inf", "-inf", "1e8", "", "abc", "1.5",
       "\x1b[2J\x1b[31mred", "/proc/self/mem", "a_file/x", "../../../../etc/passwd"]

PINNED = [  # the audit's findings, one by one
    ("generate", ["--seed", "-1"]), ("generate", ["--max-tokens", str(2**63)]), ("generate", ["--model", ""]),
    ("generate", ["--temp", "nan"]), ("generate", ["--top-p", "inf"]), ("lora", ["--rank", str(2**63)]),
    ("lora", ["--iters", str(2**63)]), ("lora", ["--grad-accumulation", str(2**63)]),
    ("lora", ["--learning-rate", "nan"]), ("lora", ["--learning-rate", "inf"]), ("lora", ["--alpha", "nan"]),
    ("lora", ["--seed", "-5"]), ("ays schedule", ["--steps", "100000000"]), ("ays schedule", ["--sigma-max", "inf"]),
    ("ays optimize", ["--mc-samples", "0"]), ("ays optimize", ["--check-samples", "1"]),
    ("bench lora", ["--repeats", "0"]), ("bench lora", ["--model", "X"]), ("convert", ["--vocab-size", "-1"]),
]


@pytest.mark.parametrize("command,extra", PINNED, ids=[f"{c} {' '.join(e)}" for c, e in PINNED])
def test_audit_cases_are_refused_in_one_line(cli, inputs, tmp_path, command, extra):
    args = [a.replace("a_file", str(inputs["root"] / "a_file")) for a in base_commands(inputs, tmp_path)[command] + extra]
    with deadline(60):
        res = cli(*args, input="")
    check(res)
    assert res.code != 0, f"{command} {extra} was accepted"


def test_output_paths_under_a_file_or_in_proc_are_one_line(cli, inputs, tmp_path):
    for out in (inputs["root"] / "a_file" / "s.json", "/proc/mlx-elm-test.json"):
        res = cli("ays", "optimize", "--denoiser", "gmm:ring8", "--steps", "4", "--mc-samples", "32",
                  "--max-sweeps", "1", "--check-samples", "0", "--out", out)
        check(res)
        assert res.code == 1


@st.composite
def flag_values(draw):
    command = draw(st.sampled_from(sorted(OPTIONS)))
    option = draw(st.sampled_from(OPTIONS[command]))
    value = draw(st.sampled_from(BAD) | st.floats(allow_nan=True, allow_infinity=True).map(repr)
                 | st.integers(min_value=-(2**70), max_value=2**70).map(str))
    return command, option, value


@pytest.mark.slow
# no shrink phase: each example runs a CLI command (seconds), and shrinking one failure took over 5 min
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(case=flag_values())
def test_fuzzed_flags_keep_the_contract(cli, inputs, tmp_path_factory, case):
    command, option, value = case
    tmp = tmp_path_factory.mktemp("case")
    value = value.replace("a_file", str(inputs["root"] / "a_file"))
    with deadline(120):
        res = cli(*base_commands(inputs, tmp)[command], option, value, input="")
    check(res)
    if command == "lora" and option == "--learning-rate" and res.code == 0:
        assert math.isfinite(float(value)) and float(value) > 0  # never NaN adapters with exit 0
