"""Batched, prefix-cached, schema-constrained greedy decoding with a teacher (used by extract.py).

Every prompt is `prefix + rest`: the prefix (system prompt, few-shot turns, ...) is identical
for every input, so its KV cache is computed once and copied into each batch; only `rest`
(the input text and the template around it) and the answer are run per input.

Layout of one batch of B rows in the KV cache (P prefix tokens, Lmax = longest rest):

    [ prefix (P) | rest_b, right-padded to Lmax | answer tokens fed step by step ]

Row b's real tokens are at consecutive positions 0, 1, 2, ... (pads are masked out and skip
no position), so each row computes exactly what an unbatched, uncached run of its own
prompt computes. tests/test_extract.py checks that equivalence on a tiny model.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from microdistill.core.grammar import Grammar
from microdistill.core.task import EnumField, Task
from microdistill.teachers.teacher import Teacher

SENTINEL = "MICRODISTILLINPUTSENTINEL"
# inputs the prefix/rest split is checked on: leading space, punctuation, digits, non-ASCII
_PROBES = ("hello world", " leading space", "x", "123!?", "naïve café 😀", "a\nb")


class GenerationError(RuntimeError):
    """The teacher's prompt or output broke an invariant extraction relies on (a bug, not a user error)."""


@dataclass
class PromptLayout:
    """The prompt split at a point where tokenizing the parts separately equals tokenizing it whole."""

    prefix_ids: list[int]
    head: str  # text between the prefix and the input
    tail: str  # text after the input, up to where the answer starts
    add_special: bool  # whether the tokenizer's own BOS goes in front (prompts without a chat template)


def _split_points(before: str, tokenizer) -> list[int]:
    """Candidate prefix ends in `before`, latest first: after special tokens, after newlines, 0."""
    specials = [t for t in tokenizer.all_special_tokens + [str(t) for t in tokenizer.added_tokens_decoder.values()] if t]
    points = {m.end() for s in set(specials) for m in re.finditer(re.escape(s), before)}
    points |= {m.end() for m in re.finditer(r"\n(?=\S)", before)}
    return sorted(points, reverse=True) + [0]


def prompt_layout(teacher: Teacher, task: Task) -> PromptLayout:
    """Find the longest prefix shared by every prompt whose tokens never depend on the input."""
    tok = teacher.tokenizer
    rendered = teacher.prompt_text(task, SENTINEL)
    if rendered.count(SENTINEL) != 1:
        raise GenerationError("the prompt template must contain the input text exactly once")
    before, after = rendered.split(SENTINEL)
    add_special = not teacher.has_chat_template

    def ids(text: str, special: bool) -> list[int]:
        return tok(text, add_special_tokens=special).input_ids

    for point in _split_points(before, tok):
        prefix = ids(before[:point], add_special) if point or add_special else []
        ok = all(
            prefix + ids(before[point:] + p + after, add_special and not prefix) == ids(before + p + after, add_special)
            for p in _PROBES
        )
        if ok:
            return PromptLayout(prefix, before[point:], after, add_special and not prefix)
    raise GenerationError("no split of the prompt tokenizes the same as the whole prompt")


@dataclass
class Generation:
    """One row's answer. logits: float16 [n_out, K] raw teacher logits at the kept ids; lse: float32 [n_out]."""

    output_ids: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    lse: list[float] = field(default_factory=list)
    finished: bool = False
    cols: list[int] = field(default_factory=list)  # KV-cache columns of the answer tokens fed so far
    hidden: list[torch.Tensor] = field(default_factory=list)  # output-head inputs [H] per step (keep_hidden)
    input_hidden: np.ndarray | None = None  # float16 [H]: layer `hidden_layer`, averaged over the prompt's rest


@dataclass
class DecodedBatch:
    """A decoded batch and the KV cache it leaves, for scoring alternatives afterwards."""

    rests: list[list[int]]
    rows: list[Generation]
    cache: object
    n_prefix: int
    max_rest: int

    def columns(self, b: int, upto: int) -> list[int]:
        """Cache columns of row b's first `upto` real tokens (prefix, rest, fed answer tokens)."""
        p, rest = self.n_prefix, len(self.rests[b])
        return list(range(min(upto, p + rest))) + self.rows[b].cols[: max(0, upto - p - rest)]

    def token(self, b: int, s: int) -> int:
        """Token id at sequence index s of row b (s >= n_prefix)."""
        rest = self.rests[b]
        s -= self.n_prefix
        return rest[s] if s < len(rest) else self.rows[b].output_ids[s - len(rest)]


class Decoder:
    """Greedy constrained decoding of many inputs with one teacher, task and grammar.

    Args:
        keep_ids: teacher ids whose raw logits are stored per step (the kept vocabulary), or None.
        use_drafts: verify grammar-forced drafts in one pass (False: one token per pass; same result).
        keep_hidden: also keep each step's output-head input, to compute logits at ids chosen later.
        hidden_layer: also keep, per row, the hidden state after this layer (0 = embeddings)
            averaged over the row's own prompt tokens (the input and the template around it; the
            shared prefix excluded): a summary of how the teacher reads the input, for
            hidden-state distillation. It comes from the forward pass decoding needs anyway.
        drafter: proposes tokens after the grammar's (students/decoder/draft.py); checked
            as the grammar's are, so the answers do not change. `passes` counts the forward passes.
    """

    def __init__(self, teacher: Teacher, task: Task, grammar: Grammar, keep_ids: Sequence[int] | None = None,
                 use_drafts: bool = True, keep_hidden: bool = False, hidden_layer: int | None = None,
                 drafter=None):
        self.teacher, self.task, self.grammar, self.drafter, self.passes = teacher, task, grammar, drafter, 0
        self.use_drafts, self.keep_hidden, self.hidden_layer = use_drafts, keep_hidden, hidden_layer
        self._hidden: torch.Tensor | None = None
        self.model = teacher.model
        self.device = next(self.model.parameters()).device  # tensors are built on the CPU and sent there
        self.layout = prompt_layout(teacher, task)
        self.keep = None if keep_ids is None else torch.as_tensor(list(keep_ids), dtype=torch.long)
        self.pad_id = teacher.pad_id
        self.prefix_cache = None
        if self.layout.prefix_ids:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([self.layout.prefix_ids], device=self.device), use_cache=True)
            self.prefix_cache = out.past_key_values

    def rest_ids(self, text: str) -> list[int]:
        """Token ids of the per-input part of the prompt."""
        lay = self.layout
        return self.teacher.tokenizer(lay.head + text + lay.tail, add_special_tokens=lay.add_special).input_ids

    def cache_for(self, n: int):
        """A cache holding the prompt prefix, once per row of a batch of n."""
        from transformers import DynamicCache

        if self.prefix_cache is None:
            return DynamicCache(config=self.model.config)
        cache = copy.deepcopy(self.prefix_cache)
        cache.batch_repeat_interleave(n)
        return cache

    @torch.inference_mode()
    def generate(self, rests: list[list[int]], max_tokens: int, mass: torch.Tensor | None = None,
                 texts: list[str] | None = None) -> DecodedBatch:
        """Decode a batch of prompts (rest ids, prefix excluded) greedily under the grammar.

        Each step feeds every row's pending token plus a draft of the tokens the grammar forces
        next (keys, punctuation, the rest of a started value); one forward pass then checks the
        whole draft, as in speculative decoding: a draft token is kept only if it is the masked
        argmax, so the result is exactly token-by-token greedy decoding, in ~4x fewer passes.

        Args:
            mass: float64 [V] accumulator; if given, the softmax of every output step is added to it.
            texts: the rows' input texts, for the drafter.
        Returns the batch; a row with `finished=False` hit `max_tokens`.
        """
        head = self.model.get_output_embeddings()
        hook = head.register_forward_hook(lambda m, args, out: setattr(self, "_hidden", args[0])) if self.keep_hidden else None
        if self.drafter is not None:
            self.drafter.start(texts)
        try:
            return self._generate(rests, max_tokens, mass)
        finally:
            if hook is not None:
                hook.remove()

    def rows_after_prefix(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token rows to run after the cached prefix: ids [n, W] right-padded, the attention mask
        [n, P + W] (the prefix, then each row's own tokens) and the positions [n, W]."""
        n, p, width = len(seqs), len(self.layout.prefix_ids), max(len(s) for s in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attn = torch.ones(n, p + width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            attn[b, p + len(s) :] = 0
        return ids, attn, (p + torch.arange(width)).expand(n, width)

    def _generate(self, rests: list[list[int]], max_tokens: int, mass: torch.Tensor | None) -> DecodedBatch:
        n, p = len(rests), len(self.layout.prefix_ids)
        lens = torch.tensor([len(r) for r in rests])
        ids, attn, pos = self.rows_after_prefix(rests)
        cache = self.cache_for(n)
        # only each row's last real position needs the (vocabulary-wide, costly) output projection
        dev = self.device
        out = self.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), past_key_values=cache,
                         use_cache=True, logits_to_keep=(lens - 1)[:, None].to(dev),
                         output_hidden_states=self.hidden_layer is not None)
        rows = [Generation() for _ in range(n)]
        if self.hidden_layer is not None:
            real = attn[:, p:, None].float().to(dev)  # [n, width, 1]
            pooled = ((out.hidden_states[self.hidden_layer].float() * real).sum(1) / real.sum(1)).cpu()
            for b, row in enumerate(rows):
                row.input_hidden = pooled[b].half().numpy()
        state = self.grammar.batch(n)
        drafts: dict[int, list[int]] = {b: [] for b in range(n)}
        next_pos = p + lens
        proposed: dict[int, int] = {}  # the drafter's tokens at the end of each row's draft
        for step in range(max_tokens):
            start = {b: len(rows[b].output_ids) for b in proposed}
            accepted = self._verify(rows, state, out.logits, drafts, max_tokens, mass)
            self.passes += 1
            if proposed:  # the drafter's tokens end each draft: how many of them the teacher chose
                self.drafter.accepted += sum(max(0, _agreeing(rows[b].output_ids[start[b]:], drafts[b]) - len(drafts[b]) + n)
                                             for b, n in proposed.items())
            if step:  # an answer chunk: keep the pending token's and the confirmed drafts' columns
                first = attn.shape[1] - out.logits.shape[1]
                for b, a in accepted.items():
                    rows[b].cols.extend(range(first, first + 1 + a))
                    attn[b, first + 1 + a :] = 0
                    next_pos[b] += 1 + a
            pending = [b for b in range(n) if not rows[b].finished and len(rows[b].output_ids) < max_tokens]
            if not pending:
                break
            drafts = {b: self.grammar.forced_tokens(state.matchers[b], max_tokens - len(rows[b].output_ids) - 1)
                      if self.use_drafts else [] for b in pending}
            proposed = self._propose(rows, drafts, max_tokens)
            chunk = 1 + max(len(d) for d in drafts.values())
            ids = torch.full((n, chunk), self.pad_id, dtype=torch.long)
            new_attn = torch.zeros(n, chunk, dtype=torch.long)
            for b, d in drafts.items():
                ids[b, : 1 + len(d)] = torch.tensor([rows[b].output_ids[-1], *d])
                new_attn[b, : 1 + len(d)] = 1
            attn = torch.cat([attn, new_attn], dim=1)
            pos = next_pos[:, None] + torch.arange(chunk)
            out = self.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                             past_key_values=cache, use_cache=True)
        return DecodedBatch(rests, rows, cache, p, int(lens.max()))

    def _propose(self, rows: list[Generation], drafts: dict[int, list[int]], max_tokens: int) -> dict[int, int]:
        """Extend each row's draft with the drafter's tokens; returns how many it added per row."""
        if self.drafter is None:
            return {}
        budgets = {b: max_tokens - len(rows[b].output_ids) - 1 - len(d) for b, d in drafts.items()}
        more = self.drafter.propose({b: rows[b].output_ids for b in drafts}, drafts, budgets)
        for b, extra in more.items():
            drafts[b] = drafts[b] + extra
        return {b: len(extra) for b, extra in more.items()}

    def _verify(self, rows: list[Generation], state, logits: torch.Tensor, drafts: dict[int, list[int]],
                max_tokens: int, mass: torch.Tensor | None) -> dict[int, int]:
        """Choose tokens from a chunk's logits [n, W, V], row by row, while they confirm the draft.

        Every chosen token's raw logits are recorded. Returns, per row fed in this chunk, how many
        draft tokens were confirmed (their cache columns hold valid keys and values).
        """
        raw = logits.float().cpu()  # the grammar masks on the CPU
        lse = torch.logsumexp(raw, dim=-1)  # [n, W]
        kept = raw[:, :, self.keep].half().numpy() if self.keep is not None else None
        accepted: dict[int, int] = {}
        for b in drafts:
            draft, row, a = drafts[b], rows[b], 0
            for i in range(1 + len(draft)):
                row.lse.append(float(lse[b, i]))
                if kept is not None:
                    row.logits.append(kept[b, i])
                if mass is not None:
                    mass += torch.exp(raw[b, i] - lse[b, i]).double()
                if self.keep_hidden:
                    row.hidden.append(self._hidden[b, i].cpu().clone())
                token = int(state.mask_(raw[b, i : i + 1].clone(), rows=[b]).argmax())
                row.output_ids.append(token)
                state.accept(b, token)
                row.finished = state.done(b)
                if row.finished or len(row.output_ids) >= max_tokens or i == len(draft) or token != draft[i]:
                    break
                a += 1
            accepted[b] = a
        return accepted

    # ---- decision points ------------------------------------------------------------------
    @torch.inference_mode()
    def decisions(self, batch: DecodedBatch, output_texts: list[str | None]) -> list[dict[str, np.ndarray]]:
        """P(value) of every enum field at its position in each row's own answer.

        P(value) is the product of the value's token probabilities under teacher forcing
        (the raw, unconstrained teacher), normalised over the field's values. All values of
        all fields of all rows are scored in ONE forward pass: each is a short branch appended
        to the batch's KV cache, seeing only the answer before its field (a tree-shaped mask).
        Rows whose text is None (answers cut at max_tokens) are skipped.
        Returns per row {field: float32 [n_values]} ({} for skipped rows).
        """
        fields = self.task.enum_fields
        if not fields:
            return [{} for _ in batch.rows]
        plans = [self._plan_row(batch, b, t) if t is not None else ([], []) for b, t in enumerate(output_texts)]
        width = max(len(nodes) for nodes, _ in plans)
        if width == 0:
            return [{} for _ in batch.rows]
        past = batch.cache.get_seq_length()
        n = len(plans)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        allow = torch.zeros((n, 1, width, past + width), dtype=torch.bool)
        allow[:, 0, :, 0] = True  # padding nodes see one real column, so no attention row is empty
        for b, (nodes, _) in enumerate(plans):
            for i, (tok, p, n_ctx, ancestors) in enumerate(nodes):
                ids[b, i], pos[b, i] = tok, p
                allow[b, 0, i, batch.columns(b, n_ctx)] = True
                allow[b, 0, i, [past + a for a in ancestors] + [past + i]] = True
        dtype = next(self.model.parameters()).dtype  # an additive mask must match the model's dtype
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
        dev = self.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         past_key_values=batch.cache, use_cache=True)
        logp = out.logits.float().log_softmax(-1)  # [n, width, V]
        # only the scored tokens' log-probabilities leave the device, in one transfer
        at = [(b, node, tok) for b, (_, scores) in enumerate(plans) for _, chain, cont in scores
              for node, tok in zip(chain, cont)]
        picked = iter(logp[tuple(torch.tensor(c, device=dev) for c in zip(*at))].cpu()) if at else iter(())
        result = []
        for b, (_, scores) in enumerate(plans):
            per_field: dict[str, list[float]] = {f.name: [] for f in fields}
            for name, chain, cont in scores:
                per_field[name].append(float(sum(next(picked) for _ in cont)))
            result.append({k: torch.tensor(v).softmax(0).numpy().astype(np.float32) for k, v in per_field.items() if v})
        return result

    def _plan_row(self, batch: DecodedBatch, b: int, text: str) -> tuple[list, list]:
        """Branch nodes for one row: (token, position, visible real tokens, ancestor nodes), and per
        value (field, nodes whose logits predict its tokens, its tokens)."""
        tok = self.teacher.tokenizer
        out_ids = batch.rows[b].output_ids
        offsets = [len(tok.decode(out_ids[:t])) for t in range(len(out_ids))]
        start_of_answer = batch.n_prefix + len(batch.rests[b])
        nodes: list[tuple[int, int, int, list[int]]] = []
        scores: list[tuple[str, list[int], list[int]]] = []
        for f, start in zip(self.task.enum_fields, value_starts(self.task, text)):
            j = max(t for t, off in enumerate(offsets) if off <= start)  # answer token the value starts in
            head = text[offsets[j] : start]  # usually "": the value starts on a token boundary
            s = start_of_answer + j - 1  # sequence index of the token whose logits predict answer token j
            dup = len(nodes)
            # the predicting token again, seeing exactly what it saw when it was decoded
            nodes.append((batch.token(b, s), s, s, []))
            for value in f.values:
                cont = tok(head + json.dumps(value, ensure_ascii=False)[1:-1], add_special_tokens=False).input_ids
                chain = [dup]
                for k, c in enumerate(cont[:-1]):
                    nodes.append((c, s + 1 + k, s, list(chain)))
                    chain.append(len(nodes) - 1)
                scores.append((f.name, chain, cont))
        return nodes, scores


def _agreeing(chosen: list[int], draft: list[int]) -> int:
    """How many leading tokens of a draft the teacher chose (chosen: its tokens from that step on)."""
    return next((i for i, (c, d) in enumerate(zip(chosen, draft)) if c != d), min(len(chosen), len(draft)))


def head_logits(model, hidden: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Logits at `ids` from output-head inputs: float32 [n, H] -> [n, len(ids)].

    Only valid for a plain linear head (callers check it against a full row: some models
    post-process logits, e.g. soft-capping).
    """
    head = model.get_output_embeddings()
    index = torch.as_tensor(list(ids), dtype=torch.long, device=head.weight.device)
    bias = head.bias[index] if getattr(head, "bias", None) is not None else None
    return torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight[index], bias).float()


def value_starts(task: Task, text: str) -> list[int]:
    """Character offset of each enum field's value (after its opening quote) in an answer text."""
    starts, pos = [], 0
    for f in task.output.fields:
        m = re.compile(re.escape(json.dumps(f.name, ensure_ascii=False)) + r'\s*:\s*"?').search(text, pos)
        if m is None:
            raise GenerationError(f"field {f.name!r} not found in the answer {text!r}")
        pos = m.end()
        if isinstance(f, EnumField):
            starts.append(pos)
    return starts
