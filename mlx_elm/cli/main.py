"""Entry point of ``mlx-elm``: builds the typer app and turns user errors into one line."""

from __future__ import annotations

import sys

import typer

from mlx_elm.errors import MlxElmError

app = typer.Typer(
    name="mlx-elm",
    help="On-device ML toolkit on MLX: OpenELM, converters, SnapKV, LoRA, diffusion, n-grams.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# --- command registration: one line per capability module -------------------------------
from mlx_elm.cli import generate_cmd  # noqa: E402

generate_cmd.register(app)
from mlx_elm.cli import ays_cmd  # noqa: E402
ays_cmd.register(app)
from mlx_elm.cli import bench_cmd  # noqa: E402

bench_cmd.register(app)
from mlx_elm.cli import convert_cmd  # noqa: E402
convert_cmd.register(app)
from mlx_elm.cli import train_cmd  # noqa: E402
train_cmd.register(app)
from mlx_elm.cli import moe_cmd  # noqa: E402
moe_cmd.register(app)
# --- end of command registration ---------------------------------------------------------


def main() -> None:
    """Run the CLI; on Linux first re-exec with OpenBLAS preloaded when that helps."""
    from mlx_elm import platform

    platform.maybe_reexec_with_fast_blas()
    try:
        app()
    except MlxElmError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
