"""White-box teachers: a Hugging Face causal LM and its tokenizer, from a folder or a GGUF file.

    microdistill extract --teacher ./my-model/ ...                   # config.json + weights + tokenizer
    microdistill extract --teacher ./model-q4_k_m.gguf ...           # any GGUF transformers reads

A GGUF file is dequantised once (about a minute) and cached as a plain safetensors folder;
every later load takes seconds. Besides loading, this module owns what reaches inside the
model: the hidden state after a given layer, without running the layers above it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microdistill.core.files import atomic_dir, file_sha256
from microdistill.core.task import Task
from microdistill.teachers.presets import TeacherError, cache_root
from microdistill.teachers.teacher import hidden_layer_spec

DTYPES = ("float32", "bfloat16")


def bfloat16_is_fast() -> bool:
    """Whether bfloat16 runs natively where the teacher runs: the GPU when there is one (teachers
    are loaded onto it), else this CPU with AVX-512 BF16 or AMX, where a bfloat16 teacher runs
    faster than float32 rather than slower (oneDNN's own check)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class HFTeacher:
    """A loaded teacher. `vocab_size` is the logit width, which may exceed `len(tokenizer)`."""

    name: str
    model: Any
    tokenizer: Any
    eos_id: int
    vocab_size: int
    sha256: str
    tokenizer_sha256: str
    source: str = ""
    access: str = "white"  # full logits at every step, and hidden states

    @property
    def dtype(self) -> str:
        """The weights' dtype as a name: "float32" or "bfloat16"."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def to_dtype(self, dtype: str) -> HFTeacher:
        """Cast the weights in place to "float32" or "bfloat16"; returns self."""
        if dtype not in DTYPES:
            raise TeacherError(f"teacher dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        self.model.to(getattr(torch, dtype))
        return self

    @property
    def pad_id(self) -> int:
        """The id that fills padded positions: the tokenizer's pad token, else EOS."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_text(self, task: Task, text: str) -> str:
        """The full prompt for one input, ending where the answer starts."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(task.messages(text), tokenize=False, add_generation_prompt=True)
        # A base model without a template: the same turns as plain text; the answer ends at EOS.
        parts = [task.prompt.system.strip(), ""]
        for m in task.messages(text)[1:]:
            parts.append(m["content"] if m["role"] == "user" else m["content"] + "\n")
        return "\n".join(parts) + "\n"

    def labeller(self, task: Task, kept: list[int] | None = None, draft=None):
        """Texts -> answer texts by constrained greedy decoding, as extraction runs it (over the
        `kept` ids when given, as the shards were labelled; `draft` proposing tokens, as
        extract --draft does)."""
        from microdistill.teachers.labeller import local_labeller

        return local_labeller(self, task, kept, draft)

    def write(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float,
              seed: int) -> list[str]:
        """Free text, sampled, for each chat conversation (what `synthesize` asks the teacher for)."""
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   if self.has_chat_template else "\n".join(m["content"] for m in c) + "\n" for c in conversations]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        width = max(map(len, ids))
        pad = [[self.pad_id] * (width - len(x)) for x in ids]  # left padding: every row ends where it writes
        input_ids = torch.tensor([p + x for p, x in zip(pad, ids)], device=self.model.device)
        mask = torch.tensor([[0] * len(p) + [1] * len(x) for p, x in zip(pad, ids)], device=self.model.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                      top_p=0.95, max_new_tokens=max_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=self.eos_id)
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        """The manifest's `teacher` entry (its dtype only when not float32, the dtype of every
        folder written before teachers had another)."""
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            **({"dtype": self.dtype} if self.dtype != "float32" else {}),
        }


def convert_gguf(gguf: Path, digest: str, cache_dir: Path | None = None) -> Path:
    """A plain Hugging Face folder (float32 safetensors + tokenizer) for a GGUF file, cached by sha256.

    Dequantising a GGUF in transformers takes about a minute and its tokenizer conversion
    ~15 s; a converted folder loads in seconds. The folder is built under a temporary name and
    renamed, so an interrupted conversion never leaves a half folder that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = cache_root(cache_dir) / "hf" / digest[:16]
    if (dest / "config.json").is_file():
        return dest
    with atomic_dir(dest) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for unsupported or damaged files
            raise TeacherError(f"GGUF file {gguf}: cannot be loaded by transformers ({type(e).__name__}: {e})") from None
        # The weights are plain dequantised tensors now; drop the quantiser so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "microdistill-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}) + "\n")
    return dest


def folder_sha256(folder: Path) -> str:
    """Fingerprint of a model folder: its weight files, by name and content."""
    source = folder / "microdistill-source.json"
    if source.is_file():
        return json.loads(source.read_text())["sha256"]
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for p in weights:
        digest.update(p.name.encode())
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Fingerprint of a tokenizer's id <-> string map (what shards' token ids depend on)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def end_of_answer_id(tokenizer) -> int:
    """The token that ends an assistant turn: found by rendering one through the chat template.

    Chat models end a turn with their own token (`<|im_end|>`, `<end_of_turn>`), which is
    often not `tokenizer.eos_token`; base models without a template end with EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        marker = "ZqZ"
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}]
        try:
            rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # some templates reject this shape; fall back to EOS below
            rendered = ""
        if marker in rendered:
            after = rendered.split(marker, 1)[1]
            special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
            for tid in tokenizer(after, add_special_tokens=False).input_ids:
                if tid in special:
                    return int(tid)
    if tokenizer.eos_token_id is None:
        raise TeacherError("teacher tokenizer has neither a chat template end-of-turn token nor an EOS token")
    return int(tokenizer.eos_token_id)


def load_folder(folder: Path, name: str, digest: str | None = None, source: str = "") -> HFTeacher:
    """A teacher from a Hugging Face model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise TeacherError(f"teacher folder {folder}: no config.json (expected Hugging Face model files)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"teacher folder {folder}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    if torch.cuda.is_available():  # float32 weights there too: --dtype chooses bfloat16, as on a CPU
        model.to("cuda")
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    return HFTeacher(
        name=name,
        model=model,
        tokenizer=tokenizer,
        eos_id=end_of_answer_id(tokenizer),
        vocab_size=vocab_size,
        sha256=digest or folder_sha256(folder),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        source=source or str(folder),
    )


# ---- inside the model ---------------------------------------------------------------------
class _Stop(Exception):
    """Carries the states out of the forward pass that a hook stopped."""

    def __init__(self, states: torch.Tensor):
        self.states = states


def states_after(model, layer: int, **inputs) -> torch.Tensor:
    """The hidden states after decoder layer `layer` (1-based; as `hidden_states[layer]`), without
    running the layers above it: half the compute for the middle layer."""
    n = int(model.config.get_text_config().num_hidden_layers)
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
    if blocks is None or not 1 <= layer < n:  # no layer list to stop at: run the whole model
        return model(**inputs, output_hidden_states=True).hidden_states[layer]

    def stop(module, args, out):
        raise _Stop(out[0] if isinstance(out, tuple) else out)

    hook = blocks[layer - 1].register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop as s:
        return s.states
    finally:
        hook.remove()
    raise RuntimeError(f"layer {layer} of the teacher never ran")


def hidden_layer_of(teacher: HFTeacher, spec: int | str | None) -> int | None:
    """The teacher layer to store input hidden states from: "middle", "last", a number from 0
    (the embeddings) to the number of layers, or None / "none" for no hidden states."""
    given = hidden_layer_spec(spec)
    if given is None:
        return None
    n = int(teacher.model.config.get_text_config().num_hidden_layers)
    layer = {"middle": n // 2, "last": n}.get(given, given)
    if not 0 <= layer <= n:
        raise TeacherError(f"--hidden-layer {spec!r}: expected middle, last, none or a layer from 0 to {n} "
                           f"(teacher {teacher.name} has {n} layers)")
    return layer
