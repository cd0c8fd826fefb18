"""The EAGLE-3 draft head: one Llama decoder layer over [token embedding ; fused target features].

Module and buffer names equal the checkpoint keys SGLang and vLLM load (docs/EAGLE3.md):
``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``. The token embeddings are the
target's (frozen) and are passed in; they are never part of this module.

Layer convention for the captured target features (``aux_layer_ids``): 0-based indices of
decoder-layer OUTPUTS, default ``[1, N//2 - 1, N - 4]``. Hugging Face's
``output_hidden_states`` tuple (index 0 = embeddings) holds layer ``i``'s output at ``i + 1``;
SGLang's "input of layer k" numbering is the same ``i + 1``. The config.json field
``eagle_config.eagle_aux_hidden_state_layer_ids`` stores the OUTPUT indices (SGLang adds 1).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eyas.draft.vocab import check_vocab_mapping
from eyas.rope import RotaryEmbedding, apply_rope, rope_parameters

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

ARCHITECTURE = "LlamaForCausalLMEagle3"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
NUM_AUX_LAYERS = 3


# ----------------------------------------------------------------------------- config helpers


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a target's config.json (multimodal configs nest it)."""
    inner = cfg.get("text_config")
    return inner if isinstance(inner, dict) else cfg


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's default capture layers as 0-based layer OUTPUT indices: [1, N//2-1, N-4].

    Below N = 7 that formula repeats or skips layers (N=5 gives [1, 1, 1]); there the three are
    spread as ``[0, (N-1)//2, N-2]`` (N=5 gives [0, 2, 3]), keeping the formula's rule that the
    last layer is never captured. N < 4 has no three such layers and raises ``ValueError``.
    Every stage records the ids it used (features manifest, draft config.json), so servers
    never fall back to their own default.
    """
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if ids == sorted(set(ids)) and ids[0] >= 0:
        return ids
    if num_layers < NUM_AUX_LAYERS + 1:
        raise ValueError(f"a target with {num_layers} layers has no {NUM_AUX_LAYERS} distinct "
                         "layers before its last to capture; pass aux_layer_ids explicitly")
    return [0, (num_layers - 1) // 2, num_layers - 2]


def aux_ids_to_hidden_states_indices(aux_layer_ids: list[int]) -> list[int]:
    """Layer OUTPUT indices -> indices into HF ``output_hidden_states`` (= SGLang's numbering)."""
    return [i + 1 for i in aux_layer_ids]


def hidden_states_indices_to_aux_ids(indices: list[int]) -> list[int]:
    """Indices into HF ``output_hidden_states`` (0 = embeddings) -> layer OUTPUT indices."""
    if any(i < 1 for i in indices):
        raise ValueError(f"hidden_states indices {indices}: index 0 is the embedding output, "
                         "not a decoder layer; use indices >= 1")
    return [i - 1 for i in indices]


def validate_aux_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    """Check three distinct ascending layer-output indices in [0, N-2]; return them as ints.

    N-2 is the last usable index: servers capture "the input of layer i+1", which does not
    exist for the last layer.
    """
    ids = [int(i) for i in aux_layer_ids]
    hint = (f"pass {NUM_AUX_LAYERS} distinct ascending layer-output indices in "
            f"[0, {num_layers - 2}] (low, mid, high), e.g. "
            f"[0, {(num_layers - 1) // 2}, {num_layers - 2}] for shallow targets")
    if len(ids) != NUM_AUX_LAYERS:
        raise ValueError(f"aux_layer_ids={ids}: need exactly {NUM_AUX_LAYERS} layers; {hint}")
    if len(set(ids)) != len(ids) or ids != sorted(ids):
        raise ValueError(f"aux_layer_ids={ids} for a {num_layers}-layer target are not distinct "
                         f"and ascending; {hint}")
    if ids[0] < 0 or ids[-1] > num_layers - 2:
        raise ValueError(f"aux_layer_ids={ids} out of range for a {num_layers}-layer target; {hint}")
    return ids


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{where} lacks {key!r}; it must be a Llama-style config.json")
    return cfg[key]


@dataclass
class DraftConfig:
    """Sizes of the draft head. ``hidden_size`` must equal the target's (its embeddings feed in)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any]  # flat and standardized: see eyas.rope.rope_parameters
    max_position_embeddings: int
    vocab_size: int  # target vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: list[int] | None  # layer OUTPUT indices; None = server default
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        self.rope_parameters = rope_parameters({
            "rope_parameters": self.rope_parameters,
            "max_position_embeddings": self.max_position_embeddings})
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must be in "
                             f"[1, vocab_size={self.vocab_size}]")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}: use one of {sorted(DTYPES)}")
        if self.hidden_size != self.target_hidden_size:
            raise ValueError(f"hidden_size={self.hidden_size} != target_hidden_size="
                             f"{self.target_hidden_size}: the draft consumes the target's "
                             "embeddings, so both must be equal")

    @classmethod
    def from_target_config(cls, target_config: dict[str, Any], draft_vocab_size: int,
                           aux_layer_ids: list[int] | None = None) -> DraftConfig:
        """Copy sizes from the target's config.json dict.

        ``draft_vocab_size`` is clamped to the target vocabulary (identity mapping when the
        vocabulary is smaller). ``aux_layer_ids=None`` uses ``default_aux_layer_ids``; the ids
        are validated (shallow targets such as stories260k need explicit ids).
        """
        tc = text_config(target_config)
        where = "target config"
        num_layers = int(_require(tc, "num_hidden_layers", where))
        ids = default_aux_layer_ids(num_layers) if aux_layer_ids is None else aux_layer_ids
        hidden = int(_require(tc, "hidden_size", where))
        heads = int(_require(tc, "num_attention_heads", where))
        dtype = tc.get("torch_dtype") or tc.get("dtype") or "bfloat16"
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_require(tc, "intermediate_size", where)),
            num_attention_heads=heads,
            num_key_value_heads=int(tc.get("num_key_value_heads") or heads),
            head_dim=int(tc.get("head_dim") or hidden // heads),
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
            rope_parameters=rope_parameters(tc),
            max_position_embeddings=int(_require(tc, "max_position_embeddings", where)),
            vocab_size=int(_require(tc, "vocab_size", where)),
            draft_vocab_size=min(int(draft_vocab_size), int(tc["vocab_size"])),
            target_hidden_size=hidden,
            aux_layer_ids=validate_aux_layer_ids(ids, num_layers),
            torch_dtype=dtype if dtype in DTYPES else "bfloat16",
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json SGLang / vLLM load as ``LlamaForCausalLMEagle3``.

        Rope settings are written both as ``rope_parameters`` (transformers 5) and as legacy
        ``rope_theta`` + ``rope_scaling`` (transformers 4, which servers may pin).
        """
        rope = dict(self.rope_parameters)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": None if rope["rope_type"] == "default" else scaling,
            "rope_parameters": rope,
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
        }
        if self.aux_layer_ids is not None:
            cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                                   "use_aux_hidden_state": True}
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> DraftConfig:
        """Read a draft config.json dict (this project's or another EAGLE-3 trainer's)."""
        where = "draft config.json"
        if int(cfg.get("num_hidden_layers", 1)) != 1:
            raise ValueError(f"{where} has num_hidden_layers={cfg['num_hidden_layers']}; "
                             "the EAGLE-3 head has exactly one decoder layer")
        hidden = int(_require(cfg, "hidden_size", where))
        heads = int(_require(cfg, "num_attention_heads", where))
        vocab = int(_require(cfg, "vocab_size", where))
        eagle = cfg.get("eagle_config") or {}
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_require(cfg, "intermediate_size", where)),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_parameters=rope_parameters(cfg),
            max_position_embeddings=int(_require(cfg, "max_position_embeddings", where)),
            vocab_size=vocab,
            draft_vocab_size=int(cfg.get("draft_vocab_size") or vocab),
            target_hidden_size=int(cfg.get("target_hidden_size") or hidden),
            aux_layer_ids=[int(i) for i in ids] if ids is not None else None,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        )


def expected_tensor_shapes(config: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of a draft with ``config`` and its shape (docs/EAGLE3.md)."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    p = "midlayer."
    return {
        "fc.weight": (h, NUM_AUX_LAYERS * config.target_hidden_size),
        p + "self_attn.q_proj.weight": (q, 2 * h),
        p + "self_attn.k_proj.weight": (kv, 2 * h),
        p + "self_attn.v_proj.weight": (kv, 2 * h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
        p + "input_layernorm.weight": (h,),
        p + "hidden_norm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (config.draft_vocab_size, h),
        "d2t": (config.draft_vocab_size,),
        "t2d": (config.vocab_size,),
    }


# ----------------------------------------------------------------------------- attention


def causal_mask(t_new: int, s_past: int, device: torch.device) -> Tensor:
    """(1, 1, t_new, s_past + t_new) bool, True = visible: new token i sees keys 0 .. s_past + i."""
    q_pos = torch.arange(t_new, device=device)[:, None] + s_past  # (t_new, 1)
    k_pos = torch.arange(s_past + t_new, device=device)[None, :]  # (1, S)
    return (k_pos <= q_pos)[None, None]


@functools.cache
def flex_attention_kernel(device_type: str) -> Callable[..., Tensor]:
    """``flex_attention``, compiled on CUDA (a fused kernel that skips fully masked blocks).
    Elsewhere it runs eagerly, forward only: the CPU parity reference of the GPU path."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None) -> Tensor:
    """Grouped-query attention without copying K/V to every query head (``enable_gqa``).

    q (B, nh, T, hd); k, v (B, nkv, S, hd), the T queries being the last T keys; mask: None
    (causal), a bool (True = visible) or additive float tensor (B or 1, 1, T, S) for SDPA, or
    a flex ``BlockMask`` over (T, S). Returns (B, nh, T, hd).
    """
    t, s = q.shape[2], k.shape[2]
    if mask is None:
        mask = causal_mask(t, s - t, q.device)
    got = tuple(mask.shape[-2:]) if isinstance(mask, Tensor) else tuple(mask.seq_lengths)
    if got != (t, s):
        raise ValueError(f"attention mask covers {got} (queries, keys); expected ({t}, {s}) "
                         f"for {t} new tokens after {s - t}")
    if not isinstance(mask, Tensor):
        return flex_attention_kernel(q.device.type)(q, k, v, block_mask=mask, enable_gqa=True)
    if mask.is_floating_point():
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """Llama RMSNorm; statistics in at least fp32, result in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DraftAttention(nn.Module):
    """GQA self-attention whose q/k/v read the 2H-wide [embedding ; hidden] input."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h2 = 2 * config.hidden_size
        self.q_proj = nn.Linear(h2, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h2, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h2, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_bias: Tensor | BlockMask | None,
                past_kv: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, 2H); cos/sin (B, T, hd); attn_bias as in ``attend`` -> (B, T, H) and the
        (k, v) cache, each (B, n_kv, S_past + T, hd)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): one rotation for all heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)  # (B, nkv, S_past + T, hd)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)  # (B, nkv, S_past + T, hd)
        y = attend(q, k, v, attn_bias)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y), (k, v)


class DraftMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H) -> (B, T, H)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """The "midlayer": attention over [input_layernorm(emb) ; hidden_norm(hidden)], residual =
    hidden, then post-attention RMSNorm and the SwiGLU MLP."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = DraftMLP(h, config.intermediate_size)

    def forward(self, input_embeds: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor,
                attn_bias: Tensor | BlockMask | None, past_kv: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """input_embeds, hidden (B, T, H) -> out (B, T, H), (k, v)."""
        x = torch.cat([self.input_layernorm(input_embeds), self.hidden_norm(hidden)], dim=-1)  # (B, T, 2H)
        attn, kv = self.self_attn(x, cos, sin, attn_bias, past_kv)
        h = hidden + attn  # (B, T, H)
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft head. Attributes are named like the checkpoint keys."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(NUM_AUX_LAYERS * config.target_hidden_size, h, bias=False)
        self.midlayer = DraftDecoderLayer(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True  # a consistent placeholder until a mapping is set
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", t2d)
        self.rope = RotaryEmbedding(config.rope_parameters, config.head_dim,
                                    config.max_position_embeddings)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Llama-style init: linear weights ~ N(0, std), norm weights 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_vocab_mapping(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install d2t (draft_vocab,) int64 offsets and t2d (vocab,) bool; checked for consistency."""
        if tuple(d2t.shape) != tuple(self.d2t.shape) or tuple(t2d.shape) != tuple(self.t2d.shape):
            raise ValueError(f"vocab mapping shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do "
                             f"not match the draft ({tuple(self.d2t.shape)}, {tuple(self.t2d.shape)}); "
                             "build the DraftConfig with draft_vocab_size = len(d2t)")
        problems = check_vocab_mapping(d2t.to(torch.int64), t2d.to(torch.bool))
        if problems:
            raise ValueError("inconsistent vocab mapping: " + "; ".join(problems))
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def fuse(self, aux: Tensor) -> Tensor:
        """aux (B, T, 3*Ht) concatenated low/mid/high target features -> (B, T, H)."""
        if aux.shape[-1] != self.fc.in_features:
            raise ValueError(f"aux has last dim {aux.shape[-1]}; expected 3 * target_hidden_size "
                             f"= {self.fc.in_features} (the three captured layers concatenated)")
        return self.fc(aux.to(self.fc.weight.dtype))

    def forward(self, input_embeds: Tensor, hidden: Tensor, position_ids: Tensor,
                attn_bias: Tensor | BlockMask | None = None,
                past_kv: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One draft pass.

        input_embeds (B, T, H): target embeddings of the input tokens; hidden (B, T, H): fused
        target features (step 0) or the previous output; position_ids (B, T) int64; attn_bias:
        additive float (0 / -inf) or bool (True = visible) mask (B or 1, 1, T, S_past + T), or a
        flex ``BlockMask`` of the same extent (``eyas.draft.ttt``), None = causal over past + new;
        past_kv: (k, v) each (B, n_kv, S_past, head_dim), after RoPE.
        Returns out (B, T, H) (pre-final-norm; fed back as the next hidden) and (k, v) of
        length S_past + T.
        """
        dtype = self.fc.weight.dtype
        cos, sin = self.rope.cos_sin(position_ids, dtype)  # each (B, T, hd)
        return self.midlayer(input_embeds.to(dtype), hidden.to(dtype), cos, sin, attn_bias, past_kv)

    def logits(self, out: Tensor) -> Tensor:
        """out (B, T, H) -> draft-vocab logits (B, T, draft_vocab), at least fp32."""
        logits = self.lm_head(self.norm(out))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        """Draft-vocab ids (any shape, int64) -> target-vocab ids (same shape)."""
        return draft_ids + self.d2t[draft_ids]

    @classmethod
    def from_pretrained(cls, directory: str | Path,
                        dtype: torch.dtype | str | None = None) -> Eagle3Draft:
        """Load an exported directory (config.json + model.safetensors).

        ``dtype=None`` keeps the config's ``torch_dtype``; d2t / t2d stay int64 / bool.
        """
        from safetensors.torch import load_file

        path = Path(directory)
        cfg_path, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_path, weights):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: {path} is not a draft directory "
                                        "(write one with eyas.export.writer.save_draft)")
        config = DraftConfig.from_hf_config(json.loads(cfg_path.read_text()))
        model = cls(config)
        state = load_file(str(weights))
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(f"{weights}: missing keys {missing}, unexpected keys {unexpected}; "
                             "check it with `python -m eyas.export.check`")
        model.load_state_dict(state)
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)} or a torch.dtype")
        target = DTYPES[dtype] if isinstance(dtype, str) else dtype or DTYPES[config.torch_dtype]
        return model.to(target)
