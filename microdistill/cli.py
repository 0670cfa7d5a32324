"""The `microdistill` command: a thin layer over the library; each verb calls one function.

    microdistill --help
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from microdistill.store import StoreError
from microdistill.task import TaskError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil one narrow LLM call into a tiny, fast student model.",
)

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (TaskError, StoreError, FileNotFoundError)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.callback()
def _root() -> None:
    """Distil one narrow LLM call into a tiny, fast student model."""


@app.command()
def tasks() -> None:
    """List the built-in task presets."""
    from microdistill.task import load_task, presets

    for name in presets():
        t = load_task(name)
        typer.echo(f"{name:20s} fields: {', '.join(t.field_names)}")


def main() -> None:
    try:
        app()
    except USER_ERRORS as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.secho("interrupted; finished work is saved, re-run the same command to continue", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
