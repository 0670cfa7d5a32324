"""A student body cut from the teacher itself: its first blocks, their MLPs pruned, its input rows.

    microdistill train --student heads --encoder teacher --data runs/demo/shards --out runs/demo/cut
    microdistill train --student heads --encoder teacher --encoder-layers 1 --mlp-width 2048 ...

Prune, then distil (Minitron, Sheared-LLaMA): rather than a body trained elsewhere, the student
starts from the teacher's own weights. `cut_teacher` keeps the teacher's first `layers`
transformer blocks (depth pruning), then each block's MLP keeps the `mlp_width` hidden neurons
with the largest mean activation |act(gate·x)·(up·x)| over the training inputs (width pruning
by activation importance), and the input embedding keeps the rows of the tokens the training
inputs use, the 256 byte tokens and the specials (vocab.build_input_vocab), so any text still
encodes. Attention and the residual width stay whole. The student, body and heads, stays within
15M parameters: when the inputs use more tokens than the rows the rest leaves room for, the
rarest are spelled in bytes. For the 0.5B Qwen teacher, two blocks at width 1,024 hold 9.2M
parameters, which leaves room for ~6,400 input rows; the teacher has 494M. Last, the final
norm's gain is rescaled to the cut body's outputs (`standardise_output`).

The body reads the teacher's tokenizer (`TeacherTokens`); the classifier-head student
(heads.py) puts its heads on the mean of the final states, and its folder keeps the teacher's
tokenizer/ and the input vocabulary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from functools import cached_property
from typing import Any, Sequence

import torch
from torch import nn

from microdistill.core.console import say
from microdistill.data.corpus import by_length
from microdistill.core.errors import UserError
from microdistill.data.vocab import InputEncoder, build_input_vocab

TEACHER = "teacher"  # --encoder teacher: the body is cut from the teacher that labelled the shards
DEFAULT_LAYERS = 2
DEFAULT_MLP_WIDTH = 1024
BUDGET = 15_000_000  # parameters of the student (body and heads): the input rows get what the rest leaves


class TeacherBodyError(UserError):
    """A teacher that cannot give a student body; one line for the user."""


def is_teacher_spec(spec: str) -> bool:
    """`teacher` (the shards' teacher) or `teacher:SPEC` (a teacher preset, folder or .gguf)."""
    return spec == TEACHER or spec.startswith(TEACHER + ":")


@dataclass
class TeacherTokens:
    """The teacher's tokenization limited to the body's input rows, read like a `tokenizers.Tokenizer`:
    `encode_batch(texts)[i].ids` (and `encode(text).ids`) are row indices.

    input_vocab[k] is the teacher id of row k; a token outside it is spelled in byte tokens."""

    tokenizer: Any  # the teacher's transformers tokenizer
    input_vocab: list[int]

    @cached_property
    def _encoder(self) -> InputEncoder:
        return InputEncoder(self.tokenizer, self.input_vocab)

    @cached_property
    def _row(self) -> dict[int, int]:
        return {t: k for k, t in enumerate(self.input_vocab)}

    def encode(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(ids=[self._row[i] for i in self._encoder.encode(text)])

    def encode_batch(self, texts: Sequence[str]) -> list[SimpleNamespace]:
        return [self.encode(t) for t in texts]


def blocks_of(body: nn.Module) -> nn.ModuleList:
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TeacherBodyError(f"teacher model {type(body).__name__}: no list of decoder blocks (.layers) to cut")
    return layers


def mlp_linears(block: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(the linears into the MLP's hidden width, the one out of it) of a gated MLP block
    (gate_proj, up_proj, down_proj: Qwen, Gemma, Llama)."""
    mlp = getattr(block, "mlp", None)
    names = ("gate_proj", "up_proj", "down_proj")
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
        raise TeacherBodyError(f"teacher block {type(block).__name__}: not a gated MLP (gate_proj, up_proj, down_proj); "
                               "this teacher cannot be width-pruned")
    return [mlp.gate_proj, mlp.up_proj], mlp.down_proj


def padded(ids: list[list[int]], batch_size: int = 16):
    """(input_ids, attention_mask) [B, L] batches of the non-empty sequences of `ids`, shortest first."""
    ids = [x for x in ids if x]
    for chunk in by_length([len(x) for x in ids], batch_size):
        x = torch.zeros(len(chunk), max(len(ids[i]) for i in chunk), dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, i in enumerate(chunk):
            x[row, :len(ids[i])], mask[row, :len(ids[i])] = torch.tensor(ids[i]), 1
        yield x, mask


@torch.no_grad()
def mlp_importance(body: nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    """Per block, the mean |activation| [intermediate] of each MLP hidden neuron over every real
    token of `ids` (teacher ids): what flows into down_proj."""
    downs = [mlp_linears(b)[1] for b in blocks_of(body)]
    sums = [torch.zeros(d.in_features) for d in downs]
    seen: dict[int, torch.Tensor] = {}  # block -> the input of its down_proj in the current batch
    handles = [d.register_forward_pre_hook(lambda module, args, k=k: seen.__setitem__(k, args[0]))
               for k, d in enumerate(downs)]
    count = 0
    try:
        for x, mask in padded(ids):
            body(input_ids=x, attention_mask=mask)
            m = mask.unsqueeze(-1)
            for k, acts in seen.items():
                sums[k] += (acts.abs() * m).sum((0, 1)).float()
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


@torch.no_grad()
def standardise_output(body: nn.Module, ids: list[list[int]]) -> None:
    """Rescale the final norm's gain so that every output channel has RMS 1 over the real tokens of
    `ids`. That gain was learnt for the teacher's last block; after its first blocks it leaves a few
    channels ~30x the rest, and the new heads, moved by Adam at one rate for all weights, swing on them."""
    norm = getattr(body, "norm", None)
    if not isinstance(getattr(norm, "weight", None), nn.Parameter):
        return
    sq, count = torch.zeros(body.config.hidden_size), 0
    for x, mask in padded(ids):
        h = body(input_ids=x, attention_mask=mask).last_hidden_state
        sq += (h.float() ** 2 * mask.unsqueeze(-1)).sum((0, 1))
        count += int(mask.sum())
    rms = (sq / max(count, 1)).sqrt().clamp_min(1e-6)
    w = norm.weight.data
    gain = w.clone()
    w.zero_()  # a norm that scales by (1 + weight), as Gemma's, still answers with weight 0
    offset = float(norm(torch.ones(1, w.numel())).abs().max() > 0)
    w.copy_((gain + offset) / rms - offset)


def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    """Keep the MLP hidden neurons `keep` (indices, in their old order) of `block`."""
    ins, out = mlp_linears(block)
    keep = keep.sort().values
    for lin in ins:
        lin.weight = nn.Parameter(lin.weight.data[keep].clone())
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[keep].clone())
        lin.out_features = len(keep)
    out.weight = nn.Parameter(out.weight.data[:, keep].clone())
    out.in_features = len(keep)


def input_rows(tokenizer, ids: list[list[int]], most: int) -> list[int]:
    """The teacher ids the body keeps rows for: the byte tokens and specials, then the tokens `ids`
    use, the most frequent first, up to `most` rows in all (the rest are spelled in bytes)."""
    always = set(build_input_vocab(tokenizer, []))
    counts = Counter(i for seq in ids for i in seq if i not in always)
    used = [i for i, _ in counts.most_common(max(most - len(always), 0))]
    return build_input_vocab(tokenizer, [used])


def cut_teacher(spec: str, shards, texts: Sequence[str], layers: int | None, mlp_width: int | None,
                progress: bool = True, outputs: int = 0) -> tuple[nn.Module, TeacherTokens, str]:
    """(the pruned body, its tokenizer, the teacher's name) from teacher `spec` (`teacher`: the one
    that labelled `shards`; `teacher:SPEC`: another spec with the same tokenizer), measured on `texts`.
    `outputs`: how many logits the heads on top give, whose weights count within the budget too."""
    from microdistill.teachers import load_teacher, preset_of

    recorded = shards.manifest.get("teacher") or {}
    source = spec.split(":", 1)[1] if spec != TEACHER else (preset_of(recorded.get("source", "")) or recorded.get("source", ""))
    if not source:
        raise TeacherBodyError(f"shard folder {shards.dir}: its manifest names no teacher; give one with --encoder teacher:SPEC")
    say(f"cutting the student's body from the teacher {source}", progress)
    try:
        teacher = load_teacher(source)
    except UserError as e:
        raise TeacherBodyError(f"--encoder {spec}: {e}") from None
    tokenizer = shards.tokenizer()
    if teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TeacherBodyError(f"--encoder {spec}: the teacher {source} tokenizes differently from the one that labelled "
                               f"{shards.dir}; cut the body from that teacher (--encoder teacher)")
    body = teacher.model.base_model
    blocks = blocks_of(body)
    layers = layers or DEFAULT_LAYERS
    if not 1 <= layers <= len(blocks):
        raise TeacherBodyError(f"--encoder-layers {layers}: the teacher has {len(blocks)} blocks; choose 1 to {len(blocks)}")
    width = mlp_linears(blocks[0])[1].in_features
    mlp_width = min(mlp_width or DEFAULT_MLP_WIDTH, width)
    body.layers = blocks[:layers]
    config = body.config
    config.num_hidden_layers, config.use_cache = layers, False
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]

    teacher_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    if mlp_width < width:
        for block, score in zip(body.layers, mlp_importance(body, teacher_ids)):
            prune_mlp(block, score.topk(mlp_width).indices)
        config.intermediate_size = mlp_width
    standardise_output(body, teacher_ids)
    emb = body.get_input_embeddings()
    others = sum(p.numel() for p in body.parameters()) - emb.weight.numel() + (config.hidden_size + 1) * outputs
    tokens = TeacherTokens(tokenizer, input_rows(tokenizer, teacher_ids, (BUDGET - others) // config.hidden_size))

    # pruned in place: a subclass (Gemma's scaled embedding) keeps its behaviour
    emb.weight = nn.Parameter(emb.weight.data[torch.as_tensor(tokens.input_vocab, dtype=torch.long)].clone())
    emb.num_embeddings, emb.padding_idx = len(tokens.input_vocab), None
    config.vocab_size = len(tokens.input_vocab)
    # no row of the pruned table is reserved for padding (the mask hides pads); the body never generates
    config.pad_token_id = config.bos_token_id = config.eos_token_id = None
    body.requires_grad_(True)
    return body.float(), tokens, teacher.name
