"""The CLI is a thin layer over the configs: every flag's default is its config field's default,
a verb run with only its required arguments builds exactly the default config, and a user error
inside a verb is one `error: ...` line with exit code 2."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from microdistill.cli import app, main
from microdistill.plan.cost import CostConfig
from microdistill.evaluate.evaluation import EvalConfig
from microdistill.extract.config import ExtractConfig
from microdistill.flows.compare import CompareConfig
from microdistill.flows.run import RunConfig
from microdistill.train import TrainConfig

COMMANDS = typer.main.get_command(app).commands


def params(command: str) -> dict[str, object]:
    """{parameter name: default} of one verb."""
    return {p.name: p.default for p in COMMANDS[command].params}


def _norm(v):
    return str(v) if isinstance(v, Path) else v


# Options whose name differs from their config field: option -> (field, default of the option -> field value).
RENAMED = {
    "label": ("labels", lambda d: dict(d) or None),  # --label F=C (repeatable) -> labels {F: C} or None
    "no_teacher": ("time_teacher", lambda d: not d),  # eval --no-teacher
    "eval_teacher": ("time_teacher", lambda d: d),  # run --eval-teacher/--no-eval-teacher
}


def matched_defaults(command: str, *configs, skip: tuple[str, ...] = ()) -> tuple[dict[str, tuple], set[str]]:
    """Per option that names a field of one of `configs` (the first that has it): (option's
    default as the field's value, the config's default); and the options that name none
    (or are in `skip`: another thing of the same name)."""
    matched, unmatched = {}, set()
    for name, default in params(command).items():
        field, convert = RENAMED.get(name, (name, lambda d: d))
        for cfg in configs if name not in skip else ():
            if field in {f.name for f in fields(cfg)}:
                matched[name] = (_norm(convert(default)), _norm(getattr(cfg, field)))
                break
        else:
            unmatched.add(name)
    return matched, unmatched


def assert_same(command: str, matched: dict[str, tuple]) -> None:
    diff = {k: f"--{k.replace('_', '-')} defaults to {a!r}, config {b!r}" for k, (a, b) in matched.items() if a != b}
    assert not diff, f"`microdistill {command}` defaults differ from its config: {diff}"


def test_train_defaults_are_train_config_defaults():
    matched, unmatched = matched_defaults("train", TrainConfig())
    assert_same("train", matched)
    assert set(matched) == {f.name for f in fields(TrainConfig)}  # every option of the config has a flag
    assert unmatched == {"data", "out", "resume", "quiet"}


def test_extract_defaults_are_extract_config_defaults():
    matched, unmatched = matched_defaults("extract", ExtractConfig())
    assert_same("extract", matched)
    assert {RENAMED.get(k, (k,))[0] for k in matched} == {f.name for f in fields(ExtractConfig)}
    assert unmatched == {"input", "out", "part", "quiet"}  # --part: which worker, not what is extracted


def test_eval_defaults_are_eval_config_defaults():
    matched, unmatched = matched_defaults("eval", EvalConfig())
    assert_same("eval", matched)
    assert set(matched) == {"teacher", "no_teacher", "limit", "timing_inputs", "batch_size", "peers", "consistency_inputs"}
    assert unmatched == {"student", "data", "out", "json_out", "quiet"}


def test_cost_defaults_are_cost_config_defaults():
    # --task/--teacher build the ExtractConfig of --measure; --preset is the student's
    # --student is a student folder there, not TrainConfig's kind of student
    matched, unmatched = matched_defaults("cost", CostConfig(), ExtractConfig(), TrainConfig(), skip=("student",))
    assert_same("cost", matched)
    assert {f.name for f in fields(CostConfig)} | {"task", "teacher", "preset"} == set(matched)
    # the rest are arguments of flows/cost.py's cost_analysis: same defaults there
    from microdistill.flows.cost import cost_analysis

    signature = inspect.signature(cost_analysis).parameters
    for name in ("sample", "train_steps", "target_agreement", "points"):
        assert params("cost")[name] == signature[name].default, name
    assert params("cost")["preset"] == signature["preset"].default


def test_compare_defaults_are_compare_config_defaults():
    matched, unmatched = matched_defaults("compare", CompareConfig())
    assert_same("compare", matched)
    assert set(matched) == {f.name for f in fields(CompareConfig)}
    assert unmatched == {"data", "out", "configs", "plan", "list_", "quiet"}


def test_run_defaults_are_run_config_defaults():
    """`run`'s own defaults (20 epochs, dropout 0.1) are RunConfig().train's, not TrainConfig()'s."""
    run = RunConfig()
    matched, unmatched = matched_defaults("run", run, run.extract, run.train, run.eval)
    assert_same("run", matched)
    assert not unmatched, f"run options with no config field: {unmatched}"
    assert len(matched) >= 15
    assert matched["epochs"] == (20, 20) and matched["dropout"] == (0.1, 0.1)
    assert matched["batch_size"] == (run.extract.batch_size, run.extract.batch_size)  # the teacher's batch


# ---- the verbs build their default config ---------------------------------------------------------
class Captured(Exception):
    pass


def _capture(monkeypatch, module, name: str, index: int | str):
    """Replace module.name by a stub that raises Captured(argument `index`)."""
    def stub(*args, **kwargs):
        raise Captured(kwargs[index] if isinstance(index, str) else args[index])

    monkeypatch.setattr(module, name, stub)


def _config_built(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, Captured), (result.output, result.exception)
    return result.exception.args[0]


def test_verbs_build_default_configs(monkeypatch, tmp_path):
    import microdistill.extract
    import microdistill.flows.compare
    import microdistill.flows.cost
    import microdistill.flows.eval
    import microdistill.flows.run
    import microdistill.train

    _capture(monkeypatch, microdistill.train, "train", 2)
    assert _config_built(["train", "--data", str(tmp_path), "--out", str(tmp_path / "s")]) == TrainConfig()
    _capture(monkeypatch, microdistill.extract, "extract", 2)
    assert _config_built(["extract", "--input", str(tmp_path), "--out", str(tmp_path / "x")]) == ExtractConfig()
    _capture(monkeypatch, microdistill.flows.eval, "make_report", 3)
    assert _config_built(["eval", "--student", str(tmp_path), "--data", str(tmp_path)]) == EvalConfig()
    _capture(monkeypatch, microdistill.flows.run, "run", 0)
    assert _config_built(["run"]) == RunConfig()
    _capture(monkeypatch, microdistill.flows.cost, "cost_analysis", 1)
    assert _config_built(["cost", str(tmp_path)]) == CostConfig()
    _capture(monkeypatch, microdistill.flows.compare, "compare", 3)
    assert _config_built(["compare", "--data", str(tmp_path), "--out", str(tmp_path / "c")]) == CompareConfig()


# ---- user errors --------------------------------------------------------------------------------
def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", "from microdistill.cli import main; main()",
         "train", "--data", str(tmp_path / "nonexistent"), "--out", "x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and "nonexistent" in lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (tmp_path / "x").exists()  # nothing written for a run that could not start


def test_config_error_in_a_verb_is_one_line(monkeypatch, capsys):
    """A UserError raised while a verb builds its config (contradicting flags) goes through main()."""
    monkeypatch.setattr(sys, "argv", ["microdistill", "eval", "--student", "s", "--data", "d",
                                      "--teacher", "t", "--no-teacher"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "--no-teacher" in err and "Traceback" not in err
