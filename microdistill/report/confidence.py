"""The report's confidence section: reliability before and after calibration, and what a cascade
keeps at each agreement it must reach, with its cost.

    microdistill eval --student runs/demo/student --data runs/demo/shards   # report.md, reliability.png, coverage.png

evaluate.py measures (confidence.assess on the held-out inputs: cross-fitted calibrated
confidences, their ECE and the agreement-against-coverage curve); this module draws it and
prices it with the cost model of cost.py. In a cascade the student reads every call and the
teacher answers those it escalates, so 1,000 calls cost 1,000 student calls plus the
escalated share of 1,000 teacher calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microdistill.students.confidence import point_for, threshold_of
from microdistill.plan.cost import Analysis
from microdistill.core.files import save_figure

TARGETS = (0.95, 0.97, 0.99)


def per_thousand(analysis: Analysis | None, coverage: float) -> float | None:
    """USD per 1,000 calls when the student keeps `coverage` of them and the teacher answers the rest."""
    if analysis is None:
        return None
    return 1000 * (analysis.student.usd + (1 - coverage) * analysis.teacher.usd)


def plot_reliability(conf: dict[str, Any], path: Path) -> Path:
    """Accuracy against mean confidence per bin, before and after temperature scaling."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5), dpi=110)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for key, label, marker in (("before", "raw softmax", "o"), ("after", "temperature-scaled (cross-fitted)", "s")):
        rows = [r for r in conf["reliability"][key] if r["n"]]
        ece = conf[f"ece_{key}"]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], f"{marker}-",
                label=f"{label}: ECE {100 * ece:.1f}%")
    ax.set(xlabel="confidence (mean per bin)", ylabel="agreement with the teacher", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"reliability over every field, {conf['n']} held-out inputs")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_coverage(curve: list[dict[str, Any]], path: Path) -> Path:
    """Agreement with the teacher against the share of calls the student keeps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    ax.plot([p["coverage"] for p in curve], [p["agreement"] for p in curve], "-", label="all answers (cascade)")
    kept = [p for p in curve if p["kept_agreement"] is not None]
    ax.plot([p["coverage"] for p in kept], [p["kept_agreement"] for p in kept], "--", label="the student's own answers")
    for t in TARGETS:
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="share of calls the student answers", ylabel="agreement with the teacher", xlim=(0, 1), ylim=(0.5, 1.01),
           title="agreement against coverage (held-out inputs)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def confidence_section(report: dict[str, Any], out_dir: Path, analysis: Analysis | None) -> tuple[str | None, dict]:
    """(Markdown starting with a level-2 heading, {plot name: file}) for report["confidence"];
    (None, {}) when the evaluation has none (a decoder student)."""
    conf = report.get("confidence")
    if not conf:
        return None, {}
    plots = {"reliability": plot_reliability(conf, Path(out_dir) / "reliability.png").name,
             "coverage": plot_coverage(conf["curve"], Path(out_dir) / "coverage.png").name}
    usd = lambda x: "—" if x is None else f"${x:.4g}"  # noqa: E731
    lines = [
        "## Confidence and the cascade", "",
        f"Each field's confidence is its softmax maximum after temperature scaling. On the {conf['n']} held-out "
        f"inputs the expected calibration error (all fields pooled, {conf['ece_bins']} bins) is "
        f"**{100 * conf['ece_before']:.2f}%** raw and **{100 * conf['ece_after']:.2f}%** after scaling, measured by "
        f"{conf['ece_after_method']}.", "",
        "| field | ECE raw | ECE scaled | temperature (fitted on all) |", "|---|---|---|---|",
        *(f"| {k} | {100 * v['ece_before']:.2f}% | {100 * v['ece_after']:.2f}% | {conf['temperatures'][k]:.2f} |"
          for k, v in conf["fields"].items()),
        "", f"![reliability diagram]({plots['reliability']})", "",
        "The student answers a call when every field's confidence reaches a threshold; the teacher answers the rest. "
        "The threshold for each target is the lowest that reaches it on these same inputs, so on new traffic the "
        "agreement it buys scatters around the target.", "",
        "| target agreement | threshold | student answers | agreement (all answers) | student's own agreement "
        "| cost per 1,000 calls |", "|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        p = point_for(conf["curve"], t)
        th = "all to the teacher" if p["threshold"] is None else f"{threshold_of(p):.3f}"
        own = "—" if p["kept_agreement"] is None else f"{100 * p['kept_agreement']:.1f}%"
        lines.append(f"| {100 * t:.0f}% | {th} | {100 * p['coverage']:.1f}% | {100 * p['agreement']:.1f}% | {own} "
                     f"| {usd(per_thousand(analysis, p['coverage']))} |")
    if analysis is not None:
        lines += ["", f"Cost per 1,000 calls: the teacher alone {usd(1000 * analysis.teacher.usd)}, the student alone "
                      f"{usd(1000 * analysis.student.usd)} (the cost model of the Cost section); in the cascade the "
                      "student reads every call and the teacher answers the escalated ones."]
    else:
        lines += ["", "No cost column: the cost model needs the run's logs (see the notes)."]
    lines += ["", f"![agreement against coverage]({plots['coverage']})"]
    return "\n".join(lines) + "\n", plots
