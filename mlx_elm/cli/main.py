"""Entry point of ``mlx-elm``: builds the typer app and turns every user error into one line.

Command modules import the library inside their commands, not at the top: importing mlx-lm
(and through it transformers) costs seconds that ``mlx-elm --help`` should not pay.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from mlx_elm import platform
from mlx_elm.cli import ays_cmd, bench_cmd, convert_cmd, generate_cmd, moe_cmd, speech_cmd, train_cmd, video_cmd
from mlx_elm.errors import MlxElmError

DEBUG_ENV = "MLX_ELM_DEBUG"

app = typer.Typer(
    name="mlx-elm",
    help="On-device ML toolkit on MLX: OpenELM, converters, SnapKV, LoRA, diffusion, n-grams. "
         f"Add --debug (or set {DEBUG_ENV}=1) for the traceback behind an error.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (generate_cmd, convert_cmd, train_cmd, bench_cmd, ays_cmd, speech_cmd, moe_cmd, video_cmd):
    module.register(app)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _is_usage_error(e: BaseException) -> bool:
    """typer's (vendored) click usage errors, without importing a private module."""
    return hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)


def _fail(message: str, code: int, e: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(e)
    typer.secho(f"error: {_one_line(message)}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def main() -> None:
    """Run the CLI; on Linux first re-exec with OpenBLAS preloaded when that helps."""
    asks_for_help = not sys.argv[1:] or any(a in ("--help", "-h") for a in sys.argv[1:])
    if not asks_for_help:  # help computes nothing: skip the re-exec (it doubles the start-up time)
        platform.maybe_reexec_with_fast_blas()
    debug = "--debug" in sys.argv[1:] or bool(os.environ.get(DEBUG_ENV))
    args = [a for a in sys.argv[1:] if a != "--debug"]
    if not asks_for_help:
        platform.warn_if_slow_blas()
    try:
        code = app(args=args, prog_name="mlx-elm", standalone_mode=False)
    except MlxElmError as e:
        _fail(str(e), 1, e, debug)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exception(e)
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # unreadable inputs, unwritable outputs, a full disk
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        _fail(f"{e.strerror or type(e).__name__}:{where}; check the path and its permissions", 1, e, debug)
    except Exception as e:
        if type(e).__name__ == "Abort":  # Ctrl-C inside a typer prompt
            typer.secho("interrupted", err=True)
            sys.exit(130)
        if _is_usage_error(e):
            message = e.format_message()
            if not message:  # e.g. no arguments: typer already printed the help
                sys.exit(e.exit_code)
            command = getattr(getattr(e, "ctx", None), "command_path", "mlx-elm")
            _fail(f"{message} (see: {command} --help)", e.exit_code, e, debug)
        raise
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
