"""The cost analysis rendered: its summary table, the evaluation report's Cost section,
cost.png, cost.json, and the learning-curve forecast's forecast.png.

    microdistill cost runs/demo --calls-per-day 20000

plan/cost.py computes the analysis and plan/forecast.py the forecast; this module only draws and
writes what it is given. Plots use matplotlib's Figure directly (no pyplot), so no GUI backend
is needed on servers or in tests.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from microdistill.core.files import atomic_write_json, save_figure
from microdistill.plan.cost import DAYS_PER_YEAR, Analysis


def usd(x: float) -> str:
    """Money for people: cents for sums, three significant digits for per-call fractions."""
    if abs(x) >= 0.01 or x == 0:
        return f"-${-x:,.2f}" if x < 0 else f"${x:,.2f}"
    return f"${x:.3g}"


def duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f} h" if hours >= 1 else f"{seconds / 60:,.1f} min"


def summary_rows(a: Analysis) -> list[tuple[str, str, str]]:
    """(figure, value, how it was obtained): one source for the CLI table and the report."""
    c, o = a.config, a.one_off
    days, calls = a.break_even_days, a.break_even_calls
    rows = [
        ("calls per day", f"{c.calls_per_day:,.0f}", "assumed"),
        ("teacher cost per call", usd(a.teacher.usd), a.teacher.basis),
        ("student cost per call", usd(a.student.usd), a.student.basis),
        ("teacher cost per day", usd(a.teacher_per_day), ""),
        ("student cost per day", usd(a.student_per_day), ""),
        ("saving per day", usd(a.saving_per_day), ""),
        ("one-off cost of distilling", usd(o.usd),
         f"{o.basis}: extraction {duration(o.extract_s)} x ${c.teacher_usd_per_hour:g}/h"
         f" + training {duration(o.train_s)} x ${c.machine_usd_per_hour:g}/h"),
        ("break-even", "never" if days is None else f"{days:,.1f} days" if days >= 1 else f"{days * 24:.1f} hours", ""),
        ("break-even calls", "never" if calls is None else f"{math.ceil(calls):,}", ""),
        ("first-year saving", usd(a.first_year_saving), "net of the one-off cost"),
    ]
    if a.forecast is not None:
        fc = a.forecast
        need_n = f"{fc['n_needed']:,}" if fc["reachable"] else "not reachable"
        rows.append((f"training examples for {fc['target']:.1%} agreement", need_n,
                     f"learning curve error = {fc['a']:.3g} n^-{fc['b']:.3g}"))
    return rows


def summary_table(a: Analysis):
    """The summary rows as a rich Table, as `microdistill cost` prints them."""
    from rich.table import Table

    table = Table(title="cost of the teacher vs distilling once and serving the student")
    for col in ("figure", "value", "basis"):
        table.add_column(col)
    for row in summary_rows(a):
        table.add_row(*row)
    return table


def cost_section_markdown(a: Analysis) -> str:
    """The cost section of an evaluation report (Markdown, starting with a level-2 heading)."""
    lines = [
        "## Cost",
        "",
        "| figure | value | basis |",
        "|---|---|---|",
        *(f"| {name} | {value} | {basis} |" for name, value, basis in summary_rows(a)),
        "",
        *(f"- {note}\n" for note in a.notes),
        f"Assumed prices: machine ${a.config.machine_usd_per_hour:g}/h (training, student), "
        f"${a.config.teacher_usd_per_hour:g}/h (extraction, local teacher); API ${a.config.api_usd_per_m_input:g} / "
        f"${a.config.api_usd_per_m_output:g} per million input / output tokens. The defaults are examples, not quotes; "
        "re-run with yours: `microdistill cost RUN --calls-per-day N --machine-usd-per-hour P "
        "--api-usd-per-m-input P --api-usd-per-m-output P`.",
    ]
    if a.plot:
        lines += ["", f"![cumulative cost]({Path(a.plot).name})"]
    return "\n".join(lines) + "\n"


def horizon_days(a: Analysis) -> float:
    """A year, or long enough to show the break-even point."""
    days = a.break_even_days
    return max(DAYS_PER_YEAR, 1.25 * days) if days is not None and days < 50 * DAYS_PER_YEAR else DAYS_PER_YEAR


def plot_cumulative(a: Analysis, path: Path) -> Path:
    """PNG of the cumulative cost of calling the teacher vs distilling once then the student."""
    from matplotlib.figure import Figure

    days = np.linspace(0, horizon_days(a), 400)
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(days, a.teacher_per_day * days, label=f"teacher ({usd(a.teacher_per_day)}/day)")
    ax.plot(days, a.one_off.usd + a.student_per_day * days, label=f"distil once + student ({usd(a.student_per_day)}/day)")
    if a.break_even_days is not None:
        ax.axvline(a.break_even_days, color="grey", linestyle=":", label=f"break-even: {a.break_even_days:,.1f} days")
    ax.set_xlabel("days")
    ax.set_ylabel("cumulative cost (USD)")
    ax.set_title(f"{a.config.calls_per_day:,.0f} calls per day")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def with_plot(a: Analysis, out_dir: Path) -> Analysis:
    """The analysis with its cumulative-cost plot drawn into `out_dir/cost.png`."""
    return replace(a, plot=str(plot_cumulative(a, Path(out_dir) / "cost.png")))


def write_cost(a: Analysis, out_dir: Path) -> Analysis:
    """`cost.png` and `cost.json` in `out_dir`; returns the analysis with its plot path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    a = with_plot(a, out_dir)
    atomic_write_json(out_dir / "cost.json", a.to_dict())
    return a


def plot_forecast(fc: dict, path: Path) -> Path:
    """PNG of the pilot's points and the fitted curve, as agreement against examples (log x)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ns = [p[0] for p in fc["points"]]
    hi = max(ns) * 4 if fc["n_needed"] is None else max(max(ns), fc["n_needed"]) * 1.5
    x = np.geomspace(min(ns) / 2, hi, 200)
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(x, 1.0 - np.minimum(fc["a"] * x ** (-fc["b"]), 1.0), label=f"fit: error = {fc['a']:.3g} n^-{fc['b']:.3g}")
    ax.scatter(ns, [p[1] for p in fc["points"]], color="black", zorder=3, label="pilot")
    ax.axhline(fc["target"], color="grey", linestyle="--", label=f"target {fc['target']:.1%}")
    if fc["n_needed"] is not None:
        ax.axvline(fc["n_needed"], color="grey", linestyle=":", label=f"{fc['n_needed']:,} examples")
    ax.set_xscale("log")
    # Labels at 1-2-5 steps: matplotlib's default labels either only decades or overlapping minors.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("teacher-labelled training examples")
    ax.set_ylabel("agreement with the teacher (exact match)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)
