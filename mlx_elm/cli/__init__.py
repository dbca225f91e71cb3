"""The ``mlx-elm`` command line: one typer app, a thin layer over the library."""
