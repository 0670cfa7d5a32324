"""The student: a small decoder-only model in the Gemma style, readable in one sitting.

    from microdistill.students.decoder.model import Student   # Student(config_for("micro", ...)) (config.py)

One row is the sequence `BOS input... SEP out_0 ... out_{n-2}`. The input part (BOS, input
tokens, SEP) is embedded with the input table, the output part with a separate output table,
and a head tied to the output table scores the next output token at SEP and at every output
position. Building blocks follow Gemma: RMSNorm with a `(1 + w)` gain, rotary positions,
multi-head attention, a GeGLU MLP, pre-norm residual blocks, a final norm, and embeddings
scaled by sqrt(d_model).

Input indices: PAD=0, BOS=1, SEP=2, then the teacher's input tokens (config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from microdistill.students.decoder.config import BOS, N_SPECIAL, PAD, SEP, StudentConfig

INIT_STD = 0.02


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) · (1 + w), w starting at 0, computed in float32."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_angles(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, L, head_dim] for integer positions pos [B, L] (RoFormer, Su et al. 2021)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv_freq  # [B, L, head_dim/2]
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [B, H, L, head_dim], the half-split layout Gemma uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.o = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, L, D], mask [B, 1, L, L_past + L] (True = may attend); returns y [B, L, D] and (k, v)
        [B, H, L_past + L, head_dim] with rotary already applied to k, so a cache never re-rotates."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, L, D)), (k, v)


class GeGLU(nn.Module):
    """down(gelu_tanh(x W_gate) * (x W_up)) (Shazeer 2020, "GLU Variants"; Gemma's MLP)."""

    def __init__(self, c: StudentConfig):
        super().__init__()
        self.gate = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Block(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.d_model), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.d_model), GeGLU(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.mlp_norm(x))), kv


@dataclass
class KVCache:
    """Decoding state: per layer (k, v) [B, H, L, head_dim], which keys are real (valid [B, L],
    False at input padding) and the rotary position of the next token (pos [B])."""

    kv: list[tuple[Tensor, Tensor]]
    valid: Tensor
    pos: Tensor

    def select(self, rows: Tensor) -> KVCache:
        """The cache of a subset of rows (e.g. to drop finished sequences from a batch)."""
        return KVCache([(k[rows], v[rows]) for k, v in self.kv], self.valid[rows], self.pos[rows])

    def __len__(self) -> int:
        return self.valid.shape[1]

    def truncate(self, lengths: Tensor) -> KVCache:
        """Keep only the first lengths[b] real tokens of each row b (e.g. to drop rejected drafts).

        Later keys are masked out, columns no row still uses are cut off, and the next rotary
        position becomes lengths[b] (positions count real tokens only)."""
        lengths = lengths.to(self.pos)
        if bool((lengths > self.pos).any()) or bool((lengths < 0).any()):
            raise ValueError("KVCache.truncate: lengths must be between 0 and each row's current length")
        valid = self.valid & (self.valid.long().cumsum(1) <= lengths[:, None])
        used = valid.any(0).nonzero()
        width = int(used[-1]) + 1 if len(used) else 0
        kv = [(k[:, :, :width], v[:, :, :width]) for k, v in self.kv]
        return KVCache(kv, valid[:, :width], lengths.clone())


class Student(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = c = config
        self.embed_in = nn.Embedding(c.input_vocab, c.d_model)
        self.embed_out = nn.Embedding(c.output_vocab, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere, residual projections shrunk by sqrt(2·n_layers) so the residual
        stream's variance does not grow with depth (GPT-2, Radford et al. 2019)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p)
            else:
                residual = name.endswith((".o.weight", ".down.weight"))
                nn.init.normal_(p, 0.0, INIT_STD / math.sqrt(2 * self.config.n_layers) if residual else INIT_STD)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_in

    def _embed(self, table: nn.Embedding, ids: Tensor) -> Tensor:
        # Gemma multiplies embeddings by sqrt(d_model) so they match the residual stream's scale.
        return self.drop(table(ids) * math.sqrt(self.config.d_model))

    def _logits(self, h: Tensor) -> Tensor:
        # Head tied to the output embedding (as Gemma ties its head): the same vector that says
        # "token k was produced" scores "token k comes next", and the head costs no parameters.
        return F.linear(self.norm(h), self.embed_out.weight)

    def _run(self, x: Tensor, pos: Tensor, mask: Tensor, past: KVCache | None = None):
        """x [B, L, D], pos [B, L], mask [B, 1, L, L_past + L] -> h [B, L, D], per-layer (k, v)."""
        cos, sin = rope_angles(pos, self.config.head_dim, self.config.rope_theta)
        kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block(x, cos, sin, mask, past.kv[i] if past is not None else None)
            kv.append(layer_kv)
        return x, kv

    def _prompt(self, inp: Tensor) -> tuple[Tensor, Tensor]:
        """inp [B, Li] -> ids [B, Li + 2] = BOS inp SEP, valid [B, Li + 2] (False at padding)."""
        B, Li = inp.shape
        if Li > self.config.max_input:
            raise ValueError(f"input of {Li} tokens exceeds the student's max_input={self.config.max_input}")
        bos = inp.new_full((B, 1), BOS)
        sep = inp.new_full((B, 1), SEP)
        ones = torch.ones(B, 1, dtype=torch.bool, device=inp.device)
        return torch.cat([bos, inp, sep], 1), torch.cat([ones, inp != PAD, ones], 1)

    @staticmethod
    def _mask(valid: Tensor) -> Tensor:
        """Causal mask that also hides padded keys: valid [B, L] -> [B, 1, L, L]."""
        L = valid.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
        return causal & valid[:, None, None, :]

    def forward(self, inp: Tensor, out_in: Tensor) -> Tensor:
        """Teacher-forced logits.

        inp [B, Li]: input indices without BOS/SEP, right-padded with PAD.
        out_in [B, Lo]: previous output tokens (output_ids[:-1]); right-padding may hold any valid
        index or a negative fill (read as 0): a causal model never lets it reach earlier positions.
        Returns [B, Lo + 1, output_vocab]; position j predicts output token j (0 = at SEP).
        """
        return self._logits(self._teacher_forced(inp, out_in)[:, inp.shape[1] + 1:])

    def forward_pooled(self, inp: Tensor, out_in: Tensor) -> tuple[Tensor, Tensor]:
        """`forward`'s logits and the input's representation [B, D]: the final (normalised)
        hidden states averaged over the real input tokens, for hidden-state distillation."""
        h = self._teacher_forced(inp, out_in)
        real = (inp != PAD).unsqueeze(-1).to(h.dtype)
        pooled = (self.norm(h[:, 1 : inp.shape[1] + 1]) * real).sum(1) / real.sum(1).clamp_min(1)
        return self._logits(h[:, inp.shape[1] + 1:]), pooled

    def _teacher_forced(self, inp: Tensor, out_in: Tensor) -> Tensor:
        """The final hidden states [B, Li + 2 + Lo, D] of BOS inp SEP out_in."""
        Lo = out_in.shape[1]
        if Lo + 1 > self.config.max_output:
            raise ValueError(f"{Lo + 1} output positions exceed the student's max_output={self.config.max_output}")
        ids, valid = self._prompt(inp)
        x = torch.cat([self._embed(self.embed_in, ids), self._embed(self.embed_out, out_in.clamp_min(0))], 1)
        valid = torch.cat([valid, torch.ones_like(out_in, dtype=torch.bool)], 1)
        # Positions count real tokens only, so padding never shifts a row's rotary phases.
        pos = valid.long().cumsum(1) - 1
        h, _ = self._run(x, pos, self._mask(valid))
        return h

    @torch.no_grad()
    def prefill(self, inp: Tensor) -> tuple[Tensor, KVCache]:
        """inp [B, Li] (as in forward) -> logits of output token 0 [B, output_vocab], cache."""
        ids, valid = self._prompt(inp)
        pos = valid.long().cumsum(1) - 1
        h, kv = self._run(self._embed(self.embed_in, ids), pos, self._mask(valid))
        return self._logits(h[:, -1]), KVCache(kv, valid, pos[:, -1] + 1)

    @torch.no_grad()
    def decode_step(self, tok: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """tok [B] (the output token just chosen) -> logits of the next one [B, output_vocab], cache.

        Stopping is the caller's job (EOS or max_output); positions past training lengths still work.
        """
        logits, cache = self.decode_tokens(tok[:, None], cache)
        return logits[:, 0], cache

    @torch.no_grad()
    def decode_tokens(self, tok: Tensor, cache: KVCache, lengths: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """tok [B, n] (output tokens following the cache) -> logits [B, n, output_vocab], cache.

        Position j scores the token after tok[:, j], as n calls of decode_step would. lengths [B]
        (default n) says how many leading tokens of each row are real: the rest is padding, kept
        out of the cache's keys (its logits are meaningless). `cache.truncate` drops tokens again.
        """
        B, n = tok.shape
        lengths = torch.full((B,), n, dtype=torch.long, device=tok.device) if lengths is None else lengths.to(tok.device)
        new_valid = torch.arange(n, device=tok.device)[None, :] < lengths[:, None]
        causal = torch.ones(n, n, dtype=torch.bool, device=tok.device).tril()
        # Padding follows the real tokens of its row, so the causal part never lets it reach them.
        # expand(-1) rather than len(cache): a traced graph (export_decoder.py) keeps the cache length dynamic
        mask = torch.cat([cache.valid[:, None, None, :].expand(-1, -1, n, -1), causal.expand(B, 1, n, n)], -1)
        pos = cache.pos[:, None] + torch.arange(n, device=tok.device)
        h, kv = self._run(self._embed(self.embed_out, tok), pos, mask, cache)
        return self._logits(h), KVCache(kv, torch.cat([cache.valid, new_valid], 1), cache.pos + lengths)


@torch.no_grad()
def init_input_embeddings_pca(model: Student, teacher_rows: Tensor) -> None:
    """Input rows N_SPECIAL.. from the teacher's embedding rows teacher_rows [n, D_teacher].

    The rows are centred and projected on their top principal directions (up to d_model of
    them), then rescaled to the default init's std, so words the teacher treats alike start
    alike while the activations keep the scale the rest of the model was initialised for.
    """
    n = teacher_rows.shape[0]
    room = model.config.input_vocab - N_SPECIAL
    if n > room:
        raise ValueError(f"{n} teacher rows do not fit the student's {room} non-special input rows")
    x = teacher_rows.double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # principal directions, strongest first
    q = min(model.config.d_model, vh.shape[0])
    proj = torch.zeros(n, model.config.d_model, dtype=torch.float64)
    proj[:, :q] = x @ vh[:q].T
    # Rescale so the whole block has the default init's std (columns beyond q stay zero).
    proj *= INIT_STD / proj.pow(2).mean().sqrt().clamp_min(1e-12)
    w = model.embed_in.weight
    w[N_SPECIAL:N_SPECIAL + n] = proj.to(dtype=w.dtype, device=w.device)
