"""Write a trained draft head as a directory SGLang and vLLM load (config.json + model.safetensors).

Exactly the keys of docs/EAGLE3.md: float weights in the export dtype, ``d2t`` int64, ``t2d``
bool, no ``embed_tokens``. Writes a local directory; callers copy it to object storage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from eyas.draft.model import DTYPES, Eagle3Draft, expected_tensor_shapes
from eyas.draft.vocab import check_vocab_mapping

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export_tensors(draft: Eagle3Draft, dtype: str) -> dict[str, Tensor]:
    """The checkpoint tensors (CPU, contiguous): floats in ``dtype``, d2t int64, t2d bool."""
    float_dtype = DTYPES[dtype]
    state = draft.state_dict()
    expected = expected_tensor_shapes(draft.config)
    if set(state) != set(expected):
        raise ValueError(f"draft state keys {sorted(set(state) ^ set(expected))} differ from the "
                         "EAGLE-3 checkpoint format; export an eyas.draft.model.Eagle3Draft")
    out = {}
    for name, tensor in state.items():
        if name == "d2t":
            cast = tensor.to(torch.int64)
        elif name == "t2d":
            cast = tensor.to(torch.bool)
        else:
            cast = tensor.to(float_dtype)
        out[name] = cast.detach().cpu().contiguous()
    return out


def save_draft(draft: Eagle3Draft, directory: str | Path, dtype: str = "bfloat16") -> None:
    """Write ``directory``/config.json and model.safetensors (each atomically via rename)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: export dtype must be one of {sorted(DTYPES)}")
    problems = check_vocab_mapping(draft.d2t, draft.t2d)
    if problems:
        raise ValueError("refusing to export an inconsistent vocab mapping: " + "; ".join(problems))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(draft, dtype)
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    config = dataclasses.replace(draft.config, torch_dtype=dtype).to_hf_config()
    tmp_config = out / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_config, out / CONFIG_FILE)
