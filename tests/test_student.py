"""The student model: sizes, shapes, padding invariance, KV-cache decoding, init, learnability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microdistill.students.decoder.config import (
    LARGE_INPUT_VOCAB, N_SPECIAL, PAD, StudentConfig, config_for, describe, parameter_count,
)
from microdistill.students.decoder.model import Student, init_input_embeddings_pca
from microdistill.students.kind import count_parameters

TINY = StudentConfig(input_vocab=40, output_vocab=24, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                     max_input=10, max_output=8)


def tiny_model(seed: int = 0, **kw) -> Student:
    torch.manual_seed(seed)
    return Student(StudentConfig(**{**TINY.to_dict(), **kw})).eval()


def padded_batch(rows: list[list[int]], fill: int = PAD) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("preset, low, high", [("nano", 0.7e6, 1.5e6), ("micro", 4e6, 7e6), ("small", 15e6, 25e6)])
def test_preset_sizes(preset, low, high):
    cfg = config_for(preset, input_vocab=5003, output_vocab=512, max_input=25, max_output=50)
    n = count_parameters(Student(cfg))
    assert low <= n <= high
    assert n == parameter_count(cfg)
    assert describe(cfg).startswith(f"{preset}: {n / 1e6:.1f}M parameters (d={cfg.d_model}")


def test_seed_shape_on_meta_device():
    cfg = config_for("large", input_vocab=5003, output_vocab=525, max_input=25, max_output=50)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.input_vocab) == (1024, 16, 16, LARGE_INPUT_VOCAB)
    with torch.device("meta"):
        model = Student(cfg)
    n = count_parameters(model)
    assert n == parameter_count(cfg)
    assert 500e6 <= n <= 560e6  # the seed's ~530M
    assert model.embed_in.weight.is_meta


def test_config_validation_and_roundtrip():
    assert StudentConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="n_heads"):
        StudentConfig(**{**TINY.to_dict(), "n_heads": 5})
    with pytest.raises(ValueError, match="d_ff"):
        StudentConfig(**{**TINY.to_dict(), "d_ff": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        StudentConfig.from_dict({**TINY.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="nano, micro, small, large"):
        config_for("huge", 100, 10, 5, 5)


def test_forward_shape_and_length_limits():
    model = tiny_model()
    out = model(torch.randint(N_SPECIAL, 40, (3, 6)), torch.randint(0, 24, (3, 4)))
    assert out.shape == (3, 5, 24)
    with pytest.raises(ValueError, match="max_input"):
        model(torch.randint(N_SPECIAL, 40, (1, 11)), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_output"):
        model(torch.randint(N_SPECIAL, 40, (1, 3)), torch.zeros(1, 8, dtype=torch.long))


def test_padding_does_not_change_real_positions():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ins = [torch.randint(N_SPECIAL, 40, (n,), generator=g).tolist() for n in (7, 2, 5)]
    outs = [torch.randint(0, 24, (n,), generator=g).tolist() for n in (3, 6, 1)]
    batch = model(padded_batch(ins), padded_batch(outs, fill=-100))
    for i, (a, b) in enumerate(zip(ins, outs)):
        alone = model(torch.tensor([a]), torch.tensor([b]))[0]
        torch.testing.assert_close(batch[i, : len(b) + 1], alone, atol=1e-5, rtol=1e-5)
    # The padding really is hidden: changing a real input token does change the result.
    changed = [ins[1][0] % 30 + N_SPECIAL + 1] + ins[1][1:]
    out1 = torch.tensor([outs[1]])
    assert not torch.allclose(model(torch.tensor([changed]), out1), model(torch.tensor([ins[1]]), out1))


def test_kv_cache_greedy_matches_full_forward():
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(2)
    inp = padded_batch([torch.randint(N_SPECIAL, 40, (n,), generator=g).tolist() for n in (1, 9, 4, 6)])
    logits, cache = model.prefill(inp)
    chosen = torch.empty(4, 0, dtype=torch.long)
    for step in range(TINY.max_output):
        full = model(inp, chosen)[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        tok = logits.argmax(-1)
        assert torch.equal(tok, full.argmax(-1))
        chosen = torch.cat([chosen, tok[:, None]], 1)
        if step + 1 < TINY.max_output:
            logits, cache = model.decode_step(tok, cache)
    assert len(cache) == inp.shape[1] + 2 + TINY.max_output - 1
    # Dropping rows keeps the others' state intact.
    rows = torch.tensor([0, 2])
    sub = cache.select(rows)
    assert torch.equal(sub.pos, cache.pos[rows]) and torch.equal(sub.kv[1][1], cache.kv[1][1][rows])
    sub_logits, _ = model.decode_step(tok[rows], sub)
    all_logits, _ = model.decode_step(tok, cache)
    torch.testing.assert_close(sub_logits, all_logits[rows])


def test_init_is_deterministic_under_a_seed():
    a, b, c = tiny_model(seed=7), tiny_model(seed=7), tiny_model(seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_head_is_tied_to_output_embedding():
    model = tiny_model()
    inp, out_in = torch.tensor([[5, 6]]), torch.tensor([[1]])
    before = model(inp, out_in)
    with torch.no_grad():
        model.embed_out.weight[3] += 1.0
    after = model(inp, out_in)
    # Position 0 (at SEP) sees no output embedding, so only the head's row 3 can have moved.
    changed = (after[0, 0] - before[0, 0]).abs() > 1e-6
    assert changed.tolist() == [k == 3 for k in range(24)]


def test_pca_init_rows_follow_teacher_geometry():
    model = tiny_model()
    torch.manual_seed(0)
    teacher = torch.randn(20, 64) @ torch.randn(64, 64)
    teacher[1] = teacher[0] + 1e-3  # two near-identical teacher rows stay near-identical
    before_specials = model.embed_in.weight[:N_SPECIAL].clone()
    init_input_embeddings_pca(model, teacher)
    w = model.embed_in.weight.detach()
    rows = w[N_SPECIAL:N_SPECIAL + 20]
    assert torch.equal(w[:N_SPECIAL], before_specials)
    assert rows.std().item() == pytest.approx(0.02, rel=0.05)
    dist = torch.cdist(rows, rows)
    assert dist[0, 1] < 0.05 * dist[0, 2:].min()
    # 20 centred rows have rank <= 19 < d_model, so PCA keeps every pairwise distance up to one scale.
    t = teacher.double() - teacher.double().mean(0)
    ratio = torch.cdist(rows.double(), rows.double())[2:, 2:] / torch.cdist(t, t)[2:, 2:].clamp_min(1e-9)
    off = ~torch.eye(18, dtype=torch.bool)
    assert ratio[off].std() / ratio[off].mean() < 1e-6
    with pytest.raises(ValueError, match="do not fit"):
        init_input_embeddings_pca(model, torch.randn(38, 8))


def test_tiny_model_overfits_eight_sequences():
    torch.manual_seed(0)
    model = Student(StudentConfig(**{**TINY.to_dict(), "d_model": 64, "d_ff": 128}))
    g = torch.Generator().manual_seed(0)
    ins = [torch.randint(N_SPECIAL, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 10, (8,), generator=g)]
    outs = [torch.randint(0, 24, (int(n),), generator=g).tolist() for n in torch.randint(2, 8, (8,), generator=g)]
    inp = padded_batch(ins)
    target = padded_batch(outs, fill=-100)
    out_in = target[:, :-1]
    mask = target != -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        logits = model(inp, out_in)
        loss = F.cross_entropy(logits[mask], target[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1)[mask] == target[mask]).float().mean().item()
        if acc == 1.0:
            break
    assert acc == 1.0, f"accuracy {acc:.3f} after {step + 1} steps"


def test_multi_token_decode_equals_repeated_decode_steps():
    model = tiny_model(4)
    inp = padded_batch([[5, 6, 7], [8], [9, 10, 11, 12, 13]])
    toks = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]])
    lengths = torch.tensor([4, 2, 3])
    _, cache = model.prefill(inp)
    chunk, chunk_cache = model.decode_tokens(toks, cache, lengths)
    assert chunk.shape == (3, 4, TINY.output_vocab)
    assert torch.equal(chunk_cache.pos, cache.pos + lengths)
    for b in range(3):
        _, c = model.prefill(inp[b:b + 1])
        for j in range(int(lengths[b])):
            step, c = model.decode_step(toks[b, j:j + 1], c)
            torch.testing.assert_close(chunk[b, j], step[0], atol=1e-5, rtol=1e-5)
        # the cache after the chunk continues exactly as the step-by-step one
        nxt = torch.tensor([2])
        after_chunk, _ = model.decode_step(nxt.expand(3), chunk_cache)
        after_steps, _ = model.decode_step(nxt, c)
        torch.testing.assert_close(after_chunk[b], after_steps[0], atol=1e-5, rtol=1e-5)


def test_cache_truncate_rolls_rows_back_to_earlier_lengths():
    model = tiny_model(5)
    inp = padded_batch([[5, 6], [7, 8, 9, 10]])
    _, cache = model.prefill(inp)
    base = cache.pos.clone()
    _, long = model.decode_tokens(torch.tensor([[3, 4, 5], [6, 7, 8]]), cache)
    # keep one extra token in row 0 and two in row 1, then continue with a new token each
    short = long.truncate(base + torch.tensor([1, 2]))
    assert torch.equal(short.pos, base + torch.tensor([1, 2]))
    assert len(short) == len(cache) + 2  # the column no row uses any more is cut off
    got, _ = model.decode_step(torch.tensor([9, 10]), short)
    _, ref = model.decode_tokens(torch.tensor([[3], [6]]), cache)
    want0, _ = model.decode_step(torch.tensor([9]), ref.select(torch.tensor([0])))
    _, ref1 = model.decode_tokens(torch.tensor([[6, 7]]), cache.select(torch.tensor([1])))
    want1, _ = model.decode_step(torch.tensor([10]), ref1)
    torch.testing.assert_close(got[0], want0[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want1[0], atol=1e-5, rtol=1e-5)
    assert len(long.truncate(base)) == len(cache)
    with pytest.raises(ValueError):
        long.truncate(long.pos + 1)
