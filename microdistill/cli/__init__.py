"""The `microdistill` command: a thin layer over the library; each verb builds a config and calls one function.

    microdistill --help

The verbs are listed in the order of the work: make a student (distil.py), use it (deploy.py),
study whether and how to distil (study.py). Every flag that sets an option is generated from its
config class (verbs.py), so its default and help are the class's; library modules are imported
inside each verb, so `--help` never imports torch.
"""

from __future__ import annotations

import sys

import typer

from microdistill.cli import deploy, distil, study
from microdistill.cli.verbs import fail
from microdistill.core.errors import UserError, user_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil one narrow LLM call into a tiny, fast student model.",
)
for verbs in (distil.VERBS, deploy.VERBS, study.VERBS):  # typer lists them as they are added
    for name, command in verbs.items():
        app.command(name)(command)


@app.callback()
def _root() -> None:
    """Distil one narrow LLM call into a tiny, fast student model."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted; finished work is saved, re-run the same command to continue", err=True)
        sys.exit(130)
    except (UserError, ModuleNotFoundError) as e:
        if user_message(e) is None:
            raise
        fail(user_message(e))  # outside the typer app a typer.Exit would not be handled: exit directly


if __name__ == "__main__":
    main()
