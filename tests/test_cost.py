"""Break-even arithmetic, run-log readers, time estimates and the learning-curve forecast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import microdistill.flows.cost as cost_flow
import microdistill.train.runs as runs_mod
from microdistill.extract.config import ExtractConfig
from microdistill.flows.cost import measure_throughput, pilot
from microdistill.plan.cost import Analysis, CostConfig, OneOff, PerCall, analyse, api_usd_per_call, estimate_time
from microdistill.plan.forecast import forecast, plan_from_forecast
from microdistill.plan.measured import CostError, RunFiles, Throughput, measure_call_tokens, throughput_from_logs
from microdistill.report.cost import cost_section_markdown, plot_forecast, write_cost

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The fake run: 1,000 examples (900 train) extracted at 10/s in 100 s, trained 3 epochs in 90 s;
# run.json's stage times include model loading, so they are longer than the logs' own.
MANIFEST = {
    "format": "microdistill.shards/1", "shards": [], "teacher": {"name": "fake"},
    "counts": {"examples": 1000, "train": 900, "val": 100},
    "timings": {"extract_s": 100.0, "calibrate_s": 8.0, "examples_per_s": 10.0, "tokens_per_s": 150.0},
}
TRAINING = {"wall_s": 90.0, "steps": 170, "epochs": 3, "tokens": 54000, "tokens_per_s": 600.0}
SPEED = {"teacher": {"p50_ms": 200.0, "p95_ms": 300.0, "per_s": 50.0}, "student": {"p50_ms": 2.0, "p95_ms": 3.0, "per_s": 2000.0}}
RUN = {"stages": {"extract": {"wall_s": 120.0, "done": True}, "train": {"wall_s": 96.0, "done": True}, "eval": {"wall_s": 30.0}}}


def write_run(root: Path, manifest=MANIFEST, training=TRAINING, speed=SPEED, run=RUN) -> Path:
    for sub in ("shards", "student", "eval"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "shards" / "manifest.json").write_text(json.dumps(manifest))
    (root / "student" / "training.json").write_text(json.dumps(training))
    (root / "eval" / "report.json").write_text(json.dumps({"speed": speed, "student_only_exact": 0.9}))
    (root / "run.json").write_text(json.dumps(run))
    return root


def hand_analysis(teacher: float, student: float, one_off: float, calls: float) -> Analysis:
    return Analysis(CostConfig(calls_per_day=calls), PerCall(teacher, "t"), PerCall(student, "s"), OneOff(one_off, 1.0, 1.0, "b"))


# ---- break-even arithmetic -----------------------------------------------------------------------
def test_break_even_hand_computed():
    a = hand_analysis(teacher=0.001, student=0.0001, one_off=45.0, calls=10_000)
    assert a.teacher_per_day == pytest.approx(10.0)
    assert a.student_per_day == pytest.approx(1.0)
    assert a.saving_per_day == pytest.approx(9.0)
    assert a.break_even_days == pytest.approx(5.0)  # 45 / 9
    assert a.break_even_calls == pytest.approx(50_000)  # 45 / 0.0009
    assert a.first_year_saving == pytest.approx(365 * 9 - 45)


def test_student_dearer_than_teacher_never_pays_back():
    a = hand_analysis(teacher=0.001, student=0.002, one_off=10.0, calls=100)
    assert a.break_even_days is None and a.break_even_calls is None
    assert a.first_year_saving == pytest.approx(-365 * 0.1 - 10)
    md = cost_section_markdown(a)
    assert "| break-even | never |" in md


def test_api_price_per_call():
    # 400 input tokens at $0.15/M + 20 output tokens at $0.60/M = (60 + 12) / 1e6
    assert api_usd_per_call(400, 20, 0.15, 0.60) == pytest.approx(72e-6)


# ---- analysis of a run folder --------------------------------------------------------------------
def test_analyse_run_folder_uses_run_log(tmp_path):
    run = write_run(tmp_path / "run")
    cfg = CostConfig(calls_per_day=1000, machine_usd_per_hour=0.36, teacher_machine_usd_per_hour=1.8,
                     input_tokens=400, output_tokens=20)
    a = analyse(RunFiles.resolve(run), cfg)
    assert a.teacher.usd == pytest.approx(72e-6)
    assert a.student.usd == pytest.approx(0.36 * 0.002 / 3600)  # p50 2 ms at $0.36/h
    assert a.one_off.usd == pytest.approx((120 * 1.8 + 96 * 0.36) / 3600)
    assert a.break_even_days == pytest.approx(a.one_off.usd / (1000 * (72e-6 - 0.36 * 0.002 / 3600)))


def test_analyse_falls_back_to_stage_logs_and_local_throughput(tmp_path):
    run = write_run(tmp_path / "run", run={"config": {}})
    cfg = CostConfig(machine_usd_per_hour=0.36, teacher_pricing="local", basis="throughput")
    a = analyse(RunFiles.resolve(run), cfg)
    assert a.one_off.extract_s == pytest.approx(108.0) and a.one_off.train_s == pytest.approx(90.0)
    assert a.teacher.usd == pytest.approx(0.36 / 3600 / 50)
    assert a.student.usd == pytest.approx(0.36 / 3600 / 2000)


def test_measured_tokens_per_call(tmp_path, tiny_tokenizer):
    from synthetic import make_shards

    from microdistill.data.shards import ShardSet

    shards = make_shards(tmp_path / "shards", tiny_tokenizer, n=12)
    records = ShardSet(shards).load()
    task = ShardSet(shards).task()
    # The chat template of the test tokenizer, written out by hand.
    def chatml(text):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in task.messages(text)) + "<|im_start|>assistant\n"

    expect_in = np.mean([len(tiny_tokenizer(chatml(r.text), add_special_tokens=False)["input_ids"]) for r in records])
    expect_out = np.mean([len(r.output_ids) for r in records])
    n_in, n_out = measure_call_tokens(shards)
    assert n_in == pytest.approx(expect_in) and n_out == pytest.approx(expect_out)
    assert n_in > 10 * n_out / 2  # the prompt (system + few-shot) dwarfs a short answer


# ---- estimates -----------------------------------------------------------------------------------
def test_estimate_from_run_with_known_timings(tmp_path):
    run = write_run(tmp_path / "run")
    tp = throughput_from_logs(run / "shards", run / "student")
    assert tp.extract_examples_per_s == pytest.approx(10.0)
    assert tp.train_examples_per_s == pytest.approx(900 * 3 / 90)
    est = estimate_time(100_000, tp)
    assert est.extract_s == pytest.approx(10_000)  # 100,000 / 10
    assert est.train_s == pytest.approx(100_000 * 0.9 * 3 / 30)
    assert estimate_time(100_000, tp, epochs=6).train_s == pytest.approx(2 * est.train_s)

    a = analyse(RunFiles.resolve(run), CostConfig(corpus_size=100_000, machine_usd_per_hour=0.1, input_tokens=400, output_tokens=20))
    assert a.one_off.usd == pytest.approx((10_000 + 9_000) * 0.1 / 3600)


def test_estimate_with_limited_training_uses_logged_examples(tmp_path):
    run = write_run(tmp_path / "run", training={**TRAINING, "examples": 300})
    assert throughput_from_logs(run / "shards", run / "student").train_examples_per_s == pytest.approx(300 * 3 / 90)


def test_step_budget_counts_partial_epoch(tmp_path):
    # 100 examples in batches of 32 = 4 steps an epoch; 6 steps = one epoch + 2 batches (64 examples),
    # and the configured 10 epochs (not the logged partial one) are what a full run would do.
    training = {"train_s": 8.2, "wall_s": 20.0, "steps": 6, "epochs": 2, "examples": 100,
                "config": {"batch_size": 32, "epochs": 10, "max_steps": 6}}
    run = write_run(tmp_path / "run", training=training)
    tp = throughput_from_logs(run / "shards", run / "student")
    assert tp.train_examples_per_s == pytest.approx(164 / 8.2)
    assert tp.epochs == 10


def test_measure_throughput_times_library_stages(tmp_path, monkeypatch):
    calls = {}

    def fake_extract(corpus, out, config, **kw):
        calls["extract"] = (config.task, config.teacher, config.limit)
        Path(out).mkdir(parents=True)
        Path(out, "manifest.json").write_text(json.dumps({**MANIFEST, "counts": {"examples": config.limit, "train": 40, "val": 8}}))

    def fake_train(data_dir, out_dir, config, progress=True):
        calls["train"] = (config.preset, config.max_steps)
        Path(out_dir).mkdir(parents=True)
        Path(out_dir, "training.json").write_text(json.dumps({**TRAINING, "epochs": 2, "wall_s": 4.0}))

    monkeypatch.setattr(cost_flow, "extract", fake_extract)
    monkeypatch.setattr(cost_flow, "train_once", fake_train)
    tp = measure_throughput(tmp_path / "c.jsonl", tmp_path / "m", ExtractConfig(teacher="t"), preset="small", sample=48,
                            train_steps=7)
    assert calls["extract"] == ("reddit-comment", "t", 48)
    assert calls["train"] == ("small", 7)
    assert tp == Throughput(10.0, 40 * 2 / 4.0, 2)


# ---- forecast ------------------------------------------------------------------------------------
def test_forecast_recovers_power_law():
    a, b = 2.0, 0.5
    points = [(n, 1 - a * n**-b) for n in (100, 400, 1600, 6400)]
    fc = forecast(points, target=0.99)
    assert fc["a"] == pytest.approx(a) and fc["b"] == pytest.approx(b)
    assert fc["n_needed"] == 40_000  # (2 / 0.01) ** 2
    cfg = plan_from_forecast(CostConfig(), fc)
    assert cfg.corpus_size == pytest.approx(40_000 / 0.9, abs=1)


def test_forecast_noisy_points_close():
    rng = np.random.default_rng(0)
    points = [(int(n), 1 - 3.0 * n**-0.4 * float(np.exp(rng.normal(0, 0.02)))) for n in np.geomspace(200, 20_000, 8)]
    fc = forecast(points, 0.9)
    assert fc["b"] == pytest.approx(0.4, abs=0.03) and fc["a"] == pytest.approx(3.0, rel=0.2)


def test_forecast_not_reachable_when_error_grows():
    fc = forecast([(100, 0.8), (200, 0.7), (400, 0.6)], 0.95)
    assert fc["b"] < 0 and fc["reachable"] is False and fc["n_needed"] is None
    assert plan_from_forecast(CostConfig(), fc).corpus_size is None


def test_pilot_trains_fractions_and_reads_exact_match(tmp_path, tiny_tokenizer, monkeypatch):
    from synthetic import make_shards

    shards = make_shards(tmp_path / "shards", tiny_tokenizer, n=80)
    limits = []

    def fake_train(data_dir, out_dir, config, resume=False, progress=True):
        limits.append(config.limit_train)
        Path(out_dir).mkdir(parents=True)
        err = 2.0 * config.limit_train**-0.5
        Path(out_dir, "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"epoch": 0, "eval": True, "val_exact_match": 1 - err}) + "\n")
        Path(out_dir, "training.json").write_text(json.dumps({**TRAINING, "config": config.to_dict()}))

    monkeypatch.setattr(runs_mod, "train", fake_train)
    from microdistill.data.shards import ShardSet

    n_train = ShardSet(shards).manifest["counts"]["train"]
    points = pilot(shards, tmp_path / "pilot")
    assert limits == [round(f * n_train) for f in (0.25, 0.5, 1.0)]
    assert [p[0] for p in points] == limits
    assert pilot(shards, tmp_path / "pilot") == points and len(limits) == 3  # finished students are reused
    fc = forecast(points, 0.95)
    assert fc["b"] == pytest.approx(0.5, abs=0.01)


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"calls_per_day": -5}, ["--calls-per-day", "-5"]),
    ({"machine_usd_per_hour": 0}, ["--machine-usd-per-hour", "0"]),
    ({"api_usd_per_m_output": float("nan")}, ["--api-usd-per-m-output"]),
    ({"teacher_pricing": "cheap"}, ["--teacher-pricing", "cheap"]),
])
def test_bad_rates_are_one_line_errors(kwargs, words):
    with pytest.raises(CostError) as e:
        CostConfig(**kwargs)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_missing_logs_name_file_and_key(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CostError, match="no run.json"):
        RunFiles.resolve(tmp_path / "empty")
    timings = {k: v for k, v in MANIFEST["timings"].items() if k != "extract_s"}
    run = write_run(tmp_path / "run", manifest={**MANIFEST, "timings": timings}, run={})
    with pytest.raises(CostError, match=r"manifest.json: missing key 'timings.extract_s'"):
        analyse(RunFiles.resolve(run), CostConfig(input_tokens=1, output_tokens=1))
    run2 = write_run(tmp_path / "run2", training={**TRAINING, "wall_s": 0})
    with pytest.raises(CostError, match=r"training.json: 'wall_s' must be a positive number, got 0"):
        throughput_from_logs(run2 / "shards", run2 / "student")
    with pytest.raises(CostError, match="--corpus-size"):
        estimate_time(0, Throughput(1.0, 1.0, 1.0))
    with pytest.raises(CostError, match="two or more"):
        forecast([(100, 0.5)], 0.9)
    with pytest.raises(CostError, match="--target-agreement"):
        forecast([(100, 0.5), (200, 0.6)], 1.0)


# ---- outputs -------------------------------------------------------------------------------------
def test_pngs_and_markdown_written(tmp_path):
    a = write_cost(hand_analysis(0.001, 0.0001, 45.0, 10_000), tmp_path / "out")
    png = Path(a.plot).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert json.loads((tmp_path / "out" / "cost.json").read_text())["break_even_days"] == pytest.approx(5.0)
    md = cost_section_markdown(a)
    assert md.startswith("## Cost") and "| break-even | 5.0 days |" in md and "cost.png" in md
    fc = forecast([(100, 0.8), (400, 0.9)], 0.95)
    png = plot_forecast(fc, tmp_path / "f.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_cli_json(tmp_path):
    from microdistill.cli import app

    run = write_run(tmp_path / "run")
    args = ["cost", str(run), "--calls-per-day", "1000", "--input-tokens", "400", "--output-tokens", "20",
            "--points", "100:0.8,400:0.9", "--target-agreement", "0.95", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["teacher"]["usd"] == pytest.approx(72e-6)
    assert out["forecast"]["n_needed"] == 1600  # error halves per 4x: 0.2 -> 0.1 -> 0.05 at 1,600
    assert out["config"]["corpus_size"] == 1778  # ceil(1600 / 0.9)
    assert Path(out["plot"]).read_bytes().startswith(PNG_MAGIC)
    assert (run / "cost" / "forecast.png").stat().st_size > 0


def test_cli_bad_rate_exits_2(tmp_path, monkeypatch, capsys):
    from microdistill import cli

    run = write_run(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["microdistill", "cost", str(run), "--calls-per-day", "-1"])
    with pytest.raises((SystemExit, typer.Exit)) as e:
        cli.main()
    assert getattr(e.value, "code", getattr(e.value, "exit_code", None)) == 2
    assert "error: --calls-per-day must be a positive number, got -1" in capsys.readouterr().err
