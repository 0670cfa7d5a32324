"""report/evaluation.py on a hand-made evaluation: report.md states the figures, report.json is the input
plus its plots, the plots are real PNG files, and old metrics files still read."""

from __future__ import annotations

import copy
import json

import pytest

from microdistill.report.evaluation import markdown, read_metrics, slug, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def make_report(teacher: bool = True) -> dict:
    """What evaluate.evaluate returns, for a two-field task (one enum, one string field)."""
    t_speed = {"p50_ms": 120.0, "p95_ms": 150.0, "per_s": 8.0, "n": 16, "batch": 16, "same_output_as_shards": 0.9375}
    return {
        "task": "demo-task", "split": "val", "n_eval": 96,
        "student_only_exact": 0.8333333333333334, "student_only_exact_ci95": [0.7451, 0.8951],
        "exact_by_teacher_certainty": [
            {"group": "teacher sure (every field ≥ 80%)", "n": 80, "exact": 0.9},
            {"group": "teacher unsure (some field < 80%)", "n": 16, "exact": None},
        ],
        "teacher_forced_token_acc": 0.9712, "valid_json_constrained": 1.0, "valid_json_unconstrained": 0.875,
        "fields": {
            "tone of voice": {"agreement": 0.90625, "confusion": {
                "labels": ["aggressive", "neutral"], "columns": ["aggressive", "neutral", "(invalid)"],
                "matrix": [[10, 3, 1], [5, 77, 0]]}},
            "summary": {"agreement": 0.5, "confusion": None},
        },
        "human": {"tone of voice": {"teacher_acc": 0.75, "student_acc": 0.7, "n": 40}},
        "speed": {"student": {"p50_ms": 2.0, "p95_ms": 3.0, "per_s": 400.0, "n": 16, "batch": 16},
                  "teacher": t_speed if teacher else None,
                  "speedup_p50": 60.0 if teacher else None, "speedup_throughput": 50.0 if teacher else None,
                  "torch_threads": 2},
        "size": {"student_params": 1_234_567, "student_bytes": 4_900_000,
                 "teacher_params": 494_000_000 if teacher else None, "teacher_bytes": 988_000_000 if teacher else None,
                 "ratio": 988 / 4.9 if teacher else None, "params_ratio": 494_000_000 / 1_234_567 if teacher else None},
        "memory": {"student_rss_bytes": 50_000_000, "student_weights_bytes": 4_900_000,
                   "teacher_rss_bytes": 2_000_000_000 if teacher else None,
                   "teacher_weights_bytes": 1_976_000_000 if teacher else None,
                   "ratio": 40.0 if teacher else None, "method": "peak growth of the resident memory"},
        "student": {"path": "runs/demo/student", "preset": "micro", "config": {"epochs": 10}},
        "teacher": {"spec": "tiny", "name": "tiny-teacher"} if teacher else None,
        "warnings": ["only 96 held-out examples"], "notes": ["a note from evaluate"],
    }


def write_metrics(path, old_keys: bool = False) -> None:
    div, w = ("kl", "w_kl") if old_keys else ("divergence", "w_div")
    rows = [{"step": s, "epoch": s // 5, "loss": 2.0 / s, div: 1.5 / s, "ce": 0.5 / s, "acc": 0.5 + s / 40,
             w: 0.9 - 0.08 * s, "lr": 1e-3} for s in range(1, 11)]
    rows.insert(5, {"eval": True, "step": 5, "epoch": 0, "val_examples": 96, "val_token_acc": 0.9,
                    "val_exact_match": 0.7, "val_field_agreement": {"tone of voice": 0.8, "summary": 0.4}})
    rows.append({"eval": True, "step": 10, "epoch": 1, "val_examples": 96, "val_token_acc": 0.97,
                 "val_exact_match": 0.83, "val_field_agreement": {"tone of voice": 0.9, "summary": 0.5}})
    rows.append({"eval": True, "step": 10, "epoch": 1, "val_examples": 0})  # nothing held out: not an eval row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")


def test_read_metrics_renames_old_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, old_keys=True)
    steps, evals = read_metrics(path)
    assert len(steps) == 10 and [e["step"] for e in evals] == [5, 10]
    assert all("kl" not in r and "w_kl" not in r for r in steps)
    assert steps[0]["divergence"] == 1.5 and steps[0]["w_div"] == pytest.approx(0.82)
    new = tmp_path / "new.jsonl"
    write_metrics(new)
    assert read_metrics(new) == (steps, evals)  # old and new files read the same
    assert read_metrics(tmp_path / "missing.jsonl") == ([], [])


def test_markdown_states_the_figures():
    r = {**make_report(), "plots": {"confusion": {"tone of voice": "confusion_tone_of_voice.png"},
                                    "learning_curves": "learning_curves.png"}}
    md = markdown(r, cost_md="## Cost\n\n| figure | value | basis |\n")
    assert md.startswith("# Evaluation: demo-task\n")
    assert "on 96 held-out examples" in md and "teacher `tiny-teacher`" in md and "1.2M parameters" in md
    assert ("| student-only exact match of the whole object (greedy, constrained) | 83.33% "
            "(95% interval 74.51%–89.51%) |") in md
    assert "| teacher-forced token accuracy | 97.12% |" in md
    assert "| valid JSON without the grammar | 87.50% |" in md
    assert "| tone of voice | 90.62% |" in md and "| summary | 50.00% |" in md
    assert "| teacher unsure (some field < 80%) | 16 | — |" in md
    assert "| tone of voice | 40 | 75.00% | 70.00% |" in md
    assert "| latency p50, batch 1 | 120.0 ms | 2.0 ms | 60.0× |" in md
    assert "| parameters | 494.0M | 1.2M | 400.1× |" in md
    assert "| size on disk | 988.0 MB | 4.9 MB | 201.6× |" in md
    assert "The timed teacher gave the shards' answer on 93.75% of them." in md
    assert "![confusion matrix of tone of voice](confusion_tone_of_voice.png)" in md
    assert "![learning curves](learning_curves.png)" in md
    assert "> **Warning:** only 96 held-out examples" in md
    assert "## Cost" in md and "- a note from evaluate" in md


def test_markdown_without_a_timed_teacher():
    r = {**make_report(teacher=False), "plots": {"confusion": {}}}
    md = markdown(r)
    assert "against the teacher that labelled the shards" in md
    assert "| latency p50, batch 1 | — | 2.0 ms | — |" in md
    assert "| parameters | — | 1.2M | — |" in md
    assert "## Learning curves" not in md and "## Cost" not in md


def test_write_report_files(tmp_path):
    metrics = tmp_path / "student" / "metrics.jsonl"
    metrics.parent.mkdir()
    write_metrics(metrics, old_keys=True)  # a student trained before the rename still plots
    report = make_report()
    before = copy.deepcopy(report)
    out = tmp_path / "eval"
    returned = write_report(report, out, metrics)
    assert report == before  # the caller's dict is not changed
    name = f"confusion_{slug('tone of voice')}.png"
    assert name == "confusion_tone_of_voice.png"
    plots = {"confusion": {"tone of voice": name}, "learning_curves": "learning_curves.png"}
    assert returned == {**before, "plots": plots}
    assert json.loads((out / "report.json").read_text()) == {**before, "plots": plots}
    for png in (name, "learning_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    assert not (out / "confusion_summary.png").exists()  # a string field has no confusion matrix
    md = (out / "report.md").read_text()
    assert md == markdown(returned)
    assert "83.33% (95% interval 74.51%–89.51%)" in md
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", "report.md", name, "learning_curves.png"])


def test_write_report_without_metrics_says_so(tmp_path):
    report = make_report(teacher=False)
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    returned = write_report(report, tmp_path / "eval", missing)
    assert "learning_curves" not in returned["plots"]
    assert returned["notes"] == ["a note from evaluate", f"no learning curves: {missing} is missing or empty"]
    assert report["notes"] == ["a note from evaluate"]
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved == returned
    assert f"- no learning curves: {missing} is missing or empty" in (tmp_path / "eval" / "report.md").read_text()


def test_write_report_links_an_existing_cost_plot(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "cost.png").write_bytes(PNG)
    returned = write_report(make_report(), out, tmp_path / "none.jsonl", cost_md="## Cost\n\nsome table\n")
    assert returned["plots"]["cost"] == "cost.png"
    assert "## Cost\n\nsome table" in (out / "report.md").read_text()
    # without a cost section there is no cost plot to link, even if the file is there
    assert "cost" not in write_report(make_report(), out, tmp_path / "none.jsonl")["plots"]


def test_a_log_scale_plot_prints_no_font_warnings(tmp_path):
    """Mathtext tick labels look for fonts some matplotlib builds lack; the fallback's warnings
    must not reach the user's terminal (a fresh process: matplotlib warns once per process)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from pathlib import Path; from matplotlib.figure import Figure; "
            "from microdistill.core.files import save_figure; fig = Figure(); ax = fig.add_subplot(); "
            "ax.plot([1, 10, 1000], [1, 2, 3]); ax.set_xscale('log'); save_figure(fig, Path(sys.argv[1]))")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.png")], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "p.png").stat().st_size > 1000 and "findfont" not in p.stderr
