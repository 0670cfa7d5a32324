"""The decoder export's torch-free half: the token automaton of an enum-only task, and
schema-constrained greedy decoding over the two ONNX graphs (runtime.load_exported builds it).

    from microdistill.runtime import load_exported   # load_exported("runs/demo/export").predict([...])

When every field is an enum, the valid outputs are a finite language: the product of the
fields' values, in the task's key order and layout (compact `{"a":"x","b":"y"}`, or json.dumps
with the task's indent, as xgrammar compiles the schema). Its byte-level automaton is a chain of
literal bytes per key and a trie per field's values whose leaves merge into one state, so it stays
small. For each state, the kept output tokens whose bytes walk from it to another state are the
ones the grammar allows there (EOS only at the final state): the mask xgrammar gives, limited to
the kept vocabulary, computed once at export time (export_decoder.py checks every state against
xgrammar) and stored as automaton.json.

Decoding then mirrors predict._generate_batch: prefill, then per step the argmax of the logits
at the allowed output indices (the lowest index wins a tie, as torch's argmax does), until EOS,
a state with nothing allowed (the answer stays invalid), or the step budget. A field's
confidence is the probability, under the grammar's mask, of the tokens that spelled its value
(1 when the grammar forced them); the PyTorch decoder gives none, so there is nothing to match.

This module imports numpy and the package's pure-Python parts only.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from microdistill.data.corpus import by_length, clean_inputs
from microdistill.core.task import EnumField, Task, parse_or_none
from microdistill.data.vocab import InputEncoder
from microdistill.runtime.common import MANIFEST, ExportError, load_tokenizer

AUTOMATON = "automaton.json"
REQUIRED = ("prefill.onnx", "decode.onnx", AUTOMATON)  # the graphs first, which load() opens in this order
AUTOMATON_FORMAT, AUTOMATON_VERSION = "microdistill.automaton", 1
DONE = -1  # the state after EOS


def free_fields(task: Task) -> list[str]:
    """'name (type)' of each field that is not an enum: the automaton cannot spell them."""
    return [f"{f.name} ({f.type})" for f in task.output.fields if not isinstance(f, EnumField)]


def layout(task: Task) -> tuple[list[bytes], bytes]:
    """The literal bytes before each field's value (braces, key, separators) and after the last,
    as task.serialize writes them (and xgrammar accepts them)."""
    indent = task.output.indent
    keys = [json.dumps(f.name, ensure_ascii=False) for f in task.output.fields]
    if indent is None:
        parts = [("{" if i == 0 else ",") + k + ":" for i, k in enumerate(keys)]
        return [p.encode() for p in parts], b"}"
    pad = "\n" + " " * indent
    parts = [("{" if i == 0 else ",") + pad + k + ": " for i, k in enumerate(keys)]
    return [p.encode() for p in parts], b"\n}"


def byte_automaton(task: Task) -> tuple[list[dict[int, int]], list[int], int]:
    """(per state: byte -> next state, per state: the field whose value its next byte spells or -1,
    final state) of the task's valid outputs; state 0 is the start."""
    moves: list[dict[int, int]] = []
    labels: list[int] = []

    def new(label: int = -1) -> int:
        moves.append({})
        labels.append(label)
        return len(moves) - 1

    def move(s: int, b: int, to: int | None = None, label: int = -1) -> int:
        """The state after byte b from s, made (or pointed at `to`) when there is none yet."""
        if b not in moves[s]:
            moves[s][b] = new(label) if to is None else to
        return moves[s][b]

    cur = new()
    segments, end = layout(task)
    for i, (f, literal) in enumerate(zip(task.output.fields, segments)):
        for b in literal:
            cur = move(cur, b)
        leaf = new()  # where every value of the field ends: the automaton merges here
        for value in f.values:
            spelled = json.dumps(value, ensure_ascii=False).encode()
            node = cur
            for j, b in enumerate(spelled):
                last = j == len(spelled) - 1
                # a value's closing quote is never an escaped quote inside another value
                node = move(node, b, leaf if last else None, i)
                if (node == leaf) != last:
                    raise ValueError(f"field {f.name!r}: value {value!r} is ambiguous in the byte automaton")
        cur = leaf
    for b in end:
        cur = move(cur, b)
    return moves, labels, cur


@dataclass
class TokenAutomaton:
    """Per state, the allowed output indices and where each leads: edges[s] = {k: (next, field bits)},
    bit i set when the token spells part of field i's value. EOS (index `eos`) only at `final`."""

    edges: list[dict[int, tuple[int, int]]]
    final: int
    eos: int
    start: int = 0

    @classmethod
    def build(cls, task: Task, token_bytes: Sequence[bytes | None], eos: int) -> TokenAutomaton:
        """The automaton of `task` over output tokens whose bytes are `token_bytes[k]` (None: a
        token never said, such as the tail class); `eos`: EOS's output index."""
        moves, labels, final = byte_automaton(task)
        by_first: dict[int, list[int]] = {}
        for k, tb in enumerate(token_bytes):
            if tb and k != eos:
                by_first.setdefault(tb[0], []).append(k)
        edges: list[dict[int, tuple[int, int]]] = []
        for s in range(len(moves)):
            out: dict[int, tuple[int, int]] = {}
            for first in moves[s]:
                for k in by_first.get(first, ()):
                    t, bits = s, 0
                    for b in token_bytes[k]:
                        if labels[t] >= 0:
                            bits |= 1 << labels[t]
                        t = moves[t].get(b, DONE)
                        if t == DONE:
                            break
                    if t != DONE:
                        out[k] = (t, bits)
            edges.append(dict(sorted(out.items())))
        edges[final] = {eos: (DONE, 0)}
        return cls(edges, final, eos)

    def prefixes(self, task: Task) -> list[bytes]:
        """The shortest output bytes reaching each state (for checking the masks against xgrammar)."""
        moves, _, _ = byte_automaton(task)
        seen: dict[int, bytes] = {self.start: b""}
        todo = deque([self.start])
        while todo:
            s = todo.popleft()
            for b, t in sorted(moves[s].items()):
                if t not in seen:
                    seen[t] = seen[s] + bytes([b])
                    todo.append(t)
        return [seen[s] for s in range(len(moves))]

    @cached_property
    def allowed(self) -> list[np.ndarray]:
        """Per state, the allowed output indices, ascending."""
        return [np.fromiter(e, dtype=np.int64, count=len(e)) for e in self.edges]

    def step(self, state: int, k: int) -> tuple[int, int]:
        """(next state, field bits) after output index k, which must be allowed."""
        return self.edges[state][k]

    def to_dict(self) -> dict[str, Any]:
        return {"format": AUTOMATON_FORMAT, "version": AUTOMATON_VERSION, "start": self.start, "final": self.final,
                "eos": self.eos, "states": len(self.edges),
                "edges": [[s, k, t, bits] for s, e in enumerate(self.edges) for k, (t, bits) in e.items()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenAutomaton:
        """Raises ValueError (or KeyError, TypeError) for a damaged or foreign file."""
        if d.get("format") != AUTOMATON_FORMAT or d.get("version") != AUTOMATON_VERSION:
            raise ValueError(f"format {d.get('format')!r} version {d.get('version')!r}, expected "
                             f"{AUTOMATON_FORMAT!r} version {AUTOMATON_VERSION}")
        edges: list[dict[int, tuple[int, int]]] = [{} for _ in range(int(d["states"]))]
        for s, k, t, bits in d["edges"]:
            edges[int(s)][int(k)] = (int(t), int(bits))
        a = cls([dict(sorted(e.items())) for e in edges], int(d["final"]), int(d["eos"]), int(d["start"]))
        if a.edges[a.final] != {a.eos: (DONE, 0)}:
            raise ValueError("its final state must allow EOS alone")
        return a


class TeacherTokenizer:
    """A `tokenizers.Tokenizer` seen through the few methods vocab.InputEncoder calls on a
    Hugging Face tokenizer, so new text encodes exactly as the PyTorch student encodes it."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def get_vocab(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.tok.id_to_token(int(i))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


@dataclass
class ExportedDecoder:
    """An exported decoder student ready to answer: predict() gives PyTorch predict()'s answers."""

    prefill: Any  # onnxruntime.InferenceSession: input_ids -> logits, keys, values
    decode: Any  # onnxruntime.InferenceSession: token, past_* , position -> logits, keys, values
    tokenizer: Any  # tokenizers.Tokenizer (the teacher's)
    task: Task
    automaton: TokenAutomaton
    kept: np.ndarray  # teacher id of each output index
    input_vocab: list[int]  # teacher id of input index `input_offset + p`
    input_offset: int
    pad: int
    max_input: int
    budget: int  # tokens a row may choose, EOS included (predict.step_budget)
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    kind: str = "decoder"

    @property
    def fields(self) -> list[EnumField]:
        return list(self.task.output.fields)

    @cached_property
    def encoder(self) -> InputEncoder:
        return InputEncoder(TeacherTokenizer(self.tokenizer), self.input_vocab)

    @cached_property
    def input_index(self) -> dict[int, int]:
        return {int(t): self.input_offset + p for p, t in enumerate(self.input_vocab)}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Teacher ids of each text inside the input vocabulary (byte fallback), untruncated."""
        return self.encoder.encode_batch(list(texts))

    def generate(self, ids: Sequence[Sequence[int]], batch_size: int = 64) -> list[tuple[list[int], np.ndarray | None]]:
        """Per input (teacher ids, truncated), the greedy output's teacher ids without EOS, and each
        field's probability [n_fields] (None when the output did not finish). Inputs run shortest
        first in batches padded to their own longest row, as predict.generate runs them."""
        rows = [[self.input_index[int(i)] for i in x] for x in ids]
        out: list[tuple[list[int], np.ndarray | None]] = [([], None)] * len(rows)
        for chunk in by_length([len(r) for r in rows], batch_size):
            for i, r in zip(chunk, self._generate_batch([rows[i] for i in chunk])):
                out[i] = r
        return out

    def _generate_batch(self, rows: list[list[int]]) -> list[tuple[list[int], np.ndarray | None]]:
        a, B = self.automaton, len(rows)
        x = np.full((B, max(len(r) for r in rows)), self.pad, np.int64)
        for b, r in enumerate(rows):
            x[b, :len(r)] = r
        logits, keys, values = self.prefill.run(None, {"input_ids": x})
        ones = np.ones((B, 1), bool)
        valid = np.concatenate([ones, x != self.pad, ones], 1)  # BOS input SEP; padding is never attended to
        pos = valid.sum(1).astype(np.int64)  # rotary positions count real tokens only
        state = [a.start] * B
        out: list[list[int]] = [[] for _ in range(B)]
        probs = np.ones((B, len(self.task.output.fields)))
        live = np.arange(B)  # the rows still decoding, in the order of the cache's rows
        for _ in range(self.budget):
            keep, fed = [], []
            for j, b in enumerate(live):
                allowed = a.allowed[state[b]]
                if not len(allowed):
                    continue  # no allowed token: the row stops where it is, invalid
                z = logits[j, allowed].astype(np.float64)
                i = int(z.argmax())
                k = int(allowed[i])
                p = 1.0 / np.exp(z - z[i]).sum()
                state[b], bits = a.step(state[b], k)
                for f in range(probs.shape[1]):
                    if bits >> f & 1:
                        probs[b, f] *= p
                if k != a.eos:
                    out[b].append(int(self.kept[k]))
                    keep.append(j)
                    fed.append(k)
            if not keep:
                break
            live, keys, values, valid, pos = live[keep], keys[:, keep], values[:, keep], valid[keep], pos[keep]
            logits, keys, values = self.decode.run(None, {
                "token": np.asarray(fed, np.int64)[:, None], "past_keys": keys, "past_values": values,
                "past_valid": valid, "position": pos})
            valid = np.concatenate([valid, np.ones((len(live), 1), bool)], 1)
            pos = pos + 1
        return [(out[b], probs[b] if state[b] == DONE else None) for b in range(B)]

    def predict(self, texts: Sequence[str], batch_size: int = 64, *, constrain: bool = True) -> list[dict[str, Any]]:
        """One result per text, as predict.predict gives for the PyTorch student ({text, output,
        fields, valid, truncated}) plus a confidence per field (0 for an unfinished output, so a
        cascade escalates it); texts are cleaned as the corpus was. An export always answers under the task's
        schema, so `constrain` is accepted for the common interface and changes nothing."""
        if not texts:
            return []
        ids = self.encode(clean_inputs(self.task, texts))
        generated = self.generate([x[:self.max_input] for x in ids], batch_size)
        results = []
        for text, x, (tokens, p) in zip(texts, ids, generated):
            output = self.tokenizer.decode(tokens, skip_special_tokens=False)
            fields = parse_or_none(self.task, output)
            names = self.task.field_names
            confidence = {n: float(p[f]) if p is not None and fields is not None else 0.0 for f, n in enumerate(names)}
            results.append({"text": text, "output": output, "fields": fields, "valid": fields is not None,
                            "truncated": len(x) > self.max_input, "confidence": confidence})
        return results


def load(path: Path, m: dict[str, Any], task: Task, sessions: list) -> ExportedDecoder:
    """The decoder export of folder `path` (manifest `m`), its graphs already open."""
    v = m["vocab"]
    try:
        automaton = TokenAutomaton.from_dict(json.loads((path / AUTOMATON).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportError(f"{path / AUTOMATON}: unreadable ({type(e).__name__}: {e}); export the student again") from None
    kept = np.asarray(v["kept"], dtype=np.int64)
    top = max((k for e in automaton.edges for k in e), default=0)
    if int(v["eos"]) not in kept.tolist() or automaton.eos != kept.tolist().index(int(v["eos"])) or top >= len(kept):
        raise ExportError(f"{path / AUTOMATON}: does not fit the kept vocabulary of {MANIFEST}; export the student again")
    return ExportedDecoder(*sessions, load_tokenizer(path), task, automaton, kept, [int(i) for i in v["input"]],
                           int(v["input_offset"]), int(v["pad"]), int(m["max_input"]), int(m["budget"]), m, path)
