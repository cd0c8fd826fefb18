"""The target model: a plain PyTorch Llama-family decoder (Llama 2/3, Qwen2, Qwen3).

The engine owns the KV cache and the attention mask; ``Transformer.forward`` only reads and
writes the cache slots it is told to. Besides logits it returns the EAGLE-3 auxiliary hidden
states: the OUTPUTS of the decoder layers ``aux_layer_ids`` (0-based), concatenated low/mid/high.

Variants (all from ``config.json``):
- Llama 2/3: no biases (unless ``attention_bias``/``mlp_bias``); rope as in ``eyas.rope``.
- Qwen2: q/k/v projections carry a bias, o_proj does not.
- Qwen3: per-head RMSNorm on q and k (``q_norm``/``k_norm``) before RoPE.
Tied embeddings (``tie_word_embeddings``) share ``lm_head`` with ``embed_tokens``.
``from_pretrained`` reads the text config with transformers' ``AutoConfig`` and the stop tokens
with its ``GenerationConfig`` (what ``generate`` stops at).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eyas.draft.model import default_aux_layer_ids
from eyas.engine.kv_cache import KVCache, slot_selector
from eyas.rope import RotaryEmbedding, apply_rope, rope_parameters

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ModelConfig:
    """The subset of a Hugging Face ``config.json`` this module needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a (text) config dict; unsupported architectures raise ``ValueError``.
        ``eos_token_ids`` come from the dict's ``eos_token_id``."""
        mtype = cfg.get("model_type", "llama")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={mtype!r} is not supported by the eyas engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); serve it with SGLang instead."
            )
        if cfg.get("use_sliding_window") or (mtype == "mistral" and cfg.get("sliding_window")):
            raise ValueError("config.json enables sliding-window attention, which the eyas engine "
                             "does not implement; disable it or serve the model with SGLang.")
        heads = cfg["num_attention_heads"]
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope_parameters(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attn_bias or mtype == "qwen2", o_bias=attn_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mtype == "qwen3",
            model_type=mtype,
            eos_token_ids=_id_list(cfg.get("eos_token_id")),
        )


def _id_list(ids: int | list[int] | None) -> list[int]:
    """A config's ``eos_token_id`` (one id, a list, or None) as a list."""
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then scaled by the weight in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention reading/writing the engine-owned cache of one layer.

    q, k and v come out of ONE fused projection ``qkv_proj`` (rows: q, then k, then v; the
    loader concatenates the checkpoint's q_proj/k_proj/v_proj): one GEMM instead of three.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, (nh + 2 * nkv) * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
                slots: Tensor, read_slots: Tensor | slice, write_pos: Tensor, mask: Tensor
                ) -> Tensor:
        """x (B, T, H); cos/sin (B, T, 1, hd); ``layer`` of ``cache`` is written at slots (B,)
        and read at ``read_slots`` (the same slots, a slice when consecutive); write_pos
        (B, T) storage index of each new token; mask (B, T, S) bool, True = attend to slot
        position s < S. Returns (B, T, H)."""
        B, T, _ = x.shape
        cfg = self.cfg
        nh, nkv = cfg.num_heads, cfg.num_kv_heads
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, cfg.head_dim)  # (B, T, nh+2nkv, hd)
        qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv:]
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :, :nh]), self.k_norm(qk[:, :, nh:])], dim=2)
        qk = apply_rope(qk, cos, sin)  # q and k heads rotated together
        q, k = qk[:, :, :nh], qk[:, :, nh:]  # (B, T, nh, hd), (B, T, nkv, hd)
        cache.write(layer, slots, write_pos, k, v)
        keys, values = cache.gather(layer, read_slots, mask.shape[-1])  # each (B, nkv, S, hd)
        # Attention runs in the cache's dtype: fp32 on CPU, where bf16 SDPA is 5x slower.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask[:, None],
            enable_gqa=True,
        ).to(x.dtype)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * cfg.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward; gate and up come out of one fused ``gate_up_proj`` (gate rows first)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = nn.Linear(h, 2 * f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # each (B, T, F)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
                slots: Tensor, read_slots: Tensor | slice, write_pos: Tensor, mask: Tensor
                ) -> Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, cache, layer, slots, read_slots, write_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The target decoder. Parameter names equal the Hugging Face ones minus ``model.``, except
    the fused ``qkv_proj`` and ``gate_up_proj`` (see ``fuse_projections``)."""

    def __init__(self, cfg: ModelConfig, aux_layer_ids: list[int] | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.rope_parameters, cfg.head_dim, cfg.max_position_embeddings)
        self.aux_layer_ids = list(aux_layer_ids or default_aux_layer_ids(cfg.num_layers))
        if any(not 0 <= i < cfg.num_layers for i in self.aux_layer_ids):
            raise ValueError(f"aux_layer_ids={self.aux_layer_ids} outside the target's "
                             f"{cfg.num_layers} layers; use 0-based decoder layer indices")

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        """An empty cache of ``num_slots`` sequences of up to ``max_len`` tokens each."""
        p = self.embed_tokens.weight
        cfg = self.config
        dtype = torch.float32 if p.device.type == "cpu" else p.dtype  # see Attention.forward
        return KVCache(cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim,
                       dtype=dtype, device=p.device)

    def forward(self, input_ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
                write_pos: Tensor, mask: Tensor, last_only: bool = False) -> tuple[Tensor, Tensor]:
        """Run T new tokens per row through the model, writing their K/V into the cache.

        input_ids (B, T) int64; positions (B, T) int64 RoPE positions (prefix length + depth
        for tree tokens); slots (B,) int64 cache slot of each row; write_pos (B, T) int64 where
        each token's K/V is stored in its slot; mask (B, T, S) bool, True where the token may
        attend to slot position s (the new tokens' own entries included).
        Returns logits (B, T, V) float (or (B, 1, V) of the last token when ``last_only``) and
        aux hidden states (B, T, 3H): outputs of ``aux_layer_ids`` concatenated in order.
        """
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rope.cos_sin(positions, x.dtype)  # each (B, T, hd)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd): one rotation for all heads
        aux: dict[int, Tensor] = {}
        read_slots = slot_selector(slots)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, slots, read_slots, write_pos, mask)
            if i in self.aux_layer_ids:
                aux[i] = x
        aux_cat = torch.cat([aux[i] for i in self.aux_layer_ids], dim=-1)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float(), aux_cat  # (B, T, V), (B, T, 3H)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        aux_layer_ids: list[int] | None = None) -> Transformer:
        """Load a Hugging Face directory (config.json + single or sharded safetensors)."""
        directory = Path(directory)
        with torch.device("meta"):
            model = cls(read_model_config(directory), aux_layer_ids)
        state = load_safetensors_dir(directory)
        _load_state(model, state, directory)
        return model.to(device=device, dtype=dtype).eval()


def read_model_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face directory: its text config as transformers reads
    it, with the eos ids of its generation config (the config's own when it has none)."""
    from transformers import AutoConfig, GenerationConfig

    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found: model_dir must be a "
                                "Hugging Face model directory with config.json and *.safetensors")
    text = AutoConfig.from_pretrained(directory).get_text_config()
    cfg = ModelConfig.from_dict(text.to_dict())
    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(directory)
        cfg.eos_token_ids = _id_list(generation.eos_token_id) or cfg.eos_token_ids
    return cfg


def load_safetensors_dir(directory: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in its index file."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors(.index.json); convert the "
                                "checkpoint to safetensors (save_pretrained does this)")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_projections(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint keys -> module keys: q/k/v and gate/up weights (and biases) concatenated along
    the output dimension into ``qkv_proj`` / ``gate_up_proj``; other keys unchanged."""
    out = dict(state)
    for key in list(state):
        for fused, parts in FUSED.items():
            prefix, _, tail = key.partition(parts[0] + ".")
            if not tail:
                continue
            names = [f"{prefix}{part}.{tail}" for part in parts]
            if all(n in state for n in names):
                out[f"{prefix}{fused}.{tail}"] = torch.cat([state[n] for n in names], dim=0)
                for n in names:
                    out.pop(n)
    return out


def _load_state(model: Transformer, hf_state: dict[str, Tensor], directory: Path) -> None:
    """Map Hugging Face keys onto the module and assign them; missing/unexpected keys raise."""
    state = fuse_projections({k.removeprefix("model."): v for k, v in hf_state.items()})
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (
        model.config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match config.json: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
