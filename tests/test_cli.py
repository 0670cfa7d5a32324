"""The CLI is a thin layer over the configs: every field of a verb's config is a flag with the
field's default and help, a flag given on the command line reaches the config, a verb run with only
its required arguments builds exactly the default config, the verbs are listed in the order of the
work, and a user error inside a verb is one `error: ...` line with exit code 2."""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import typer.main
from typer.testing import CliRunner

from microdistill.cli import app, main
from microdistill.core.errors import UserError
from microdistill.core.options import Options
from microdistill.evaluate.config import EvalConfig
from microdistill.extract.config import ExtractConfig
from microdistill.flows.config import CompareConfig, RunConfig, SynthesizeConfig, UpdateConfig
from microdistill.plan.cost import CostConfig, PilotConfig
from microdistill.serve.config import ServeConfig
from microdistill.train.config import TrainConfig

COMMANDS = typer.main.get_command(app).commands
WORKFLOW = ["run", "synthesize", "extract", "train", "eval", "predict", "export", "serve", "update", "calibrate-confidence", "cost",
            "compare", "inspect", "tasks"]
RUN = RunConfig()
# The stage options `run` takes (the rest keep RunConfig's stage defaults).
RUN_FLAGS = {
    "extract": ("task", "teacher", "field", "labels", "limit", "batch_size", "vocab_size", "hidden_layer", "dtype",
                "teacher_url", "concurrency"),
    "train": ("student", "preset", "encoder", "epochs", "dropout", "hidden_weight", "max_steps", "seed"),
    "eval": ("time_teacher",),
}
# verb -> ([(the config its flags default to, the fields that are flags; None: all)], the verb's own parameters)
VERB_CONFIGS = {
    "train": ([(TrainConfig(), None)], {"data", "out", "resume", "checkpoint_every", "keep_checkpoint", "quiet"}),
    "extract": ([(ExtractConfig(), None)], {"input", "out", "part", "select", "student", "budget", "seed", "quiet"}),  # --part: which worker, not what
    "eval": ([(EvalConfig(), None)], {"student", "data", "out", "json_out", "quiet"}),
    "serve": ([(ServeConfig(), None)], {"student"}),
    "update": ([(UpdateConfig(), None)], {"student", "input", "out", "shards", "quiet"}),
    "synthesize": ([(SynthesizeConfig(), None)], {"out", "quiet"}),
    "compare": ([(CompareConfig(), None)], {"data", "out", "configs", "plan", "list_", "quiet"}),
    # --task/--teacher build the ExtractConfig of --measure; --student is a student folder there
    "cost": ([(CostConfig(), None), (PilotConfig(), None), (ExtractConfig(), ("task", "teacher"))],
             {"run_dir", "shards", "student", "report", "measure", "input", "target_agreement", "points", "out",
              "json_out"}),
    "run": ([(RUN, ("name", "root", "input", "synthesize"))] + [(getattr(RUN, k), v) for k, v in RUN_FLAGS.items()], set()),
}
# Flags not named --field-name (--no-field-name off): field -> {verb: the flag's names}
FLAG_NAMES = {"labels": {"run": ("--label",), "extract": ("--label",)},  # repeated, one FIELD=COLUMN each
              "time_teacher": {"run": ("--eval-teacher", "--no-eval-teacher"), "eval": ("--no-teacher",)}}


def params(command: str) -> dict[str, object]:
    """{parameter name: click parameter} of one verb."""
    return {p.name: p for p in COMMANDS[command].params}


def as_field(value):
    """A flag's default as the config field holds it: --label's [] is no labels."""
    return dict(v.split("=", 1) for v in value) or None if isinstance(value, list) else value


def names_of(p) -> tuple[str, ...]:
    return (*p.opts, *p.secondary_opts)


@pytest.mark.parametrize("verb", sorted(VERB_CONFIGS))
def test_every_config_field_is_a_flag_with_its_default_and_help(verb):
    configs, own = VERB_CONFIGS[verb]
    given = params(verb)
    expected = set(own)
    for cfg, names in configs:
        for f in fields(cfg):
            if names is not None and f.name not in names:
                continue
            expected.add(f.name)
            p, value, dashed = given[f.name], getattr(cfg, f.name), f.name.replace("_", "-")
            assert f.metadata["help"] and p.help == f.metadata["help"], f"{verb} {names_of(p)}: help"
            default = tuple(p.default) if f.metadata.get("repeat") else as_field(p.default)  # a repeated flag: a tuple
            assert default == value, f"{verb} {names_of(p)}: default {p.default!r}, config {value!r}"
            plain = (f"--{dashed}", f"--no-{dashed}") if isinstance(value, bool) else (f"--{dashed}",)
            assert names_of(p) == FLAG_NAMES.get(f.name, {}).get(verb, plain), f"{verb} --{dashed}: {names_of(p)}"
    assert set(given) == expected, f"`microdistill {verb}` flags beyond its config: {set(given) - expected}"


def test_every_option_has_help():
    for cls in (TrainConfig, ExtractConfig, EvalConfig, ServeConfig, CostConfig, PilotConfig, CompareConfig, RunConfig, UpdateConfig):
        assert all(d.help for d in cls.described()), cls.__name__


def test_run_flags_default_to_run_config_stage_defaults():
    """`run`'s own defaults (10 epochs, dropout 0.1, dtype auto, student auto) are RunConfig's, not the stages'."""
    p = params("run")
    assert (p["epochs"].default, p["dropout"].default) == (RUN.train.epochs, RUN.train.dropout) == (10, 0.1)
    assert (p["dtype"].default, p["student"].default) == (RUN.extract.dtype, RUN.train.student) == ("auto", "auto")
    assert (TrainConfig().dropout, ExtractConfig().dtype) != (0.1, "auto")  # so the flags could not be the stages'
    assert p["batch_size"].default == RUN.extract.batch_size  # the teacher's batch


def test_verbs_are_listed_in_the_order_of_the_work():
    assert list(COMMANDS) == WORKFLOW
    output = CliRunner().invoke(app, ["--help"]).output
    rows = output[output.index("Commands"):].splitlines()[1:]
    # each verb's row starts with its name; a description that wraps continues on an indented row
    assert [r.split()[1] for r in rows if r[:1] == "│" and r[2:3].strip()] == WORKFLOW, output


# ---- the verbs build their configs ----------------------------------------------------------------
class Captured(Exception):
    pass


# verb -> (module and name of the library function it calls, the argument holding the config, required arguments)
CALLS = {
    "train": ("microdistill.train", "train", 2, ["--data", "d", "--out", "s"]),
    "extract": ("microdistill.extract", "extract", 2, ["--input", "c", "--out", "x"]),
    "eval": ("microdistill.flows.eval", "make_report", 3, ["--student", "s", "--data", "d"]),
    "serve": ("microdistill.serve.app", "run_server", 1, ["--student", "s"]),
    "update": ("microdistill.flows.continual", "update", 3, ["--student", "s", "--input", "p", "--out", "o"]),
    "compare": ("microdistill.flows.compare", "compare", 3, ["--data", "d", "--out", "c"]),
    "cost": ("microdistill.flows.cost", "cost_analysis", 1, ["r"]),
    "run": ("microdistill.flows.run", "run", 0, []),
    "synthesize": ("microdistill.flows.synthesize", "synthesize", 0, ["--out", "o.jsonl"]),
}


def called(monkeypatch, verb: str, args: list[str]) -> tuple[tuple, dict]:
    """The arguments `microdistill VERB ARGS...` calls its library function with (the function is stubbed)."""
    module, name, _, required = CALLS[verb]

    def stub(*args, **kwargs):
        raise Captured(args, kwargs)

    monkeypatch.setattr(importlib.import_module(module), name, stub)
    result = CliRunner().invoke(app, [verb, *required, *args])
    assert isinstance(result.exception, Captured), (result.output, result.exception)
    return result.exception.args


def config_built(monkeypatch, verb: str, args: list[str] = ()):
    return called(monkeypatch, verb, list(args))[0][CALLS[verb][2]]


@pytest.mark.parametrize("verb", sorted(CALLS))
def test_verbs_build_default_configs(monkeypatch, verb):
    expected = {"run": RUN, "train": TrainConfig(), "extract": ExtractConfig(), "eval": EvalConfig(),
                "serve": ServeConfig(), "compare": CompareConfig(), "cost": CostConfig(), "update": UpdateConfig(),
                "synthesize": SynthesizeConfig()}[verb]
    assert config_built(monkeypatch, verb) == expected


# Options other than the defaults, valid together: each field of a verb's config is set in one of its lists
# (those that contradict each other in different lists).
OPENAI = {"teacher": "openai:m", "teacher_url": "http://127.0.0.1:9/v1"}
GIVEN = {
    "train": [dict(student="heads", preset="nano", encoder="teacher", encoder_layers=2, mlp_width=256,
                   input_vocab="corpus", epochs=3, batch_size=8, lr=0.01, min_lr_ratio=0.2, warmup_frac=0.1,
                   weight_decay=0.01, grad_clip=0.5, pretrained_lr_ratio=0.5, dropout=0.2, seed=7, divergence="jsd",
                   temperature=2.0, beta=0.3, alpha=0.2, curriculum="linear", divergence_start=0.8,
                   divergence_end=0.2, tail=True, signal="text", embed_init="random", hidden_weight=0.5, max_steps=9,
                   limit_train=40, eval_limit=10, augment=0.5, on_policy=0.5, init_from="runs/s/student")],
    "extract": [dict(OPENAI, task="support-ticket", field="body", labels={"tone": "t", "toxicity": "x"}, limit=5,
                     batch_size=4, vocab_size=64, calibration=8, hidden_layer="middle", dtype="bfloat16",
                     teacher_tokenizer="gemma-3-270m", concurrency=2, embeddings=True),
                dict(draft="runs/s/student", draft_tokens=2)],
    "eval": [dict(OPENAI, limit=5, timing_inputs=4, batch_size=8, peers=False, consistency_inputs=0),
             dict(time_teacher=False)],
    "serve": [dict(OPENAI, min_confidence=0.9, served_model_name=("gpt-4o-mini", "labeller"), on_teacher_error="error",
                   teacher_attempts=3, teacher_timeout_s=5.0, teacher_concurrency=2, traffic="tr", traffic_sample=0.5,
                   traffic_max_mb=10.0, watch_s=2.0, host="0.0.0.0", port=9000, batch_window_ms=1.0, max_batch=8,
                   max_queue=16, max_texts=4, max_text_chars=100, max_body_bytes=1000, drain_timeout_s=1.0,
                   threads=2),
              dict(target_agreement=0.8)],
    "synthesize": [dict(OPENAI, task="support-ticket", n=5, batch_size=4, temperature=0.7, max_tokens=20,
                        similarity=0.8, seed=3)],
    "update": [dict(select="diverse", budget=50, rounds=3, tolerance=0.01, seed=4, warm_epochs=2)],
    "compare": [dict(preset="nano", max_steps=5, seed=3, limit_train=20, sizes=(10, 20), sizes_for=("kd", "ce"),
                     batch_size=4, lr=0.01, eval_limit=5),
                dict(epochs=2)],
    "cost": [dict(calls_per_day=500.0, machine_usd_per_hour=0.2, teacher_machine_usd_per_hour=1.0,
                  teacher_pricing="local", api_usd_per_m_input=0.3, api_usd_per_m_output=1.2, input_tokens=100.0,
                  output_tokens=10.0, teacher_usd_per_call=0.01, student_usd_per_call=0.001, basis="throughput",
                  corpus_size=1000, epochs=2.0)],
    "run": [dict(name="r", root="rs", input="c.txt",
                 extract=dict(task="support-ticket", teacher="t", field="body", labels={"tone": "t"}, limit=5,
                              batch_size=4, vocab_size=64, hidden_layer="none", dtype="float32", concurrency=2),
                 train=dict(student="decoder", preset="nano", encoder="teacher", epochs=3, dropout=0.0,
                            hidden_weight=0.0, max_steps=9, seed=7),
                 eval=dict(time_teacher=False)),
            dict(extract=OPENAI), dict(synthesize=50)],
}


def command_line(verb: str, values: dict) -> list[str]:
    """The flags that set `values` (a stage's values nested under its name, as RunConfig holds them)."""
    out, flags = [], params(verb)
    for name, v in values.items():
        p = flags.get(name)
        if isinstance(v, dict) and p is None:
            out += command_line(verb, v)
        elif isinstance(v, bool):
            out.append(p.opts[0] if v else p.secondary_opts[0])
        elif isinstance(v, dict):
            out += [a for k, x in v.items() for a in (p.opts[0], f"{k}={x}")]
        elif isinstance(v, tuple) and p.multiple:  # a repeated flag
            out += [a for x in v for a in (p.opts[0], str(x))]
        else:
            out += [p.opts[0], ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


def with_values(cfg, values: dict):
    return replace(cfg, **{k: with_values(getattr(cfg, k), v) if isinstance(getattr(cfg, k), Options) else v
                           for k, v in values.items()})


def flat(cfg, values: dict, prefix: str = "") -> dict[str, tuple]:
    """{"field" or "stage.field": (value given, the config's default)}."""
    out = {}
    for k, v in values.items():
        inner = getattr(cfg, k)
        out.update(flat(inner, v, f"{k}.") if isinstance(inner, Options) else {prefix + k: (v, inner)})
    return out


@pytest.mark.parametrize("verb", sorted(GIVEN))
def test_a_flag_reaches_its_config(monkeypatch, verb):
    default = config_built(monkeypatch, verb)
    for values in GIVEN[verb]:
        assert config_built(monkeypatch, verb, command_line(verb, values)) == with_values(default, values), values
    # every flag of the config was tried, each with a value other than its default
    configs, _ = VERB_CONFIGS[verb]
    flags = {f.name for f in fields(configs[0][0]) if configs[0][1] is None or f.name in configs[0][1]}
    flags |= {f"{k}.{n}" for k, names in RUN_FLAGS.items() for n in names} if verb == "run" else set()
    tried = {k: v for values in GIVEN[verb] for k, v in flat(default, values).items()}
    assert set(tried) == flags
    assert not [k for k, (value, default) in tried.items() if value == default]


def test_cost_builds_the_measured_extraction_and_the_pilot(monkeypatch):
    args, kwargs = called(monkeypatch, "cost", [])
    assert kwargs["measure"] is None
    assert (kwargs["preset"], kwargs["sample"], kwargs["train_steps"]) == (PilotConfig.preset, 128, 20)
    args, kwargs = called(monkeypatch, "cost", ["--measure", "--task", "support-ticket", "--teacher", "gemma-3-270m",
                                                "--preset", "nano", "--sample", "16", "--train-steps", "3"])
    assert kwargs["measure"] == ExtractConfig(task="support-ticket", teacher="gemma-3-270m")
    assert (kwargs["preset"], kwargs["sample"], kwargs["train_steps"]) == ("nano", 16, 3)


def test_a_bad_list_flag_is_a_user_error(monkeypatch):
    result = CliRunner().invoke(app, ["compare", "--data", "d", "--out", "c", "--sizes", "10,x"])
    assert isinstance(result.exception, UserError) and "--sizes '10,x'" in str(result.exception)
    result = CliRunner().invoke(app, ["extract", "--input", "c", "--out", "x", "--label", "tone"])
    assert result.exit_code == 2 and "FIELD=COLUMN" in result.output


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
