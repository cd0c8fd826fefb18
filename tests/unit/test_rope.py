"""eyas.rope against transformers' own LlamaRotaryEmbedding, one rope setting at a time.

Tolerance: both sides compute float32 angles from the same float32 frequencies, so cos/sin
agree to float32 rounding (atol 1e-6 on values of magnitude <= yarn's ~1.14 factor).
"""

from __future__ import annotations

import pytest
import torch

from eyas.rope import RotaryEmbedding, rope_parameters

HEAD_DIM, MAX_POS = 16, 64
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 16},
    "yarn-betas": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "beta_fast": 16,
                   "beta_slow": 2, "original_max_position_embeddings": 32},
}
# positions past every original_max_position_embeddings, in a batch of unequal rows
POSITIONS = torch.tensor([[0, 1, 2, 15, 16, 17], [31, 32, 63, 64, 200, 1000]])


def transformers_cos_sin(rope: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, head_dim=HEAD_DIM,
                      max_position_embeddings=MAX_POS, rope_parameters=dict(rope))
    return LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=dtype), POSITIONS)


@pytest.mark.parametrize("name", list(ROPES))
def test_cos_sin_match_transformers(name: str):
    params = rope_parameters({"rope_parameters": ROPES[name], "max_position_embeddings": MAX_POS})
    rope = RotaryEmbedding(params, HEAD_DIM, MAX_POS)
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 0.0)):
        cos, sin = rope.cos_sin(POSITIONS, dtype)
        ref_cos, ref_sin = transformers_cos_sin(ROPES[name], dtype)
        assert cos.dtype == dtype and cos.shape == (2, 6, HEAD_DIM)
        torch.testing.assert_close(cos, ref_cos, atol=atol, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=atol, rtol=0)
    if name.startswith("yarn"):
        assert rope.attention_scaling > 1.0  # the cos/sin factor is applied, not dropped


def test_legacy_rope_scaling_reads_like_rope_parameters():
    legacy = {"rope_theta": 500000.0, "max_position_embeddings": MAX_POS,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
    modern = {"rope_parameters": ROPES["llama3"], "max_position_embeddings": MAX_POS}
    assert rope_parameters(legacy) == rope_parameters(modern) == ROPES["llama3"]
    assert rope_parameters({}) == {"rope_type": "default", "rope_theta": 10000.0}
    filled = rope_parameters({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                              "max_position_embeddings": 128})
    assert filled["original_max_position_embeddings"] == 128  # transformers' default


@pytest.mark.parametrize(("rope", "match"), [
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "'dynamic' recomputes"),
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
      "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}, "'longrope' recomputes"),
    ({"rope_type": "yarn", "rope_theta": 1e4}, "incomplete.*factor"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary"),
])
def test_unsupported_rope_settings_are_refused(rope: dict, match: str):
    with pytest.raises(ValueError, match=match):
        rope_parameters({"rope_parameters": rope, "max_position_embeddings": MAX_POS})


def test_tables_are_cached_and_grow_on_demand():
    rope = RotaryEmbedding(ROPES["default"], HEAD_DIM, MAX_POS)
    small = rope.table(10, torch.device("cpu"))
    assert rope.table(200, torch.device("cpu")) is small  # 256 rows cover both
    grown = rope.table(1001, torch.device("cpu"))
    assert grown.shape == (2, 1024, HEAD_DIM)
    torch.testing.assert_close(grown[:, :256], small, atol=0, rtol=0)


def test_tables_built_under_meta_device_are_real():
    """Models are constructed on the meta device before their weights load."""
    with torch.device("meta"):
        rope = RotaryEmbedding(ROPES["llama3"], HEAD_DIM, MAX_POS)
    cos, _ = rope.cos_sin(POSITIONS, torch.float32)
    torch.testing.assert_close(cos, transformers_cos_sin(ROPES["llama3"], torch.float32)[0],
                               atol=1e-6, rtol=0)
