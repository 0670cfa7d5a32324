"""Side-by-side comparison: the named configurations mean what they say, every run gets the same
data and budget, the report's numbers are each run's own, and finished runs are reused."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from synthetic import make_shards

import microdistill.train.runs as runs_mod
from microdistill.flows.compare import build_runs, compare, load_plan
from microdistill.flows.config import CompareConfig, CompareError
from microdistill.train import TrainConfig, TrainError
from microdistill.train.losses import curriculum_weight
from microdistill.train.recipes import CONFIGS

SHARED = {"preset": "nano", "seed": 3, "max_steps": 7, "limit_train": None}
COMMON = {"batch_size": 16, "lr": 5e-3}
RUN = {"preset": "nano", "max_steps": 6, "seed": 1}  # the fixture's comparison-wide options
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("shards"), tiny_tokenizer, n=64)


@pytest.fixture(scope="module")
def compared(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = compare(shards, out, ["curriculum", "ce", "kd"], CompareConfig(**RUN, sizes=(16, 10_000), **COMMON),
                     progress=False)
    return out, result


def rows(path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if r.get("eval")]


def test_every_named_configuration_builds_the_training_it_names():
    required = {"curriculum", "ce", "kd", "mix", "linear", "step", "reverse_kl", "jsd", "skew_kl", "taid", "tail", "t2", "heads",
                "no_hidden"}
    assert required <= set(CONFIGS)
    runs = {name: cfg for name, _, cfg in build_runs(list(CONFIGS), SHARED, COMMON)}
    for cfg in runs.values():  # the comparison-wide settings reach every run
        assert (cfg.preset, cfg.seed, cfg.max_steps, cfg.batch_size, cfg.lr) == ("nano", 3, 7, 16, 5e-3)

    def w(name: str, p: float) -> float:
        c = runs[name]
        return curriculum_weight(c.curriculum, p, c.divergence_start, c.divergence_end)

    assert (w("curriculum", 0.0), w("curriculum", 1.0)) == pytest.approx((0.9, 0.1))
    assert runs["curriculum"].divergence == "forward_kl" and runs["curriculum"].signal == "auto"
    assert runs["ce"].signal == "text"  # CE on the teacher's tokens only, no logits read
    assert [w("kd", p) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    assert [w("mix", p) for p in (0.0, 0.5, 1.0)] == [0.5, 0.5, 0.5]
    assert w("linear", 0.5) == pytest.approx(0.5) and runs["linear"].curriculum == "linear"
    assert w("step", 0.1) == pytest.approx(0.9) and w("step", 0.99) == pytest.approx(0.1)
    assert runs["reverse_kl"].divergence == "reverse_kl" and runs["taid"].divergence == "taid"
    assert (runs["jsd"].divergence, runs["jsd"].beta) == ("jsd", 0.5)
    assert (runs["skew_kl"].divergence, runs["skew_kl"].alpha) == ("skew_kl", 0.1)
    assert runs["no_hidden"].hidden_weight == 0.0 and runs["curriculum"].hidden_weight > 0
    assert runs["tail"].tail and not runs["curriculum"].tail
    assert runs["t2"].temperature == 2.0 and runs["curriculum"].temperature == 1.0
    assert runs["heads"].student == "heads" and runs["curriculum"].student == "decoder"


def test_contradicting_options_are_one_line_errors():
    with pytest.raises(CompareError, match=r"^give a step budget \(--max-steps\) or --epochs, not both$"):
        CompareConfig(max_steps=5, epochs=2)
    with pytest.raises(CompareError, match=r"^sizes \[16, 0\]: expected positive numbers of training examples$"):
        CompareConfig(sizes=(16, 0))


def test_report_holds_each_runs_own_numbers(compared):
    out, result = compared
    assert (out / "compare.md").is_file() and (out / "compare.json").is_file()
    for png in ("curves.png", "efficiency.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result))
    assert [r["name"] for r in result["runs"]] == ["curriculum", "ce", "kd"]
    md = (out / "compare.md").read_text()
    table = md.split("## Accuracy vs training examples")[0].splitlines()
    for r in result["runs"]:
        steps, evals = rows(out / r["name"])
        assert len(steps) == r["steps"] == 6  # the same budget for every configuration
        assert r["exact_match"] == evals[-1]["val_exact_match"] and r["token_acc"] == evals[-1]["val_token_acc"]
        assert r["field_agreement"] == evals[-1]["val_field_agreement"]
        assert (r["train_loss"], r["train_ce"]) == (steps[-1]["loss"], steps[-1]["ce"])
        assert r["wall_s"] == json.loads((out / r["name"] / "training.json").read_text())["wall_s"]
        assert sum(line.startswith(f"| {r['name']} | {100 * r['exact_match']:.2f}% | {100 * r['token_acc']:.2f}%")
                   for line in table) == 1
    by = {r["name"]: r for r in result["runs"]}
    # Each run trained what its name says: KL only, CE only, and the cosine mix.
    kd, _ = rows(out / "kd")
    assert all(s["w_div"] == 1.0 and s["loss"] == pytest.approx(s["divergence"], rel=1e-5) for s in kd)
    ce, _ = rows(out / "ce")
    assert all(s["w_div"] == 0.0 and s["divergence"] == 0.0 and s["loss"] == pytest.approx(s["ce"], rel=1e-5) for s in ce)
    assert by["ce"]["train_divergence"] is None and by["kd"]["train_divergence"] == kd[-1]["divergence"]
    cur, _ = rows(out / "curriculum")
    assert cur[0]["w_div"] == pytest.approx(0.9) and cur[-1]["w_div"] < 0.2
    # the peers learnt from the same answers and were scored on the same held-out examples
    assert [p["name"] for p in result["peers"]] == ["tfidf", "encoder"]
    assert all(p["n_val"] == result["runs"][0]["val_examples"] and p["n_train"] == result["n_train"] for p in result["peers"])
    assert sum(line.startswith("| peer: tfidf | ") for line in table) == 1
    best = max(result["runs"], key=lambda r: (r["exact_match"], r["token_acc"]))
    assert result["verdict"]["winner"] == best["name"] and f"**Winner: {best['name']}**" in md


def test_data_efficiency_trains_each_size_with_the_same_budget(compared):
    out, result = compared
    eff = result["efficiency"]
    assert list(eff) == ["curriculum", "ce", "kd"]
    n_train, full = result["n_train"], {r["name"]: r for r in result["runs"]}
    for name, points in eff.items():
        # 10,000 is beyond the data: that point is the full run itself, not a second copy of it.
        assert [p["examples"] for p in points] == [16, n_train]
        assert points[1]["dir"] == str(out / name) and points[1]["exact_match"] == full[name]["exact_match"]
        small = json.loads((out / "sizes" / name / "n16" / "training.json").read_text())
        assert small["examples"] == 16 and small["steps"] == 6
        _, evals = rows(out / "sizes" / name / "n16")
        assert points[0]["exact_match"] == evals[-1]["val_exact_match"]
    assert "## Accuracy vs training examples" in (out / "compare.md").read_text()


def test_rerun_reuses_finished_runs_and_refuses_changed_ones(compared, shards, monkeypatch):
    out, first = compared

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs_mod, "train", no_training)
    again = compare(shards, out, ["curriculum", "ce", "kd"], CompareConfig(**RUN, sizes=(16, 10_000), **COMMON),
                    progress=False)
    assert again["runs"] == first["runs"] and again["efficiency"] == first["efficiency"]
    # a run finished before an option existed reads it as its default, and is reused
    stats = json.loads((out / "kd" / "training.json").read_text())
    del stats["config"]["hidden_weight"]
    (out / "kd" / "training.json").write_text(json.dumps(stats))
    assert compare(shards, out, ["kd"], CompareConfig(**RUN, **COMMON),
                   progress=False)["runs"][0]["exact_match"] == again["runs"][2]["exact_match"]
    only_kd = compare(shards, out, ["curriculum", "ce", "kd"], CompareConfig(**RUN, sizes=(16,), sizes_for=("kd",), **COMMON),
                      progress=False)
    assert list(only_kd["efficiency"]) == ["kd"] and only_kd["efficiency"]["kd"] == first["efficiency"]["kd"]
    with pytest.raises(CompareError, match=r"sizes for jsd: not among the configurations compared \(curriculum, ce, kd\)"):
        compare(shards, out, ["curriculum", "ce", "kd"], CompareConfig(**RUN, sizes=(16,), sizes_for=("jsd",), **COMMON),
                progress=False)
    with pytest.raises(TrainError, match=r"kd: holds a finished run with other options \(max_steps=6"):
        compare(shards, out, ["kd"], CompareConfig(**{**RUN, "max_steps": 5}, **COMMON), progress=False)


def test_plan_file_runs_are_validated(tmp_path):
    plan = tmp_path / "runs.yaml"
    plan.write_text("runs:\n  - name: kd\n  - name: hot\n    base: kd\n    temperature: 4\n    lr: 1e-3\n")
    entries = load_plan(plan)
    runs = {name: (what, cfg) for name, what, cfg in build_runs(entries, SHARED, {})}
    assert runs["kd"][1].divergence_start == 1.0 and runs["kd"][1].curriculum == "constant"
    hot = runs["hot"][1]  # its base's options, then its own (YAML reads 1e-3 as a string)
    assert (hot.curriculum, hot.divergence_start, hot.temperature, hot.lr) == ("constant", 1.0, 4.0, 1e-3)
    # a plan written before the divergence's weight had its name still reads
    old = build_runs([{"name": "old", "base": "kd", "kl_start": 0.7}], SHARED, {})[0][2]
    assert old.divergence_start == 0.7
    for text, message in [
        ("- name: a\n  temprature: 2\n", "unknown field 'temprature'"),
        ("- name: a\n  max_steps: 9\n", "max_steps is shared by the whole comparison"),
        ("- name: a\n  tail: 3\n", "tail=3 is not a bool"),
        ("- name: a\n  base: nope\n", "unknown base 'nope'"),
        ("name: a\n", "expected a list of runs"),
    ]:
        plan.write_text(text)
        with pytest.raises(CompareError, match=message) as e:
            load_plan(plan)
        assert str(plan) in str(e.value)
    with pytest.raises(CompareError, match="'a' is listed twice"):
        build_runs([{"name": "a"}, {"name": "a", "lr": 1e-3}], SHARED, {})
    with pytest.raises(CompareError, match="configuration 'a': training option divergence='kl'"):
        build_runs([{"name": "a", "divergence": "kl"}], SHARED, {})


def test_cli_reports_a_bad_plan_in_one_line(tmp_path, shards):
    plan = tmp_path / "runs.yaml"
    plan.write_text("- name: kd\n- name: odd\n  warmup: 0.2\n")
    proc = subprocess.run([sys.executable, "-m", "microdistill.cli", "compare", "--data", str(shards), "--out",
                           str(tmp_path / "cmp"), "--plan", str(plan)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: plan {plan}, run 'odd': unknown field 'warmup'; expected TrainConfig fields "
        f"({', '.join(sorted(f.name for f in dataclasses.fields(TrainConfig)))})"]
    assert not (tmp_path / "cmp").exists()  # nothing trained before the plan was checked


def test_ce_runs_on_text_only_shards_and_kl_configs_are_refused(tmp_path, tiny_tokenizer):
    text = make_shards(tmp_path / "text", tiny_tokenizer, n=48, with_logits=False)
    with pytest.raises(CompareError, match="text-only shards have no teacher logits, which kd, tail need"):
        compare(text, tmp_path / "bad", ["ce", "kd", "tail"], CompareConfig(preset="nano", max_steps=2), progress=False)
    result = compare(text, tmp_path / "cmp", ["ce"], CompareConfig(preset="nano", max_steps=3, **COMMON), progress=False)
    (row,) = result["runs"]
    assert row["signal"] == "text" and row["steps"] == 3 and row["train_divergence"] is None
    assert result["verdict"] == {"winner": "ce", "runner_up": None, "margin": None, "margin_se": None, "token_margin": None}
    assert "| ce | " in (tmp_path / "cmp" / "compare.md").read_text()
