"""What long work shows a person: one rich console on stderr for messages and progress bars.

Every long verb (extract, train, eval, run, compare, cost) reports through `say` and `progress`
here, so output looks the same everywhere and `--quiet` (progress=False) silences it all.
"""

from __future__ import annotations

import warnings
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


def quiet_transformers() -> None:
    """Silence what transformers tells developers (deprecations, generation-config notes): it
    says nothing a user of microdistill can act on, and would fill every run's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers(\.|$)")
    # Raised inside transformers but attributed to torch's Module.__call__: match it by message.
    # `past_key_values` works throughout the transformers 5 versions we support; its new name does not.
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
