"""What every report shares: percentages as people read them, noisy curves smoothed, plots saved as PNG.

The evaluation report (evaluation.py) and the comparison (compare.py) both use these, so a
figure reads the same in report.md and compare.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from microdistill.core.files import save_figure


def save_plot(fig, path: Path) -> str:
    """Save `fig` as a PNG at `path`; returns the file name, as report.md and compare.md link it."""
    return save_figure(fig, path).name


def smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing moving average over up to `n` points (per-batch accuracy is noisy)."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    k = np.minimum(i, n)
    return (c[i] - c[i - k]) / k


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"
