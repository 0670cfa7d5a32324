"""A decoder student's shape: its config, the size presets, and its parameter count, without torch.

    python -c "from microdistill.students.decoder.config import PRESETS, StudentConfig, config_for, describe; \
print(describe(config_for('micro', 5003, 512, 25, 50)))"

Input indices: PAD=0, BOS=1, SEP=2, then a teacher input token at `N_SPECIAL + its position in
the shard manifest's input vocabulary` (the mapping lives with the trainer and the saved folder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PAD, BOS, SEP = 0, 1, 2
N_SPECIAL = 3
LARGE_INPUT_VOCAB = 262_144  # the Gemma 3 tokenizer: every input row kept, as the original work did
DEFAULT_PRESET = "micro"  # the decoder size every verb starts from


@dataclass(frozen=True)
class StudentConfig:
    input_vocab: int  # including the N_SPECIAL rows
    output_vocab: int  # the kept output vocabulary (plus a tail class when the trainer opts in)
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_input: int  # input tokens, without BOS/SEP
    max_output: int  # output tokens, EOS included
    rope_theta: float = 10000.0
    dropout: float = 0.0  # on each residual branch; 0 keeps training deterministic given the data

    def __post_init__(self) -> None:
        for name in ("input_vocab", "output_vocab", "d_model", "n_layers", "n_heads", "d_ff", "max_input", "max_output"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"StudentConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.input_vocab <= N_SPECIAL:
            raise ValueError(f"StudentConfig.input_vocab must exceed the {N_SPECIAL} special rows, got {self.input_vocab}")
        if self.d_model % self.n_heads:
            raise ValueError(f"StudentConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"StudentConfig.n_heads: head size {self.head_dim} must be even for rotary positions")
        if self.rope_theta <= 0:
            raise ValueError(f"StudentConfig.rope_theta must be positive, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"StudentConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"StudentConfig: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)


# Shapes by total size at a realistic vocabulary (input ~5,000 rows, output ~512). d_ff = 4·d_model
# everywhere: the original work's published shape (hidden 1024, 16 layers, 262,144 input rows) only adds
# up to its ~530M parameters with a 4x gated MLP (16 layers × (4d² attention + 3·d·4d MLP) ≈ 268M
# beside 268M of input embeddings), so the small presets keep the same proportions.
PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(d_model=96, n_layers=4, n_heads=4, d_ff=384),  # ~1.1M
    "micro": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024),  # ~5.6M
    "small": dict(d_model=384, n_layers=8, n_heads=6, d_ff=1536),  # ~21M
    "large": dict(d_model=1024, n_layers=16, n_heads=16, d_ff=4096),  # ~537M, the original work's student
}
PRESET_ALIASES = {"seed": "large"}  # the name of "large" in folders written before the rename


def config_for(preset: str, input_vocab: int, output_vocab: int, max_input: int, max_output: int,
               dropout: float = 0.0) -> StudentConfig:
    """The config of a size preset for a given vocabulary and context."""
    if preset not in PRESETS:
        raise ValueError(f"unknown student preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "large":
        # The original work kept the teacher's whole input embedding table; never shrink below a caller's need.
        input_vocab = max(input_vocab, LARGE_INPUT_VOCAB)
    return StudentConfig(input_vocab=input_vocab, output_vocab=output_vocab, max_input=max_input,
                         max_output=max_output, dropout=dropout, **PRESETS[preset])


def parameter_count(config: StudentConfig) -> int:
    """Parameters of `Student(config)`, computed without building it (the head is tied)."""
    d = config.d_model
    per_layer = 4 * d * d + 3 * d * config.d_ff + 2 * d  # qkv + o, gate/up/down, two norms
    return (config.input_vocab + config.output_vocab) * d + config.n_layers * per_layer + d


def describe(config: StudentConfig) -> str:
    """One line, e.g. 'micro: 5.6M parameters (d=256, 4 layers, 4 heads, in 5003, out 512)'."""
    shape = dict(d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads, d_ff=config.d_ff)
    name = next((k for k, v in PRESETS.items() if v == shape), "custom")
    n = parameter_count(config)
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    return (f"{name}: {size} parameters (d={config.d_model}, {config.n_layers} layers, {config.n_heads} heads, "
            f"in {config.input_vocab}, out {config.output_vocab})")
