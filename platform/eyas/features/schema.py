"""The feature row: one conversation's target features, stored in Arrow/Parquet (never pickled).

Columns::

    id            string
    input_ids     list<int32>   (T,)
    loss_mask     list<int8>    (T,)
    num_tokens    int32         T
    hidden_size   int32         H of the target
    encoding      string        "bf16" | "fp8"
    aux           binary        (T, 3H) low/mid/high aux hidden states, row-major
    hidden        binary        (T, H) final hidden state (the input of the target's lm_head)
    aux_scale     binary        (T, 3) float32 per token and layer ("fp8" only, else empty)
    hidden_scale  binary        (T, 1) float32 per token ("fp8" only, else empty)

"bf16" stores bfloat16 bits (8H bytes/token for aux + hidden). "fp8" stores float8_e4m3fn with
a float32 scale per token and layer (amax / 448), about half the bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

ENCODINGS = ("bf16", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FEATURE_SCHEMA = pa.schema([
    ("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
    ("num_tokens", pa.int32()), ("hidden_size", pa.int32()), ("encoding", pa.string()),
    ("aux", pa.binary()), ("hidden", pa.binary()), ("aux_scale", pa.binary()), ("hidden_scale", pa.binary()),
])


def _to_bytes(x: torch.Tensor) -> bytes:
    """Raw bits of a contiguous CPU tensor (bf16 viewed as int16, fp8 as uint8)."""
    bits = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}.get(x.dtype, x.dtype)
    return x.detach().cpu().contiguous().view(bits).numpy().tobytes()


def _from_bytes(blob: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    bits = {torch.bfloat16: np.int16, torch.float8_e4m3fn: np.uint8, torch.float32: np.float32}[dtype]
    arr = np.frombuffer(blob, dtype=bits).copy()
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def quantize_fp8(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, G*D) float -> fp8 values (T, G*D) and float32 scales (T, G), one per token and group."""
    T = x.shape[0]
    g = x.float().reshape(T, groups, -1)  # (T, G, D)
    scale = (g.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)  # (T, G)
    q = (g / scale[..., None]).to(torch.float8_e4m3fn)
    return q.reshape(T, -1), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 (T, G*D) and scales (T, G) -> float32 (T, G*D)."""
    T, G = scale.shape
    return (q.float().reshape(T, G, -1) * scale[..., None]).reshape(T, -1)


def encode_row(row_id: str, input_ids: list[int], loss_mask: list[int], aux: torch.Tensor,
               hidden: torch.Tensor, encoding: str = "bf16") -> dict[str, Any]:
    """One conversation's features -> a row of ``FEATURE_SCHEMA``. aux (T, 3H), hidden (T, H)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"feature encoding {encoding!r} is not one of {ENCODINGS}")
    T, H = hidden.shape
    if aux.shape != (T, 3 * H) or len(input_ids) != T or len(loss_mask) != T:
        raise ValueError(f"feature shapes disagree for {row_id}: aux {tuple(aux.shape)}, hidden {(T, H)}, "
                         f"{len(input_ids)} ids, {len(loss_mask)} mask values")
    row = {"id": row_id, "input_ids": list(input_ids), "loss_mask": list(loss_mask), "num_tokens": T,
           "hidden_size": H, "encoding": encoding, "aux_scale": b"", "hidden_scale": b""}
    if encoding == "bf16":
        return {**row, "aux": _to_bytes(aux.to(torch.bfloat16)), "hidden": _to_bytes(hidden.to(torch.bfloat16))}
    qa, sa = quantize_fp8(aux, 3)
    qh, sh = quantize_fp8(hidden, 1)
    return {**row, "aux": _to_bytes(qa), "hidden": _to_bytes(qh), "aux_scale": _to_bytes(sa),
            "hidden_scale": _to_bytes(sh)}


def decode_row(row: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A feature row -> tensors: input_ids (T,) int64, loss_mask (T,) int64, aux (T, 3H), hidden (T, H)."""
    T, H = int(row["num_tokens"]), int(row["hidden_size"])
    if row["encoding"] == "bf16":
        aux = _from_bytes(row["aux"], torch.bfloat16, (T, 3 * H))
        hidden = _from_bytes(row["hidden"], torch.bfloat16, (T, H))
    elif row["encoding"] == "fp8":
        aux = dequantize_fp8(_from_bytes(row["aux"], torch.float8_e4m3fn, (T, 3 * H)),
                             _from_bytes(row["aux_scale"], torch.float32, (T, 3)))
        hidden = dequantize_fp8(_from_bytes(row["hidden"], torch.float8_e4m3fn, (T, H)),
                                _from_bytes(row["hidden_scale"], torch.float32, (T, 1)))
    else:
        raise ValueError(f"feature row {row.get('id')!r} has unknown encoding {row['encoding']!r}")
    return {"input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "loss_mask": torch.tensor(row["loss_mask"], dtype=torch.long),
            "aux": aux.to(dtype), "hidden": hidden.to(dtype)}


def collate(rows: list[dict[str, Any]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Decode and right-pad rows into a batch: input_ids/loss_mask/attention_mask (B, T) int64,
    aux (B, T, 3H), hidden (B, T, H); padding has attention_mask 0 and loss_mask 0."""
    decoded = [decode_row(r, dtype) for r in rows]
    B, T = len(decoded), max(d["input_ids"].shape[0] for d in decoded)
    H = decoded[0]["hidden"].shape[1]
    out = {"input_ids": torch.zeros(B, T, dtype=torch.long), "loss_mask": torch.zeros(B, T, dtype=torch.long),
           "attention_mask": torch.zeros(B, T, dtype=torch.long), "aux": torch.zeros(B, T, 3 * H, dtype=dtype),
           "hidden": torch.zeros(B, T, H, dtype=dtype)}
    for i, d in enumerate(decoded):
        n = d["input_ids"].shape[0]
        for key in ("input_ids", "loss_mask", "aux", "hidden"):
            out[key][i, :n] = d[key]
        out["attention_mask"][i, :n] = 1
    return out


def bytes_per_token(row: dict[str, Any]) -> float:
    """Payload bytes per token of one row (ids int32 + mask int8 + features + scales)."""
    payload = len(row["aux"]) + len(row["hidden"]) + len(row["aux_scale"]) + len(row["hidden_scale"])
    return (payload + 5 * int(row["num_tokens"])) / max(int(row["num_tokens"]), 1)
