"""What long work shows a person: one rich console on stderr for messages and progress bars.

Every long verb (extract, train, eval, run, compare, cost) reports through `say` and `progress`
here, so output looks the same everywhere and `--quiet` (progress=False) silences it all.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def say(message: str, enabled: bool = True) -> None:
    """One line of progress on stderr (nothing when `enabled` is False)."""
    if enabled:
        console().print(message, markup=False)


def progress(enabled: bool, what: str, total: int):
    """A rich progress bar with rate and ETA, and its task id; a disabled bar when not `enabled`.
    Update the `rate` field with a string such as "1.52 ex/s"."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console(),
        disable=not enabled,
    )
    return bar, bar.add_task(what, total=total, rate="")
