"""Training under torchrun (train/distributed.py), two CPU processes with gloo: the same losses
and weights as one process at the same global batch, an exact resume, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import make_shards

from microdistill.train import TrainConfig, train
from microdistill.train.distributed import Ranks

ROOT = Path(__file__).resolve().parents[1]
# 56 training examples in batches of 11: each epoch ends with a batch of one, which leaves rank 0 without examples
CFG = dict(preset="nano", epochs=2, batch_size=11, eval_limit=3, hidden_weight=1.0)

# Each rank runs this: the train verb's function with options of its own (tests of mismatches), and
# optionally a SIGINT to itself after a step, as a signal that reaches one rank only would.
SCRIPT = """
import json, os, signal, sys
from microdistill.core.errors import UserError
from microdistill.train import TrainConfig, TrainingInterrupted, train
data, out, cfg, per_rank, stop_at, resume = json.loads(sys.argv[1])
rank = os.environ["RANK"]
kill = lambda step: os.kill(os.getpid(), signal.SIGINT) if step == stop_at and rank == "1" else None
try:
    train(data, out, TrainConfig(**cfg, **per_rank.get(rank, {})), resume=resume, progress=False, on_step=kill)
except TrainingInterrupted as e:
    print(e, file=sys.stderr); sys.exit(130)
except UserError as e:
    print(f"error: {e}", file=sys.stderr); sys.exit(2)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return make_shards(tmp_path_factory.mktemp("shards"), tiny_tokenizer, n=64, hidden=8)


def torchrun(tmp_path, data, out, cfg=CFG, per_rank=None, stop_at=None, resume=False) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    args = json.dumps([str(data), str(out), cfg, per_rank or {}, stop_at, resume])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def rows(out: Path, key: str = "loss") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def two(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    p = torchrun(tmp, shards, tmp / "student")
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "student"


def test_two_processes_train_as_one_at_the_same_global_batch(shards, two, tmp_path):
    one = train(shards, tmp_path / "one", TrainConfig(**CFG), progress=False)
    a, b = rows(one), rows(two)
    assert len(a) == len(b) == 12 and "hidden" in a[0]  # the hidden-state probe is trained across ranks too
    for x, y in zip(a, b):
        assert (x["step"], x["epoch"], x["lr"], x["w_div"]) == (y["step"], y["epoch"], y["lr"], y["w_div"])
        for k in ("loss", "divergence", "ce", "acc", "hidden"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert [r["val_examples"] for r in rows(two, "eval")] == [3, 3]  # rank 0 alone evaluates and logs
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k
    one_stats, two_stats = (json.loads((p / "training.json").read_text()) for p in (one, two))
    assert two_stats["processes"] == 2 and two_stats["tokens"] == one_stats["tokens"]


def test_an_interrupted_two_process_run_resumes_to_the_same_weights(shards, two, tmp_path):
    out = tmp_path / "student"
    p = torchrun(tmp_path, shards, out, stop_at=3)  # one rank gets the signal; both stop after step 3
    assert p.returncode != 0 and "interrupted at step 3/12" in p.stderr
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert (meta["epoch"], meta["batch"], meta["step"]) == (0, 3, 3) and not (out / "model.safetensors").exists()
    p = torchrun(tmp_path, shards, out, resume=True)
    assert p.returncode == 0, p.stderr[-3000:]
    wa, wb = weights(two), weights(out)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k != "ms"} for r in rs]  # noqa: E731
    assert strip(rows(out)) == strip(rows(two))


def test_ranks_with_different_options_are_refused(shards, tmp_path):
    p = torchrun(tmp_path, shards, tmp_path / "student", per_rank={"1": {"lr": 1e-3}})
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("rank 1 was started with other options than rank 0 (lr=0.001 (rank 0: 0.002))" in e
                          for e in errors)
    assert not (tmp_path / "student" / "metrics.jsonl").exists()


def test_a_rank_without_examples_weighs_nothing():
    """A global batch smaller than the world: the rank left over runs one example at weight 0."""
    assert Ranks(0, 2).my_slice([7, 8, 9]) == ([7], 1.0) and Ranks(1, 2).my_slice([7, 8, 9]) == ([8, 9], 1.0)
    assert Ranks(0, 2).my_slice([7]) == ([7], 0.0) and Ranks(1, 2).my_slice([7]) == ([7], 1.0)
    assert Ranks(0, 1).my_slice([1, 2, 3]) == ([1, 2, 3], 1.0)
