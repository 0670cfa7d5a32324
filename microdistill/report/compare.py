"""The comparison rendered: compare.md, curves.png and efficiency.png from what flows/compare.py measured.

    microdistill compare --data runs/demo/shards --configs curriculum,ce,kd --out runs/demo/compare --max-steps 500

Plots use matplotlib's Figure directly (no pyplot), so no GUI backend is needed on servers or in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microdistill.report.evaluation import read_metrics
from microdistill.report.format import pct, save_plot, smooth


def _style(i: int, marker: bool = False) -> dict[str, Any]:
    # Ten colours, then the same colours dashed: twelve configurations stay distinguishable; equal
    # accuracies overlap exactly, and distinct markers keep the line underneath visible.
    style = {"color": f"C{i % 10}", "ls": "-" if i < 10 else "--"}
    return {**style, "marker": "osD^v<>p*hXP"[i % 12], "ms": 5, "alpha": 0.85} if marker else style


def plot_curves(runs: list[tuple[str, Path]], path: Path) -> str:
    """2x2 PNG, one line per configuration: held-out exact match and token accuracy at each
    epoch's evaluation, and the training loss and CE per step (smoothed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=110)
    (a_exact, a_tok), (a_loss, a_ce) = fig.subplots(2, 2)
    for i, (name, run_dir) in enumerate(runs):
        steps, evals = read_metrics(run_dir / "metrics.jsonl")
        ex = [r["step"] for r in evals]
        a_exact.plot(ex, [r["val_exact_match"] for r in evals], label=name, **_style(i, marker=True))
        a_tok.plot(ex, [r["val_token_acc"] for r in evals], label=name, **_style(i, marker=True))
        x = [r["step"] for r in steps]
        window = max(len(steps) // 25, 1)
        for ax, key in ((a_loss, "loss"), (a_ce, "ce")):
            y = smooth([r[key] for r in steps], window) if steps else []
            ax.plot(x, y, lw=1.2, label=name, **_style(i))
    a_exact.set(title="held-out exact match (each epoch end)", xlabel="step", ylim=(-0.02, 1.02))
    a_tok.set(title="held-out token accuracy, teacher-forced (each epoch end)", xlabel="step", ylim=(-0.02, 1.02))
    a_loss.set(title="training loss per step (each its own objective; smoothed)", xlabel="step")
    a_ce.set(title="training CE on the teacher's token per step (smoothed)", xlabel="step")
    for ax in (a_loss, a_ce):
        lines = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0]
        if lines and max(lines) / min(lines) > 30:
            ax.set_yscale("log")
    for ax in (a_exact, a_tok, a_loss, a_ce):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(runs) > 6 else 1)
    return save_plot(fig, Path(path))


def plot_efficiency(eff: dict[str, list[dict]], path: Path) -> str:
    """Held-out exact match and token accuracy against training examples, one line per configuration."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 4.5), dpi=110)
    a_exact, a_tok = fig.subplots(1, 2)
    sizes = sorted({p["examples"] for points in eff.values() for p in points})
    for i, (name, points) in enumerate(eff.items()):
        n = [p["examples"] for p in points]
        a_exact.plot(n, [p["exact_match"] for p in points], label=name, **_style(i, marker=True))
        a_tok.plot(n, [p["token_acc"] for p in points], label=name, **_style(i, marker=True))
    for ax, what in ((a_exact, "held-out exact match"), (a_tok, "held-out token accuracy")):
        ax.set(title=f"{what} vs training examples", xlabel="training examples (log scale)", xscale="log",
               ylim=(-0.02, 1.02))
        # Ticks at the sizes trained: the log axis would otherwise label them 3×10¹ and so on.
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_plot(fig, Path(path))


def _efficiency_md(eff: dict[str, list[dict]], reference: str = "ce") -> list[str]:
    sizes = sorted({p["examples"] for points in eff.values() for p in points})
    lines = ["## Accuracy vs training examples", "", "Held-out exact match; every run has the same step budget.", "",
             "| configuration | " + " | ".join(str(n) for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, points in eff.items():
        at = {p["examples"]: p["exact_match"] for p in points}
        lines.append(f"| {name} | " + " | ".join(pct(at.get(n)) for n in sizes) + " |")
    if reference in eff and len(eff) > 1:
        best = eff[reference][-1]
        target = best["exact_match"]
        lines += ["", f"Examples each configuration needs to match `{reference}` with all {best['examples']} examples "
                  f"({pct(target)}):", ""]
        for name, points in eff.items():
            hit = next((p["examples"] for p in points if p["exact_match"] >= target), None)
            lines.append(f"- {name}: {hit if hit is not None else 'not reached'}")
    return lines + ["", "![accuracy vs training examples](efficiency.png)", ""]


def _verdict_md(v: dict[str, Any], n: int) -> str:
    if v["margin"] > 0:
        head = (f"**Winner: {v['winner']}**, {100 * v['margin']:+.2f} points of held-out exact match over "
                f"{v['runner_up']}")
    elif v["token_margin"] > 0:
        head = (f"**Winner: {v['winner']}**, tied with {v['runner_up']} on held-out exact match and "
                f"{100 * v['token_margin']:+.2f} points ahead on teacher-forced token accuracy")
    else:
        head = f"**Winner: {v['winner']}**, tied with {v['runner_up']} on both held-out accuracies"
    noisy = v["margin"] < 2 * v["margin_se"]
    return (f"{head}. One standard error of the exact-match difference on {n} held-out examples is about "
            f"{100 * v['margin_se']:.2f} points" + (": within noise." if noisy else "."))


def markdown(result: dict[str, Any]) -> str:
    """compare.md: the runs side by side, the peers, the verdict, and accuracy against data when measured."""
    rows = result["runs"]
    field_names = list(rows[0]["field_agreement"])
    budget = f"{result['max_steps']} steps" if result["max_steps"] else f"{result['epochs']} epochs"
    lines = ["# Distillation methods compared", "",
             f"Shards `{result['data']}` ({result['n_train']} training examples, {rows[0]['val_examples']} held-out scored); "
             f"student preset `{result['preset']}`, seed {result['seed']}, {budget} each.", "",
             "| configuration | held-out exact match | token accuracy | " + " | ".join(field_names)
             + " | train loss | train divergence | train CE | steps | wall time |",
             "|---|" + "---:|" * (len(field_names) + 7)]
    for r in rows:
        div = "—" if r["train_divergence"] is None else f"{r['train_divergence']:.4f}"
        lines.append(f"| {r['name']} | {pct(r['exact_match'])} | {pct(r['token_acc'])} | "
                     + " | ".join(pct(r["field_agreement"][f]) for f in field_names)
                     + f" | {r['train_loss']:.4f} | {div} | {r['train_ce']:.4f} | {r['steps']} | {r['wall_s']:.1f} s |")
    for p in result.get("peers") or []:
        lines.append(f"| peer: {p['name']} | {pct(p['exact_match'])} | — | "
                     + " | ".join(pct(p["fields"][f]) for f in field_names) + " | — | — | — | — | "
                     f"{p['fit_s']:.1f} s |")
    if rows[0].get("chrf"):
        texts = list(rows[0]["chrf"])
        lines += ["", "Free text: chrF (0–100) of the student's text against the teacher's on the same held-out inputs.",
                  "", "| configuration | " + " | ".join(f"chrF {t}" for t in texts) + " |", "|---|" + "---:|" * len(texts)]
        lines += [f"| {r['name']} | " + " | ".join(f"{r['chrf'][t]:.1f}" for t in texts) + " |" for r in rows]
    v = result["verdict"]
    lines.append("")
    if v["runner_up"] is None:
        lines.append(f"Only one configuration: **{v['winner']}**.")
    else:
        lines.append(_verdict_md(v, rows[0]["val_examples"]))
    lines += ["", "Held-out numbers are from each run's last evaluation, training numbers from its last step. "
              "Train loss is each configuration's own objective (w_div·D + (1 − w_div)·CE) and is not comparable "
              "across rows; train CE (on the teacher's token) is. Peer rows are the obvious alternatives, trained on "
              "the same teacher answers and scored on the same held-out inputs: TF-IDF n-grams and frozen "
              "all-MiniLM-L6-v2 embeddings, each with one logistic regression per field.", "",
              "| configuration | what it is |", "|---|---|"]
    lines += [f"| {r['name']} | {r['description']} |" for r in rows]
    lines += ["", "![learning curves](curves.png)", ""]
    if result.get("efficiency"):
        lines += _efficiency_md(result["efficiency"])
    return "\n".join(lines)
