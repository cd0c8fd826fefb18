"""Rotary position embeddings (RoPE): the one implementation the target engine and the draft share.

The inverse frequencies and the attention scaling come from transformers' ``ROPE_INIT_FUNCTIONS``
(the default type is the plain ``1 / theta ** (2i / head_dim)``), and the rope settings of a
config are standardized by transformers' own config class, so legacy ``rope_theta`` +
``rope_scaling`` and transformers-5 ``rope_parameters`` read alike. Supported types:
``default``, ``linear``, ``llama3``, ``yarn``. ``dynamic`` and ``longrope`` are refused: their
frequencies depend on the running sequence length, so keys cached at one length would be
rotated differently from keys computed at another.

Precision: frequencies, angles and cos/sin are float32, as in transformers (and in the
reference Llama code the targets were trained with); the tables are cast to the activation
dtype only when read. This keeps the engine's logits equal to transformers' within float32
rounding at every position; a float64 angle would be "more exact" than the models ever saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
MIN_TABLE_LENGTH = 256
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")


def _carrier_config(rope: dict[str, Any], head_dim: int, max_position_embeddings: int) -> Any:
    """A minimal transformers ``LlamaConfig`` holding only rope settings (what the rope
    functions of transformers read). ``rope``: any of the keys in ``_ROPE_KEYS``."""
    from transformers import LlamaConfig

    fields = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rope.items()
              if k in _ROPE_KEYS and v is not None}
    return LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings, **fields)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The standardized, flat rope settings of a (text) config dict.

    Reads ``rope_parameters`` or legacy ``rope_theta`` + ``rope_scaling`` (``type`` or
    ``rope_type``); transformers fills the defaults (e.g. ``original_max_position_embeddings``
    of llama3/yarn = ``max_position_embeddings``). Returns a dict with ``rope_type``,
    ``rope_theta`` and the type's fields; unsupported settings raise ``ValueError``.
    """
    max_len = int(config.get("max_position_embeddings") or 2048)
    try:  # the head size does not enter the standardization; any even value does
        carrier = _carrier_config(config, head_dim=2, max_position_embeddings=max_len)
    except KeyError as exc:  # transformers names the missing field of the rope type
        raise ValueError(f"rope settings of the config are incomplete: {exc}") from None
    params = {k: v for k, v in carrier.rope_parameters.items() if k != "type"}
    check_rope_parameters(params)
    return params


def check_rope_parameters(params: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the setting when ``params`` (flat, standardized) is not
    something this module computes exactly."""
    kind = params.get("rope_type", "default")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope settings {params!r} differ per layer type; eyas supports one "
                         "rope for all layers (serve such models with SGLang)")
    if kind in LENGTH_DEPENDENT_ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r} recomputes its frequencies from the current "
                         "sequence length, which a KV cache (and the draft trained against it) "
                         f"cannot follow; eyas supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']}: eyas rotates "
                         "the whole head; only 1.0 is supported")


def rope_frequencies(params: dict[str, Any], head_dim: int, max_position_embeddings: int
                     ) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim // 2,) float32 on the CPU and the cos/sin scaling (yarn's
    attention factor; 1.0 for the other types) of standardized ``params``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    check_rope_parameters(params)
    kind = params.get("rope_type", "default")
    with torch.device("cpu"):  # also when a model is being built on the meta device
        if kind == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            return 1.0 / (float(params["rope_theta"]) ** exponents), 1.0
        carrier = _carrier_config({"rope_parameters": params}, head_dim, max_position_embeddings)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](carrier, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding:
    """cos/sin tables of one rope setting, float32, cached per device and grown on demand.

    Not an ``nn.Module``: the tables are derived data, never saved, and follow whatever device
    the positions are on.
    """

    def __init__(self, params: dict[str, Any], head_dim: int, max_position_embeddings: int) -> None:
        self.params = dict(params)
        self.head_dim = head_dim
        self.inv_freq, self.attention_scaling = rope_frequencies(params, head_dim,
                                                                 max_position_embeddings)
        self._tables: dict[torch.device, Tensor] = {}

    def table(self, length: int, device: torch.device) -> Tensor:
        """(2, L, head_dim) float32 [cos; sin] for positions 0 .. L-1 with L >= ``length``."""
        cached = self._tables.get(device)
        if cached is not None and cached.shape[1] >= length:
            return cached
        size = max(MIN_TABLE_LENGTH, 1 << max(length - 1, 0).bit_length())
        positions = torch.arange(size, dtype=torch.float32, device=device)
        freqs = positions[:, None] * self.inv_freq.to(device)  # (L, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (L, hd), rotate-half layout
        table = torch.stack([angles.cos(), angles.sin()]) * self.attention_scaling  # (2, L, hd)
        self._tables[device] = table
        return table

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T) int64 (>= 0) -> cos, sin each (B, T, head_dim) in ``dtype``.

        Reads the largest position on the host once per call to size the table.
        """
        length = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = self.table(length, positions.device)[:, positions].to(dtype)  # each (B, T, hd)
        return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    """(..., hd) -> (..., hd): [x1, x2] -> [-x2, x1] (Llama's half-split rotation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., hd) by cos/sin broadcastable to it, e.g. x (B, T, heads, hd) with
    cos (B, T, 1, hd) or x (B, heads, T, hd) with cos (B, 1, T, hd)."""
    return x * cos + rotate_half(x) * sin
