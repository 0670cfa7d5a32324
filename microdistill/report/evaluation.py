"""The evaluation report rendered: report.json (the numbers), report.md and PNG plots a person can open.

    microdistill eval --student runs/demo/student --data runs/demo/shards --out runs/demo/eval

evaluate/ measures, flows/eval.py runs it; this module renders the dict it is given, with the
cost and confidence sections it is handed (report/cost.py, report/confidence.py). Plots use
matplotlib's Figure directly (no pyplot), so no GUI backend is needed on servers or in tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from microdistill.core.files import atomic_write_bytes, atomic_write_json
from microdistill.plan.cost import Analysis
from microdistill.report.confidence import confidence_section
from microdistill.report.format import pct, save_plot, smooth


OLD_KEYS = {"kl": "divergence", "w_kl": "w_div"}  # metrics.jsonl keys before the divergence was named so


def _renamed(row: dict) -> dict:
    return {OLD_KEYS.get(k, k): v for k, v in row.items()}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """A student's metrics.jsonl split into per-step rows and per-epoch evaluation rows."""
    path = Path(path)
    if not path.is_file():
        return [], []
    rows = [_renamed(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval") and r.get("val_examples")]


def plot_learning_curves(steps: list[dict], evals: list[dict], path: Path) -> str:
    """2x2 PNG: losses, accuracies (per step and per epoch), the curriculum and learning rate,
    and held-out agreement per field per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 7.5), dpi=110)
    (a_loss, a_acc), (a_sched, a_field) = fig.subplots(2, 2)
    x = np.array([r["step"] for r in steps])
    terms = (("loss", "loss"), ("divergence", "divergence term"), ("ce", "CE term"), ("hidden", "hidden-state MSE"))
    for key, label in terms:
        if steps and key in steps[0]:
            a_loss.plot(x, [r[key] for r in steps], label=label, lw=1)
    losses = [r[k] for r in steps for k, _ in terms if k in r]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 30:
        a_loss.set_yscale("log")  # only when the losses span decades; a short run reads better linear
    a_loss.set(title="training loss per step", xlabel="step")
    if steps:
        acc = np.array([r["acc"] for r in steps])
        a_acc.plot(x, acc, color="tab:blue", alpha=0.25, lw=0.8)
        a_acc.plot(x, smooth(acc, max(len(acc) // 50, 1)), color="tab:blue", label="token accuracy (train batches)")
    ex = [r["step"] for r in evals]
    if evals:
        a_acc.plot(ex, [r["val_token_acc"] for r in evals], "o-", color="tab:green", label="held-out token accuracy")
        a_acc.plot(ex, [r["val_exact_match"] for r in evals], "s-", color="tab:red", label="held-out exact match")
    a_acc.set(title="accuracy", xlabel="step", ylim=(-0.02, 1.02))
    if steps:
        a_sched.plot(x, [r["w_div"] for r in steps], color="tab:purple", label="w_div (divergence weight)")
        lr = a_sched.twinx()
        lr.plot(x, [r["lr"] for r in steps], color="tab:orange", lw=1, label="learning rate (right axis)")
        lr.set_ylabel("learning rate")
        # One legend for both axes, where both curves have decayed away from it.
        handles = a_sched.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
        a_sched.legend(handles=handles, loc="lower left", fontsize=8)
    a_sched.set(title="curriculum and learning rate", xlabel="step", ylabel="w_div", ylim=(-0.02, 1.02))
    fields = sorted({k for r in evals for k in r.get("val_field_agreement", {})})
    for name, marker in zip(fields, "osD^v<>p*hX" * 4):
        # Fields often agree equally: distinct markers tell overlapping lines apart.
        a_field.plot([r["epoch"] + 1 for r in evals], [r["val_field_agreement"].get(name) for r in evals],
                     marker=marker, ms=5, alpha=0.85, label=name)
    a_field.set(title="held-out agreement per field", xlabel="epoch", ylim=(-0.02, 1.02))
    a_field.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (a_loss, a_acc, a_field):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    for ax in (a_loss, a_acc, a_sched, a_field):
        ax.grid(alpha=0.3)
    return save_plot(fig, Path(path))


def plot_confusion(name: str, conf: dict, agreement: float, path: Path) -> str:
    """PNG of one field's confusion matrix: counts, shaded by the share of each teacher row."""
    from matplotlib.figure import Figure

    m = np.array(conf["matrix"], dtype=float)
    rows, cols = conf["labels"], conf["columns"]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(1.3 + 1.1 * len(cols), 1.2 + 0.8 * len(rows)), dpi=110)
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel="student", ylabel="teacher", title=f"{name}: agreement {agreement:.1%}")
    return save_plot(fig, Path(path))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "field"


# ---- Markdown -------------------------------------------------------------------------------------
def scaled(n: float | None, units: tuple[tuple[str, float], ...], smallest: str) -> str:
    """`n` in the largest unit it reaches, e.g. 12.7M parameters or 90.9 MB; "—" when unknown."""
    if n is None:
        return "—"
    return next((f"{n / size:.1f}{unit}" for unit, size in units if n >= size), f"{n:.0f}{smallest}")


def count(n: float | None) -> str:
    return scaled(n, (("G", 1e9), ("M", 1e6), ("K", 1e3)), "")


def nbytes(n: float | None) -> str:
    return scaled(n, ((" GB", 1e9), (" MB", 1e6), (" kB", 1e3)), " B")


def times(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}×"


def _quality_md(r: dict) -> list[str]:
    lo_hi = r.get("student_only_exact_ci95")
    ci = f" (95% interval {pct(lo_hi[0])}–{pct(lo_hi[1])})" if lo_hi else ""
    lines = [
        "## Agreement with the teacher", "",
        "| metric | value |", "|---|---|",
        f"| student-only exact match of the whole object (greedy, constrained) | {pct(r['student_only_exact'])}{ci} |",
        f"| teacher-forced token accuracy | {pct(r['teacher_forced_token_acc'])} |",
        f"| valid JSON with the grammar | {pct(r['valid_json_constrained'])} |",
        f"| valid JSON without the grammar | {pct(r['valid_json_unconstrained'])} |",
        "", "### Per field", "", "| field | agreement (exact) | chrF (free text) |", "|---|---|---|",
        *(f"| {name} | {pct(f['agreement'])} | {'—' if f.get('chrf') is None else format(f['chrf'], '.1f')} |"
          for name, f in r["fields"].items()),
    ]
    lines += _peers_md(r)
    groups = r.get("exact_by_teacher_certainty")
    if groups:
        lines += ["", "### Where the teacher hesitates", "",
                  "Exact match by how sure the teacher was of its own answer (its probability of its least sure "
                  "value, from the shards' decision points). Where it hesitates, small differences between inputs "
                  "decide its answer, and that is where a student disagrees most.", "",
                  "| held-out examples | n | student-only exact match |", "|---|---|---|"]
        lines += [f"| {g['group']} | {g['n']} | {pct(g['exact']) if g['exact'] is not None else '—'} |" for g in groups]
    plots = r["plots"].get("confusion", {})
    if plots:
        lines += ["", "Confusion matrices: rows are the teacher's value, columns the student's.", ""]
        lines += [f"![confusion matrix of {name}]({file})" for name, file in plots.items()]
    if r["human"]:
        lines += ["", "## Against human labels", "", "| field | examples | teacher | student |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {pct(v['teacher_acc'])} | {pct(v['student_acc'])} |" for k, v in r["human"].items()]
    return lines


def _interval(ci) -> str:
    return f"{pct(ci[0])}–{pct(ci[1])}" if ci else "—"


def _peers_md(r: dict) -> list[str]:
    """The student beside the obvious alternatives and the teacher's own consistency."""
    peers, ceiling = r.get("peers"), r.get("teacher_consistency")
    if not peers and not ceiling and not r.get("student_consistency"):
        return []
    lines = ["", "### Beside the peers and the ceiling", "",
             "Peers learn from the same teacher answers (train split) and are scored on the same held-out inputs. "
             "The ceiling is the teacher's consistency with itself: the share of held-out inputs whose answer it "
             "keeps when the input is edited without changing its meaning (trailing punctuation, the case of the "
             "first letter, a doubled space); a student cannot agree with flips it does not make.", "",
             "| | exact match of the whole object | 95% interval |", "|---|---|---|",
             f"| **student** | **{pct(r['student_only_exact'])}** | {_interval(r.get('student_only_exact_ci95'))} |"]
    lines += [f"| peer: {p['name']} | {pct(p['exact_match'])} | {_interval(p['exact_ci95'])} |" for p in peers or []]
    for who, c in (("teacher", ceiling), ("student", r.get("student_consistency"))):
        if c and c.get("consistent") is not None:
            edits = ", ".join(f"{k} {pct(v['changed'])}" for k, v in c["edits"].items() if v["changed"] is not None)
            lines.append(f"| {who}'s self-consistency ({c['n']} inputs; answer changed by: {edits}) | "
                         f"{pct(c['consistent'])} | {_interval(c['consistent_ci95'])} |")
    return lines


def _speed_md(r: dict) -> list[str]:
    s, z, m = r["speed"], r["size"], r["memory"]
    st, tt = s["student"], s["teacher"] or {}
    rows = [
        ("latency p50, batch 1", f"{tt['p50_ms']:.1f} ms" if tt else "—", f"{st['p50_ms']:.1f} ms", times(s["speedup_p50"])),
        ("latency p95, batch 1", f"{tt['p95_ms']:.1f} ms" if tt else "—", f"{st['p95_ms']:.1f} ms",
         times(tt["p95_ms"] / st["p95_ms"]) if tt else "—"),
        (f"throughput, batch {st['batch']}", f"{tt['per_s']:.1f}/s" if tt else "—", f"{st['per_s']:.1f}/s",
         times(s["speedup_throughput"])),
        ("parameters", count(z["teacher_params"]), count(z["student_params"]), times(z["params_ratio"])),
        ("size on disk", nbytes(z["teacher_bytes"]), nbytes(z["student_bytes"]), times(z["ratio"])),
        ("weights in memory", nbytes(m["teacher_weights_bytes"]), nbytes(m["student_weights_bytes"]),
         times(m["teacher_weights_bytes"] / m["student_weights_bytes"]) if m["teacher_weights_bytes"] else "—"),
        ("peak memory growth", nbytes(m["teacher_rss_bytes"]), nbytes(m["student_rss_bytes"]), times(m["ratio"])),
    ]
    # Last column: how many times better the student is (shorter, faster, smaller), whichever way round.
    lines = ["## Teacher vs student", "", "| | teacher | student | student's advantage |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", f"Measured in the same process on the same {st['n']} inputs (torch threads: {s.get('torch_threads', '?')}), "
              f"constrained greedy decoding for both; peak memory is {m['method']}."]
    if tt.get("same_output_as_shards") is not None:
        lines.append(f"The timed teacher gave the shards' answer on {pct(tt['same_output_as_shards'])} of them.")
    return lines


def markdown(r: dict, cost_md: str | None = None, confidence_md: str | None = None) -> str:
    teacher = f"teacher `{r['teacher']['name']}`" if r.get("teacher") else "the teacher that labelled the shards"
    split = "held-out" if r["split"] == "val" else "TRAINING (nothing was held out)"
    lines = [f"# Evaluation: {r['task']}", "",
             f"Student `{r['student']['path']}` ({r['student'].get('preset') or r['student'].get('kind') or 'custom'}, "
             f"{count(r['size']['student_params'])} parameters) against {teacher}, on {r['n_eval']} {split} examples.", ""]
    for w in r["warnings"]:
        lines += [f"> **Warning:** {w}", ""]
    lines += [*_quality_md(r), "", *([confidence_md.rstrip(), ""] if confidence_md else []), *_speed_md(r), ""]
    if "learning_curves" in r["plots"]:
        lines += ["## Learning curves", "", f"![learning curves]({r['plots']['learning_curves']})", ""]
    if cost_md:
        lines += [cost_md.rstrip(), ""]
    if r["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in r["notes"]), ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path, metrics_path: Path, cost_md: str | None = None,
                 analysis: Analysis | None = None) -> dict:
    """Write report.json, report.md and the plots into `out_dir`; returns the report with `plots`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**report, "notes": list(report.get("notes", []))}
    plots: dict[str, Any] = {"confusion": {}}
    for name, f in report["fields"].items():
        if f["confusion"] is not None:
            plots["confusion"][name] = plot_confusion(name, f["confusion"], f["agreement"], out_dir / f"confusion_{slug(name)}.png")
    steps, evals = read_metrics(metrics_path)
    if steps or evals:
        plots["learning_curves"] = plot_learning_curves(steps, evals, out_dir / "learning_curves.png")
    else:
        report["notes"].append(f"no learning curves: {metrics_path} is missing or empty")
    if cost_md and (out_dir / "cost.png").is_file():
        plots["cost"] = "cost.png"
    confidence_md, confidence_plots = confidence_section(report, out_dir, analysis)  # report/confidence.py
    report["plots"] = {**plots, **confidence_plots}
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_bytes(out_dir / "report.md", markdown(report, cost_md, confidence_md).encode())
    return report
