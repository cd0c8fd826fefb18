"""Training-time test: vectorized TTT against a naive one-token-at-a-time reference, and its
flex_attention path against its SDPA path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.draft.ttt import (
    resolve_attention,
    shift_left,
    target_distribution,
    ttt_attention_mask,
    ttt_forward,
    ttt_mask_mod,
)
from eyas.draft.vocab import build_vocab_mapping
from eyas.evaluate.acceptance import chain_drafts

ATOL, RTOL = 2e-5, 1e-4


def tiny_config(hidden: int = 16, vocab: int = 64, draft_vocab: int = 48) -> DraftConfig:
    return DraftConfig(hidden_size=hidden, intermediate_size=32, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                       max_position_embeddings=64, vocab_size=vocab, draft_vocab_size=draft_vocab,
                       target_hidden_size=hidden, aux_layer_ids=[0, 1, 2], torch_dtype="float32")


def make_draft(config: DraftConfig, seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft(config)
    draft.reset_parameters(std=0.3)  # larger weights: attention and RoPE matter numerically
    counts = torch.randint(0, 100, (config.vocab_size,))
    draft.set_vocab_mapping(*build_vocab_mapping(counts, config.draft_vocab_size))
    return draft


def make_batch(config: DraftConfig, b: int = 2, t: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, v = config.hidden_size, config.vocab_size
    loss_mask = torch.ones(b, t, dtype=torch.long)
    loss_mask[:, :2] = 0  # a prompt
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[b - 1, t - 2:] = 0  # right padding in the last sample
    return {
        "embed_weight": torch.randn(v, h, generator=g),
        "lm_head_weight": torch.randn(v, h, generator=g),
        "aux": torch.randn(b, t, 3 * h, generator=g),
        "final_hidden": torch.randn(b, t, h, generator=g),
        "input_ids": torch.randint(0, v, (b, t), generator=g),
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
    }


def naive_ttt(draft: Eagle3Draft, batch: dict, steps: int, decay: float, rope_offset: bool = True):
    """One token at a time: draft position t at step k reads token t+1+k, attends to step-0
    keys 0..t and its own keys of steps 1..k, and is scored against the target at t+1+k
    when token t+2+k is a real assistant token whose target argmax is in the draft vocab."""
    ids, lm_w, emb_w = batch["input_ids"], batch["lm_head_weight"], batch["embed_weight"]
    t2d = draft.t2d
    num = [torch.zeros(()) for _ in range(steps)]
    den = [0] * steps
    hits = [0] * steps
    for b in range(ids.shape[0]):
        length = int(batch["attention_mask"][b].sum())
        fused = draft.fuse(batch["aux"][b:b + 1])  # (1, T, H)
        step0_kv, diag_kv, outs = [], {}, {}
        for k in range(steps):
            for t in range(length - 1 - k):
                emb = emb_w[ids[b, t + 1 + k]].view(1, 1, -1)
                hid = fused[:, t:t + 1] if k == 0 else outs[(k - 1, t)]
                past = step0_kv[:t] if k == 0 else step0_kv[:t + 1] + [diag_kv[(j, t)] for j in range(1, k)]
                past_kv = None
                if past:
                    past_kv = (torch.cat([p[0] for p in past], 2), torch.cat([p[1] for p in past], 2))
                pos = torch.tensor([[t + k if rope_offset else t]])
                out, (kk, vv) = draft(emb, hid, pos, None, past_kv)
                own = (kk[:, :, -1:], vv[:, :, -1:])
                if k == 0:
                    step0_kv.append(own)
                else:
                    diag_kv[(k, t)] = own
                outs[(k, t)] = out
                s = t + 2 + k
                if s >= length or batch["loss_mask"][b, s] == 0:
                    continue
                target_logits = lm_w @ batch["final_hidden"][b, t + 1 + k]  # (V,)
                if not t2d[target_logits.argmax()]:
                    continue
                p = torch.softmax(target_logits[t2d], -1)
                draft_logits = draft.logits(out)[0, 0]
                num[k] = num[k] - (p * F.log_softmax(draft_logits, -1)).sum()
                den[k] += 1
                hits[k] += int(draft_logits.argmax() == p.argmax())
    losses = [n / max(d, 1) for n, d in zip(num, den, strict=True)]
    total = sum(decay**k * loss for k, loss in enumerate(losses))
    return total, losses, den, hits


def run_ttt(draft: Eagle3Draft, batch: dict, steps: int, decay: float = 0.8):
    return ttt_forward(draft, batch["embed_weight"], batch["lm_head_weight"], batch["aux"],
                       batch["final_hidden"], batch["input_ids"], batch["loss_mask"],
                       batch["attention_mask"], ttt_length=steps, step_decay=decay)


def grads(draft: Eagle3Draft) -> dict[str, torch.Tensor]:
    names = ["fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight"]
    params = dict(draft.named_parameters())
    return {n: params[n].grad.clone() for n in names}


def test_ttt_matches_naive_reference_loss_and_gradients():
    config = tiny_config()
    draft, batch, steps = make_draft(config), make_batch(config), 4
    out = run_ttt(draft, batch, steps)
    out.loss.backward()
    fast_grads = grads(draft)
    draft.zero_grad()
    ref_total, ref_losses, ref_counts, ref_hits = naive_ttt(draft, batch, steps, 0.8)
    ref_total.backward()
    ref_grads = grads(draft)

    assert all(c > 0 for c in ref_counts), "every step must count some positions"
    assert [int(c) for c in out.step_counts] == ref_counts
    for k in range(steps):
        torch.testing.assert_close(out.step_losses[k], ref_losses[k], atol=ATOL, rtol=RTOL)
        assert math.isclose(float(out.step_acc[k]), ref_hits[k] / ref_counts[k], abs_tol=1e-6)
    torch.testing.assert_close(out.loss, ref_total, atol=ATOL, rtol=RTOL)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], g, atol=ATOL, rtol=RTOL, msg=name)


def test_rope_offset_per_step_is_applied():
    """Fails if ttt_forward drops the +k position offset: the positions seen at each step are
    recorded, and the loss differs measurably from a reference without the offset."""
    config = tiny_config()
    draft, batch, steps = make_draft(config), make_batch(config), 3
    seen = []
    handle = draft.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    with torch.no_grad():
        out = run_ttt(draft, batch, steps)
    handle.remove()
    real = batch["attention_mask"].bool()
    base = torch.arange(7).expand(2, 7)
    assert len(seen) == steps
    for k, pos in enumerate(seen):
        torch.testing.assert_close(pos[real], (base + k)[real], rtol=0, atol=0)
    with torch.no_grad():
        with_offset, *_ = naive_ttt(draft, batch, steps, 0.8, rope_offset=True)
        without_offset, *_ = naive_ttt(draft, batch, steps, 0.8, rope_offset=False)
    torch.testing.assert_close(out.loss, with_offset, atol=ATOL, rtol=RTOL)
    assert abs(float(with_offset - without_offset)) > 1e-3


def test_attention_mask_pattern():
    """Step 0 causal, later steps diagonal; padded step-0 keys hidden except a query's own."""
    real = torch.tensor([[True, True, True], [False, True, True]])  # row 1 left-padded
    mask = ttt_attention_mask(real, 0, "sdpa")
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], causal)
    padded = causal.clone()
    padded[1:, 0] = False  # key 0 is padding: only query 0 itself sees it
    assert torch.equal(mask[1, 0], padded)
    mask = ttt_attention_mask(real, 2, "sdpa")
    assert mask.shape == (2, 1, 3, 9)
    diag = torch.eye(3, dtype=torch.bool)
    assert torch.equal(mask[0, 0], torch.cat([causal, diag, diag], dim=1))
    assert torch.equal(mask[1, 0], torch.cat([padded, diag, diag], dim=1))
    unpadded = ttt_attention_mask(torch.ones(4, 3, dtype=torch.bool), 2, "sdpa")
    assert unpadded.shape == (1, 1, 3, 9)  # one mask broadcast over the rows
    assert torch.equal(unpadded[0, 0], mask[0, 0])
    with pytest.raises(ValueError, match="attention backend 'dense'"):
        ttt_attention_mask(real, 0, "dense")


def test_shift_alignment_of_tokens_and_targets():
    """At step k, position t gets the embedding of token t+1+k and the target at t+1+k."""
    config = tiny_config()
    draft, batch, steps = make_draft(config), make_batch(config), 3
    embeds_seen = []
    handle = draft.register_forward_pre_hook(lambda mod, args: embeds_seen.append(args[0].clone()))
    with torch.no_grad():
        run_ttt(draft, batch, steps)
    handle.remove()
    ids, emb_w = batch["input_ids"], batch["embed_weight"]
    for k, embeds in enumerate(embeds_seen):
        for t in range(7 - 1 - k):
            torch.testing.assert_close(embeds[:, t], emb_w[ids[:, t + 1 + k]], rtol=0, atol=0)
    x = torch.arange(10).view(1, 5, 2)
    assert shift_left(x, 2, fill=-1).tolist() == [[[4, 5], [6, 7], [8, 9], [-1, -1], [-1, -1]]]
    assert shift_left(x, 9).tolist() == [[[0, 0]] * 5]


def controlled_batch(config: DraftConfig, target_tokens: list[int], loss_mask: list[int],
                     attention_mask: list[int]) -> dict:
    """A batch whose target argmax at position j is exactly target_tokens[j] (one-hot hidden,
    identity lm_head)."""
    v, h, t = config.vocab_size, config.hidden_size, len(target_tokens)
    torch.manual_seed(3)
    final_hidden = 0.1 * torch.randn(1, t, h)
    final_hidden[0, torch.arange(t), torch.tensor(target_tokens)] += 10.0
    return {
        "embed_weight": torch.randn(v, h),
        "lm_head_weight": torch.eye(v, h),
        "aux": torch.randn(1, t, 3 * h),
        "final_hidden": final_hidden,
        "input_ids": torch.randint(0, v, (1, t)),
        "loss_mask": torch.tensor([loss_mask]),
        "attention_mask": torch.tensor([attention_mask]),
    }


def test_mask_counting():
    config = tiny_config(hidden=16, vocab=16, draft_vocab=8)
    draft = make_draft(config)
    draft.set_vocab_mapping(torch.zeros(8, dtype=torch.int64), torch.arange(16) < 8)  # ids 0..7
    # Position 4's target argmax (12) is outside the draft vocab; tokens 3..7 are assistant
    # tokens; the last position is padding.
    batch = controlled_batch(config, target_tokens=[1, 2, 3, 4, 12, 5, 6, 7, 1],
                             loss_mask=[0, 0, 0, 1, 1, 1, 1, 1, 0],
                             attention_mask=[1, 1, 1, 1, 1, 1, 1, 1, 0])
    out = run_ttt(draft, batch, steps=4)
    # step k counts t with: s = t+2+k real assistant (s in 3..7), target index t+1+k != 4.
    expected = []
    for k in range(4):
        ts = [t for t in range(9) if 3 <= t + 2 + k <= 7 and t + 1 + k != 4]
        expected.append(len(ts))
    assert expected == [4, 4, 3, 2]
    assert [int(c) for c in out.step_counts] == expected


def test_no_counted_positions_gives_zero_loss():
    config = tiny_config()
    draft, batch = make_draft(config), make_batch(config)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    out = run_ttt(draft, batch, steps=2)
    assert float(out.loss.detach()) == 0.0 and all(int(c) == 0 for c in out.step_counts)
    out.loss.backward()
    assert torch.isfinite(draft.fc.weight.grad).all()


def test_decay_weights():
    config = tiny_config()
    draft, batch = make_draft(config), make_batch(config)
    with torch.no_grad():
        out = run_ttt(draft, batch, steps=3, decay=0.5)
    expected = out.step_losses[0] + 0.5 * out.step_losses[1] + 0.25 * out.step_losses[2]
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    assert len(out.step_acc) == 3


def test_target_distribution_restricts_to_draft_vocab():
    lm = torch.eye(4)
    hidden = torch.tensor([[[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 1.0, 3.0]]])  # (1, 2, 4)
    t2d = torch.tensor([True, False, True, True])
    p, in_vocab = target_distribution(hidden, lm, t2d)
    assert in_vocab.tolist() == [[False, True]]
    torch.testing.assert_close(p[0, 0], torch.softmax(torch.tensor([0.0, 1.0, 0.0]), -1))


def test_ttt_rejects_bad_shapes():
    config = tiny_config()
    draft, batch = make_draft(config), make_batch(config)
    batch["aux"] = batch["aux"][:, :-1]
    with pytest.raises(ValueError, match="aux"):
        run_ttt(draft, batch, steps=1)


def test_left_padding_matches_unpadded_sample():
    """A left-padded sample gives the same step losses as the same sample without padding:
    padded keys are hidden and positions restart at the first real token."""
    config = tiny_config()
    draft, batch = make_draft(config), make_batch(config, b=1, t=6)
    batch["attention_mask"] = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        plain = run_ttt(draft, batch, steps=3)
    padded = {}
    for name, x in batch.items():
        if name in ("embed_weight", "lm_head_weight"):
            padded[name] = x
        else:
            padded[name] = torch.cat([torch.zeros_like(x[:, :2]) + 7 * (name != "loss_mask"), x], 1)
    padded["attention_mask"] = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        left = run_ttt(draft, padded, steps=3)
    assert [int(c) for c in left.step_counts] == [int(c) for c in plain.step_counts]
    for a, b in zip(left.step_losses, plain.step_losses, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)

# ----------------------------------------------------------------------------- flex attention
# The flex_attention path (the GPU path) against the SDPA path (the CPU reference). torch runs
# flex eagerly on the CPU, forward only, so the CPU tests compare losses, accuracies and counts
# under no_grad; gradient parity needs CUDA (compiled flex) and is marked gpu. Both sides are
# float32 with different summation orders, held to the naive-reference tolerances above.

FLEX_STEPS = 4
EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def padded_batch(config, device: str = "cpu") -> dict:
    """make_batch's right padding plus a left-padded row."""
    batch = make_batch(config, b=3, t=9)
    batch["attention_mask"][0, :2] = 0
    return {k: v.to(device) for k, v in batch.items()}


def run_with(draft, batch, attention: str):
    return ttt_forward(draft, batch["embed_weight"], batch["lm_head_weight"], batch["aux"],
                       batch["final_hidden"], batch["input_ids"], batch["loss_mask"],
                       batch["attention_mask"], ttt_length=FLEX_STEPS, attention=attention)


def assert_same_outputs(flex, sdpa) -> None:
    assert [int(c) for c in flex.step_counts] == [int(c) for c in sdpa.step_counts]
    assert all(int(c) > 0 for c in sdpa.step_counts)
    for a, b in zip(flex.step_losses + flex.step_acc, sdpa.step_losses + sdpa.step_acc, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(flex.loss, sdpa.loss, atol=ATOL, rtol=RTOL)


@EAGER_FLEX
def test_block_mask_and_dense_mask_are_the_same_pattern():
    """flex's own dense evaluation (vmap) of the mask_mod equals the SDPA path's mask, and the
    BlockMask keeps only the visible 128x128 blocks: with n query blocks and 4 steps, the
    n(n+1)/2 causal blocks of step 0 plus n diagonal blocks per later step."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, :2] = False
    real[1, 7:] = False
    for step in range(3):
        dense = create_mask(ttt_mask_mod(real), 2, 1, 9, 9 * (step + 1), device="cpu")
        assert torch.equal(ttt_attention_mask(real, step, "sdpa"), dense)
    n = 4
    big = ttt_mask_mod(torch.ones(1, 128 * n, dtype=torch.bool))
    block = create_block_mask(big, 1, None, 128 * n, 128 * n * 4, device="cpu")
    assert int(block.to_dense().sum()) == n * (n + 1) // 2 + 3 * n  # of 4 * n * n blocks


@EAGER_FLEX
def test_flex_ttt_forward_matches_sdpa_on_cpu():
    config = tiny_config()
    draft, batch = make_draft(config), padded_batch(config)
    with torch.no_grad():
        assert_same_outputs(run_with(draft, batch, "flex"), run_with(draft, batch, "sdpa"))


@EAGER_FLEX
def test_flex_chain_drafts_match_sdpa_on_cpu():
    config = tiny_config()
    draft, batch = make_draft(config), padded_batch(config)
    args = (draft, batch["embed_weight"], batch["aux"], batch["input_ids"], batch["attention_mask"], 3)
    assert torch.equal(chain_drafts(*args, attention="flex"), chain_drafts(*args, attention="sdpa"))


def test_backend_selection():
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_attention("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="attention='xformers'"):
        resolve_attention("xformers", torch.device("cpu"))


@pytest.mark.gpu
def test_flex_ttt_loss_and_gradients_match_sdpa_on_cuda():
    """Compiled flex (what training runs on GPUs) against SDPA, float32, loss and gradients."""
    config = tiny_config()
    draft = make_draft(config).cuda()
    batch = padded_batch(config, "cuda")
    results = {}
    for attention in ("flex", "sdpa"):
        draft.zero_grad()
        out = run_with(draft, batch, attention)
        out.loss.backward()
        results[attention] = (out, grads(draft))
    assert_same_outputs(results["flex"][0], results["sdpa"][0])
    for name, g in results["sdpa"][1].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(results["flex"][1][name], g, atol=ATOL, rtol=RTOL, msg=name)

