"""Evaluate a student and write its report: the numbers, a cost section where the run's logs
allow one, report.md and the plots.

    microdistill eval --student runs/demo/student --data runs/demo/shards --out runs/demo/eval

evaluate/ measures, plan/ prices and report/ renders; this module runs them in that order
(`microdistill run` does too, as its last stage).
"""

from __future__ import annotations

from pathlib import Path

from microdistill.core.console import say
from microdistill.evaluate.config import EvalConfig
from microdistill.evaluate.evaluation import evaluate
from microdistill.plan.cost import Analysis, CostConfig, analyse
from microdistill.plan.measured import CostError, RunFiles
from microdistill.report.cost import cost_section_markdown, with_plot
from microdistill.report.evaluation import write_report


def make_report(student_dir: Path, data_dir: Path, out_dir: Path, config: EvalConfig | None = None,
                progress: bool = True) -> dict:
    """Evaluate the student on the shards (evaluate.evaluate) and write the report into
    `out_dir`: report.json, report.md, plots, and a cost section when the logs allow one."""
    report = evaluate(student_dir, data_dir, config, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cost_md, why, analysis = cost_section(student_dir, data_dir, out_dir, report["speed"])
    report["notes"] += [why] if why else []
    say(f"[eval] writing the report to {out_dir}", progress)
    return write_report(report, out_dir, Path(student_dir) / "metrics.jsonl", cost_md, analysis)


def cost_section(student_dir: Path, data_dir: Path, out_dir: Path,
                 speed: dict) -> tuple[str | None, str | None, Analysis | None]:
    """(Markdown of the break-even analysis at example prices, None, the analysis) or (None, why it is missing, None)."""
    parent = Path(student_dir).parent
    run = parent if (parent / "run.json").is_file() else None
    try:
        analysis = analyse(RunFiles.resolve(run, shards=data_dir, student=student_dir), CostConfig(), speed=speed)
    except CostError as e:
        return None, f"no cost section: {e}", None
    analysis = with_plot(analysis, out_dir)
    return cost_section_markdown(analysis), None, analysis
