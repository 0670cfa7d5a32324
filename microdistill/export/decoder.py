"""A decoder student as two ONNX graphs and the token automaton, and its parity with PyTorch.

`prefill.onnx`: input_ids int64 [B, L] (student input indices without BOS/SEP, right-padded
with PAD) -> logits [B, output_vocab] of the first output token, keys and values
[n_layers, B, heads, L + 2, head_dim] (rotary already applied). `decode.onnx`: token int64 [B, 1]
(the output index just chosen), past_keys, past_values, past_valid bool [B, L_past] (False at
input padding), position int64 [B] (the token's rotary position) -> logits [B, output_vocab] of
the next token and the cache grown by one column. Both are Student.prefill / decode_step
traced as they are (opset 17), so the graphs compute what PyTorch computes.

Only enum-only tasks export: automaton.json (runtime/decoder.py) spells their outputs without
xgrammar, and it is checked against xgrammar at every one of its states before anything is
written. Free-text and number fields would need a grammar engine at run time.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microdistill.data.corpus import clean_inputs
from microdistill.core.files import atomic_write_json
from microdistill.data.vocab import token_bytes
from microdistill.export.heads import OPSET
from microdistill.runtime.common import ExportError, softmax
from microdistill.runtime.decoder import AUTOMATON, TokenAutomaton, free_fields
from microdistill.students.decoder.config import N_SPECIAL, PAD
from microdistill.students.decoder.model import KVCache
from microdistill.students.decoder.predict import _allowed, _pad, predict, step_budget

PREFILL = ("prefill.onnx", ["input_ids"], ["logits", "keys", "values"])
DECODE = ("decode.onnx", ["token", "past_keys", "past_values", "past_valid", "position"], ["logits", "keys", "values"])


def check(student) -> None:
    """A one-line error for a task the torch-free runtime cannot decode."""
    free = free_fields(student.task)
    if free:
        raise ExportError(f"student folder {student.path}: the task {student.task.name!r} has free field(s) "
                          f"{', '.join(free)}; the torch-free runtime decodes enum-only tasks, so use predict "
                          "with the PyTorch student folder instead")


class Prefill(torch.nn.Module):
    """Student.prefill with the cache as two stacked tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        logits, cache = self.model.prefill(input_ids)
        return logits, torch.stack([k for k, _ in cache.kv]), torch.stack([v for _, v in cache.kv])


class Decode(torch.nn.Module):
    """Student.decode_step over a cache given as plain tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token, past_keys, past_values, past_valid, position):
        n = self.model.config.n_layers
        cache = KVCache([(past_keys[i], past_values[i]) for i in range(n)], past_valid, position)
        logits, cache = self.model.decode_step(token[:, 0], cache)
        return logits, torch.stack([k for k, _ in cache.kv]), torch.stack([v for _, v in cache.kv])


def write_graphs(student, folder: Path) -> list[str]:
    """The two float32 graphs, automaton.json and the files the runtime reads beside them; the graphs' names."""
    graphs = to_onnx(student, folder)
    atomic_write_json(folder / AUTOMATON, automaton(student).to_dict())
    tokenizer = student.path / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():
        raise ExportError(f"{tokenizer}: not found; the runtime reads the teacher's fast tokenizer "
                          "from it (a tokenizer without tokenizer.json cannot be exported)")
    shutil.copyfile(tokenizer, folder / "tokenizer.json")
    if (student.path / "task.yaml").is_file():
        shutil.copyfile(student.path / "task.yaml", folder / "task.yaml")
    return graphs


def to_onnx(student, folder: Path) -> list[str]:
    """Write the float32 prefill and decode graphs of a decoder student into `folder`; their names."""
    model = student.model.eval()
    ids = torch.full((2, 5), N_SPECIAL, dtype=torch.long)
    ids[1, 3:] = PAD  # a padded row, so the trace keeps the padding path
    with torch.no_grad():
        _, keys, values = Prefill(model)(ids)
    valid = torch.ones(2, keys.shape[3], dtype=torch.bool)
    valid[1, 4:6] = False
    cache = {1: "batch", 3: "length"}
    runs = [(PREFILL, Prefill, (ids,), {"input_ids": {0: "batch", 1: "input"}}),
            (DECODE, Decode, (torch.zeros(2, 1, dtype=torch.long), keys, values, valid, torch.tensor([7, 5])),
             {"token": {0: "batch"}, "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"},
              "past_valid": {0: "batch", 1: "past"}, "position": {0: "batch"}})]
    for (name, inputs, outputs), wrapper, example, axes in runs:
        axes = {**axes, "logits": {0: "batch"}, "keys": cache, "values": cache}
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about Python branches on shapes; parity below checks the graphs on real lengths
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper(model).eval(), example, str(folder / name), dynamo=False,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=OPSET)
    return [PREFILL[0], DECODE[0]]


def automaton(student) -> TokenAutomaton:
    """The task's token automaton over the student's kept outputs, equal to xgrammar's masks
    (limited to the kept vocabulary) at every state, or an ExportError."""
    kept = [int(t) for t in student.kept]
    eos = kept.index(int(student.eos_id))
    a = TokenAutomaton.build(student.task, [token_bytes(student.tokenizer, t) for t in kept], eos)
    import xgrammar as xgr

    grammar = student.grammar
    batch = grammar.batch(1)
    kept_t = torch.as_tensor(kept, dtype=torch.long)
    for s, prefix in enumerate(a.prefixes(student.task)):
        matcher = xgr.GrammarMatcher(grammar.compiled)
        if prefix and not matcher.accept_string(prefix):
            raise ExportError(f"the task grammar refuses {prefix!r}, which the token automaton spells; "
                              "this task cannot be exported")
        batch.matchers[0] = matcher
        want = set(np.flatnonzero(_allowed(batch, [0], kept_t)[0].numpy()).tolist())
        if want != set(a.allowed[s].tolist()):
            diff = sorted(want ^ set(a.allowed[s].tolist()))[:5]
            raise ExportError(f"the token automaton and the task grammar allow different tokens after {prefix!r} "
                              f"(output indices {diff}); this task cannot be exported")
    return a


def manifest(student) -> dict[str, Any]:
    """export.json's entries particular to a decoder export."""
    c = student.config
    return {"max_input": c.max_input, "budget": step_budget(student.task, c.max_output),
            "graphs": {name: {"inputs": i, "outputs": o} for name, i, o in (PREFILL, DECODE)},
            "fields": [{"name": f.name, "values": f.values} for f in student.task.output.fields],
            "vocab": {"kept": [int(t) for t in student.kept], "input": [int(t) for t in student.input_vocab],
                      "eos": int(student.eos_id), "input_offset": N_SPECIAL, "pad": PAD},
            "model": {"n_layers": c.n_layers, "n_heads": c.n_heads, "head_dim": c.head_dim,
                      "output_vocab": c.output_vocab}}


def parity(student, exported, texts: list[str]) -> dict[str, Any]:
    """How often the export answers the texts as PyTorch's constrained predict does: {n, same,
    rate, max_prob_diff (of the first output token's kept distribution), differ: [{text, torch, onnx}]}."""
    ref, got = predict(student, texts), exported.predict(texts)
    differ = [{"text": t, "torch": a["output"], "onnx": b["output"]} for t, a, b in zip(texts, ref, got)
              if (a["output"], a["fields"], a["valid"]) != (b["output"], b["fields"], b["valid"])]
    n = len(texts)
    return {"n": n, "same": n - len(differ), "rate": (n - len(differ)) / n if n else 1.0,
            "max_prob_diff": first_step_diff(student, exported, texts), "differ": differ}


def first_step_diff(student, exported, texts: list[str], batch_size: int = 64) -> float:
    """The largest difference between PyTorch's and the graph's probabilities of the first output
    token (softmax over the kept vocabulary) on `texts`."""
    K, limit, worst = len(student.kept), student.config.max_input, 0.0
    rows = [[student.input_index[i] for i in student.encoder.encode(t)[:limit]] for t in clean_inputs(student.task, texts)]
    for start in range(0, len(rows), batch_size):
        x = _pad(rows[start:start + batch_size])
        with torch.no_grad():
            ref = student.model.prefill(x)[0][:, :K].float().softmax(-1).numpy()
        got = softmax(exported.prefill.run(None, {"input_ids": x.numpy()})[0][:, :K])
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst
