"""The engine's target model against transformers' reference implementations.

Tolerances: float32 throughout; logits agree within atol 1e-4 (stories260k logits are O(10),
the tiny random models' O(1)); the observed differences are ~1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eyas.draft.model import default_aux_layer_ids
from eyas.engine.kv_cache import cache_attention_mask
from eyas.engine.model import ModelConfig, Transformer, read_model_config

ATOL = 1e-4
PROMPT = [1, 403, 407, 261, 378, 10, 300, 42, 99, 7, 55, 201]


def run_full(model: Transformer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence in one forward with a causal mask -> logits (T, V), aux (T, 3H)."""
    T = len(ids)
    cache = model.new_cache(num_slots=2, max_len=T + 4)
    slots = torch.tensor([1])
    pos = torch.arange(T)[None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    mask = cache_attention_mask(torch.tensor([0]), causal, T)
    with torch.no_grad():
        logits, aux = model(torch.tensor([ids]), pos, cache, slots, pos, mask)
    return logits[0], aux[0]


def run_incremental(model: Transformer, ids: list[int], first: int) -> torch.Tensor:
    """Prefill ``first`` tokens, then one token per forward through the cache -> (T, V)."""
    T = len(ids)
    cache = model.new_cache(num_slots=1, max_len=T)
    slots = torch.tensor([0])
    out = []
    with torch.no_grad():
        start = 0
        for end in [first, *range(first + 1, T + 1)]:
            n = end - start
            pos = torch.arange(start, end)[None]
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
            mask = cache_attention_mask(torch.tensor([start]), causal, end)
            logits, _ = model(torch.tensor([ids[start:end]]), pos, cache, slots, pos, mask)
            out.append(logits[0])
            start = end
    return torch.cat(out)


def hf_reference(directory: Path, ids: list[int]):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True)


def check_against_hf(directory: Path, ids: list[int]) -> None:
    ref = hf_reference(directory, ids)
    model = Transformer.from_pretrained(directory)
    logits, aux = run_full(model, ids)
    torch.testing.assert_close(logits, ref.logits[0], atol=ATOL, rtol=0)
    expected_aux = torch.cat([ref.hidden_states[i + 1][0] for i in model.aux_layer_ids], -1)
    torch.testing.assert_close(aux, expected_aux, atol=ATOL, rtol=0)
    torch.testing.assert_close(run_incremental(model, ids, first=3), ref.logits[0],
                               atol=ATOL, rtol=0)


def save_random(model, directory: Path, **kwargs) -> Path:
    """Randomise every parameter (biases and norms too, which HF initialises to 0/1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(str(directory), **kwargs)
    return directory


def test_stories260k_matches_transformers(stories260k: Path):
    check_against_hf(stories260k, PROMPT)


def test_qwen3_qk_norm_matches_transformers(tmp_path: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=False)
    path = save_random(Qwen3ForCausalLM(cfg), tmp_path / "qwen3")
    model = Transformer.from_pretrained(path)
    assert model.config.qk_norm and not model.config.qkv_bias
    check_against_hf(path, [3, 14, 15, 92, 65, 35, 89, 79, 32, 38])


def test_qwen2_bias_matches_transformers(tmp_path: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=True)
    path = save_random(Qwen2ForCausalLM(cfg), tmp_path / "qwen2")
    model = Transformer.from_pretrained(path)
    assert model.config.qkv_bias and not model.config.o_bias
    assert model.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0
    check_against_hf(path, [5, 8, 13, 21, 34, 55, 89, 1, 2, 3])


def test_llama3_rope_scaling_and_shards_match_transformers(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=256, rope_parameters=rope)
    path = save_random(LlamaForCausalLM(cfg), tmp_path / "llama3", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ids = [int(i) for i in torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))]
    check_against_hf(path, ids)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=["linear", "yarn"])
def test_scaled_rope_matches_transformers(tmp_path: Path, rope: dict):
    """Positions past original_max_position_embeddings, where the scaling (and yarn's cos/sin
    attention factor) matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_parameters=dict(rope))
    path = save_random(LlamaForCausalLM(cfg), tmp_path / rope["rope_type"])
    ids = [int(i) for i in torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(2))]
    check_against_hf(path, ids)


def test_default_aux_layers(stories260k: Path):
    """The engine uses the one default of eyas.draft.model (shallow stories260k: [0, 2, 3])."""
    assert Transformer.from_pretrained(stories260k).aux_layer_ids == default_aux_layer_ids(5) == [0, 2, 3]


def test_eos_from_generation_config(tmp_path: Path, stories260k: Path):
    """generate's stop tokens (generation_config.json) win over config.json's eos_token_id."""
    (tmp_path / "config.json").write_text((stories260k / "config.json").read_text())
    assert read_model_config(tmp_path).eos_token_ids == [2]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert read_model_config(tmp_path).eos_token_ids == [2, 7]


def test_unsupported_model_type_names_the_field():
    with pytest.raises(ValueError, match="model_type='gemma2'"):
        ModelConfig.from_dict({"model_type": "gemma2"})


def test_missing_weight_is_reported(tmp_path: Path, stories260k: Path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(stories260k / "model.safetensors"))
    state.pop("model.norm.weight")
    (tmp_path / "config.json").write_text((stories260k / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="norm.weight"):
        Transformer.from_pretrained(tmp_path)


def test_engine_greedy_matches_transformers_generate(stories260k: Path):
    from transformers import AutoModelForCausalLM

    from eyas.engine.engine import Engine, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(str(stories260k), dtype=torch.float32).eval()
    prompt = PROMPT[:5]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = Engine(str(stories260k)).generate([prompt], SamplingParams(max_tokens=40))[0]
    assert out.token_ids == ref
