"""The draft head module, its config, and loading the target's embedding / lm_head."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eyas.draft.model import (
    DraftConfig,
    Eagle3Draft,
    attend,
    aux_ids_to_hidden_states_indices,
    default_aux_layer_ids,
    hidden_states_indices_to_aux_ids,
    validate_aux_layer_ids,
)
from eyas.draft.target import load_target_head

ATOL, RTOL = 1e-5, 1e-4


def tiny_config(**overrides) -> DraftConfig:
    fields = dict(hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, rms_norm_eps=1e-6, rope_parameters={"rope_theta": 50.0},
                  max_position_embeddings=64, vocab_size=40, draft_vocab_size=32,
                  target_hidden_size=16, aux_layer_ids=[0, 2, 3], torch_dtype="float32")
    fields.update(overrides)
    return DraftConfig(**fields)


def make_draft(seed: int = 0, **overrides) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft(tiny_config(**overrides))
    draft.reset_parameters(std=0.3)
    return draft


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rotate_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, heads, T, hd): rotate (x[i], x[i + hd/2]) by pos * theta**(-2i/hd), pair by pair."""
    out = torch.empty_like(x)
    half = x.shape[-1] // 2
    for i in range(half):
        angle = pos.float()[:, None, :] * theta ** (-2 * i / x.shape[-1])  # (B, 1, T)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., i + half] = b * torch.cos(angle) + a * torch.sin(angle)
    return out


def reference_forward(draft: Eagle3Draft, emb, hidden, pos, visible):
    """Plain-math midlayer: explicit softmax attention with per-head kv lookup.
    visible (T, T) bool."""
    m, cfg = draft.midlayer, draft.config
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    b, t, _ = emb.shape
    x = torch.cat([rms(emb, m.input_layernorm.weight, eps), rms(hidden, m.hidden_norm.weight, eps)], -1)
    a = m.self_attn
    q = (x @ a.q_proj.weight.T).view(b, t, 4, 8).transpose(1, 2)
    k = (x @ a.k_proj.weight.T).view(b, t, 2, 8).transpose(1, 2)
    v = (x @ a.v_proj.weight.T).view(b, t, 2, 8).transpose(1, 2)
    q, k = rotate_pairs(q, pos, theta), rotate_pairs(k, pos, theta)
    heads = []
    for h in range(4):
        kv = h // 2  # GQA: query heads 0,1 share kv head 0; 2,3 share kv head 1
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(8)  # (B, T, T)
        scores = scores.masked_fill(~visible, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, kv])
    y = torch.stack(heads, 1).transpose(1, 2).reshape(b, t, 32) @ a.o_proj.weight.T
    h1 = hidden + y
    z = rms(h1, m.post_attention_layernorm.weight, eps)
    mlp = (F.silu(z @ m.mlp.gate_proj.weight.T) * (z @ m.mlp.up_proj.weight.T)) @ m.mlp.down_proj.weight.T
    return h1 + mlp


def test_forward_matches_plain_math_reference():
    draft = make_draft()
    torch.manual_seed(1)
    emb, hidden = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    out, (k, v) = draft(emb, hidden, pos)
    expected = reference_forward(draft, emb, hidden, pos, torch.ones(5, 5, dtype=torch.bool).tril())
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert k.shape == v.shape == (2, 2, 5, 8)
    logits = draft.logits(out)
    assert logits.shape == (2, 5, 32) and logits.dtype == torch.float32


def test_kv_cache_incremental_equals_full_and_explicit_bias():
    draft = make_draft()
    torch.manual_seed(2)
    emb, hidden = torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    pos = torch.arange(6)[None]
    full, (k_full, v_full) = draft(emb, hidden, pos)
    first, past = draft(emb[:, :4], hidden[:, :4], pos[:, :4])
    rest, (k2, v2) = draft(emb[:, 4:], hidden[:, 4:], pos[:, 4:], None, past)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(k2, k_full, atol=ATOL, rtol=RTOL)
    bias = torch.zeros(1, 1, 2, 6)
    bias[..., 0, 5] = float("-inf")  # the causal pattern, given explicitly
    explicit, _ = draft(emb[:, 4:], hidden[:, 4:], pos[:, 4:], bias, past)
    torch.testing.assert_close(explicit, rest, atol=ATOL, rtol=RTOL)
    visible = torch.ones(1, 1, 2, 6, dtype=torch.bool)
    visible[..., 0, 5] = False  # the same pattern as a bool mask
    as_bool, _ = draft(emb[:, 4:], hidden[:, 4:], pos[:, 4:], visible, past)
    torch.testing.assert_close(as_bool, rest, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention mask covers"):
        draft(emb[:, 4:], hidden[:, 4:], pos[:, 4:], torch.zeros(1, 1, 2, 2), past)


def test_gqa_attention_equals_expanded_kv():
    """``attend`` (SDPA with enable_gqa) equals SDPA over K/V copied to every query head."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mask = torch.rand(2, 1, 5, 9, generator=g) > 0.4
    mask[..., -5:] |= torch.eye(5, dtype=torch.bool)  # every query sees itself
    expanded = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              attn_mask=mask)
    torch.testing.assert_close(attend(q, k, v, mask), expanded, atol=1e-6, rtol=0)


def test_fuse_and_vocab_helpers():
    draft = make_draft()
    assert draft.fuse(torch.randn(2, 3, 48)).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="3 \\* target_hidden_size"):
        draft.fuse(torch.randn(2, 3, 16))
    d2t = torch.zeros(32, dtype=torch.int64)
    d2t[20:] = 8  # draft ids 20..31 -> target ids 28..39
    t2d = torch.zeros(40, dtype=torch.bool)
    t2d[:20] = True
    t2d[28:] = True
    draft.set_vocab_mapping(d2t, t2d)
    assert draft.draft_to_target(torch.tensor([[0, 19, 20, 31]])).tolist() == [[0, 19, 28, 39]]
    with pytest.raises(ValueError, match="inconsistent"):
        draft.set_vocab_mapping(d2t, torch.ones(40, dtype=torch.bool))
    names = set(draft.state_dict())
    assert "d2t" in names and "t2d" in names and not any("embed" in n for n in names)


def test_aux_layer_ids_conventions():
    assert default_aux_layer_ids(32) == [1, 15, 28]
    assert aux_ids_to_hidden_states_indices([1, 15, 28]) == [2, 16, 29]
    assert hidden_states_indices_to_aux_ids([2, 16, 29]) == [1, 15, 28]


def test_default_aux_layers_for_shallow_targets():
    """The formula [1, N//2-1, N-4] from N=7 on; below it [0, (N-1)//2, N-2]; N<4 raises.
    Every default passes the same validation as explicit ids."""
    expected = {4: [0, 1, 2], 5: [0, 2, 3], 6: [0, 2, 4], 7: [1, 2, 3], 8: [1, 3, 4], 32: [1, 15, 28]}
    assert {n: default_aux_layer_ids(n) for n in expected} == expected
    for n in range(4, 130):
        assert validate_aux_layer_ids(default_aux_layer_ids(n), n) == default_aux_layer_ids(n)
    with pytest.raises(ValueError, match="3 layers has no 3 distinct"):
        default_aux_layer_ids(3)


def test_config_from_stories260k_target(stories260k):
    target = json.loads((stories260k / "config.json").read_text())
    assert DraftConfig.from_target_config(target, 32000).aux_layer_ids == [0, 2, 3]  # N=5
    with pytest.raises(ValueError, match="distinct"):
        DraftConfig.from_target_config(target, 32000, [1, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        DraftConfig.from_target_config(target, 32000, [0, 2, 4])
    cfg = DraftConfig.from_target_config(target, 32000, [0, 2, 3])
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 4, 8)
    assert cfg.vocab_size == 512 and cfg.draft_vocab_size == 512  # clamped: identity mapping
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    hf = cfg.to_hf_config()
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["num_hidden_layers"] == 1
    assert hf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert DraftConfig.from_hf_config(json.loads(json.dumps(hf))) == cfg


def test_hf_config_loads_as_transformers_llama_config():
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = tiny_config(rope_parameters=rope).to_hf_config()
    loaded = LlamaConfig.from_dict(hf)
    assert loaded.head_dim == 8 and loaded.draft_vocab_size == 32
    assert loaded.rope_parameters["rope_type"] == "llama3"
    assert loaded.rope_parameters["rope_theta"] == 500000.0


def test_rope_settings_are_standardized_and_checked():
    """Legacy rope_scaling reads like rope_parameters; yarn is accepted, length-dependent types
    are refused (cos/sin parity with transformers is in test_rope.py)."""
    legacy = tiny_config(rope_parameters={"type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    assert legacy.rope_parameters == {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                      "original_max_position_embeddings": 64}
    hf = legacy.to_hf_config()
    assert DraftConfig.from_hf_config({**hf, "rope_parameters": None}) == legacy  # rope_scaling only
    with pytest.raises(ValueError, match="'dynamic'"):
        tiny_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0})


def test_load_target_head_tied_stories260k(stories260k):
    embed, lm_head, config = load_target_head(stories260k)
    assert embed.shape == (512, 64) and config["tie_word_embeddings"] is True
    assert torch.equal(lm_head, embed)


def write_sharded_target(directory, tied: bool, with_lm_head: bool):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    embed, lm_head = torch.randn(10, 4), torch.randn(10, 4)
    shard1 = {"model.embed_tokens.weight": embed, "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4)}
    shard2 = {"model.norm.weight": torch.ones(4)}
    if with_lm_head:
        shard2["lm_head.weight"] = lm_head
    save_file(shard1, str(directory / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(
        {"hidden_size": 4, "vocab_size": 10, "num_hidden_layers": 1, "tie_word_embeddings": tied}))
    return embed, lm_head


def test_load_target_head_sharded(tmp_path):
    embed, lm_head = write_sharded_target(tmp_path, tied=False, with_lm_head=True)
    got_embed, got_lm, config = load_target_head(str(tmp_path))
    assert torch.equal(got_embed, embed) and torch.equal(got_lm, lm_head)
    assert config["vocab_size"] == 10


def test_load_target_head_sharded_tied_and_incomplete(tmp_path):
    tied_dir, broken_dir = tmp_path / "tied", tmp_path / "broken"
    tied_dir.mkdir()
    broken_dir.mkdir()
    embed, _ = write_sharded_target(tied_dir, tied=True, with_lm_head=False)
    got_embed, got_lm, _ = load_target_head(tied_dir)
    assert torch.equal(got_lm, embed) and torch.equal(got_embed, embed)
    write_sharded_target(broken_dir, tied=False, with_lm_head=False)
    with pytest.raises(ValueError, match="lm_head"):
        load_target_head(broken_dir)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        load_target_head(tmp_path / "empty")

