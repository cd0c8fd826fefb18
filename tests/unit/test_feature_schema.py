"""Feature rows: exact bf16 round trip, bounded fp8 error, padding collation, sizes."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from eyas.features.schema import FEATURE_SCHEMA, bytes_per_token, collate, decode_row, encode_row


def sample(T=5, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3 * H, generator=g) * 3, torch.randn(T, H, generator=g)


def test_bf16_round_trip_is_exact_to_bf16():
    aux, hidden = sample()
    row = encode_row("a", list(range(5)), [0, 0, 1, 1, 1], aux, hidden)
    pa.Table.from_pylist([row], schema=FEATURE_SCHEMA)  # matches the declared schema
    out = decode_row(row)
    assert torch.equal(out["aux"], aux.to(torch.bfloat16).float())
    assert torch.equal(out["hidden"], hidden.to(torch.bfloat16).float())
    assert out["loss_mask"].tolist() == [0, 0, 1, 1, 1]
    assert bytes_per_token(row) == 8 * 16 + 5


def test_fp8_error_is_bounded_and_smaller():
    aux, hidden = sample(T=64, H=32)
    row = encode_row("a", [1] * 64, [1] * 64, aux, hidden, encoding="fp8")
    out = decode_row(row)
    rel = (out["aux"] - aux).abs().max() / aux.abs().max()
    assert rel < 0.07  # e4m3 keeps 3 mantissa bits: relative step <= 2**-3 / 2 per value
    assert torch.allclose(out["hidden"], hidden, atol=0.07 * hidden.abs().max())
    assert bytes_per_token(row) == 4 * 32 + 16 + 5


def test_shape_mismatch_names_the_row():
    aux, hidden = sample()
    with pytest.raises(ValueError, match="row7"):
        encode_row("row7", [1, 2], [1, 1], aux, hidden)


def test_collate_right_pads():
    rows = [encode_row("a", [1, 2, 3], [0, 1, 1], *sample(T=3)), encode_row("b", [4], [1], *sample(T=1))]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["aux"].shape == (2, 3, 48) and batch["hidden"][1, 1:].abs().sum() == 0
