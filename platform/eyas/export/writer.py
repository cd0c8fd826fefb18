"""Write a trained draft head as a directory SGLang or vLLM loads (config.json + model.safetensors).

Exactly the keys of docs/EAGLE3.md: float weights in the export dtype, ``d2t`` int64, ``t2d``
bool, no ``embed_tokens``. Writes a local directory; callers copy it to object storage.
The tensors are the same for both servers; only config.json's aux-layer numbering differs
(``server_hf_config``): ``server="sglang"`` (the default) or ``"vllm"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eyas.draft.model import (
    DTYPES,
    DraftConfig,
    Eagle3Draft,
    aux_ids_to_hidden_states_indices,
    expected_tensor_shapes,
)
from eyas.draft.vocab import check_vocab_mapping

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SERVERS = ("sglang", "vllm")  # export targets: whose aux-layer numbering config.json carries
VLLM_AUX_KEY = "eagle_aux_hidden_state_layer_ids"  # top level of config.json, vLLM's numbering


def vllm_aux_layer_ids(aux_layer_ids: list[int]) -> list[int]:
    """Layer OUTPUT indices (eyas, and SGLang's ``eagle_config`` list) -> vLLM's numbers: + 1.

    vLLM's target (0.34: ``model_executor/models/llama.py`` ``LlamaModel.forward``) appends the
    residual stream under id ``idx + 1`` right after decoder layer ``idx`` runs, so its id ``k``
    is the INPUT of layer ``k`` = the output of layer ``k - 1`` = HF ``hidden_states[k]``
    (its default, ``(2, N//2, N-3)`` in ``models/interfaces.py``, is EAGLE-3's
    ``[1, N//2-1, N-4]`` outputs). It reads the list from the top level of the draft's config
    (``v1/worker/gpu/spec_decode/eagle/eagle3_utils.py`` ``get_eagle3_aux_layers_from_config``)
    and only counts ``eagle_config``'s (``models/llama_eagle3.py``). SGLang reads
    ``eagle_config``'s list and adds the 1 itself (``srt/models/llama.py``
    ``set_eagle3_layers_to_capture``).
    """
    return aux_ids_to_hidden_states_indices(aux_layer_ids)


def server_hf_config(config: DraftConfig, server: str = "sglang") -> dict[str, Any]:
    """The config.json dict ``server`` loads. Both keep ``eagle_config`` with the OUTPUT
    indices (SGLang's key; the eyas reader's); ``vllm`` adds the top-level ids in vLLM's
    numbering (``vllm_aux_layer_ids``), without which vLLM ignores custom ids and captures
    its defaults."""
    if server not in SERVERS:
        raise ValueError(f"server={server!r}: export for one of {SERVERS}")
    cfg = config.to_hf_config()
    if server == "vllm" and config.aux_layer_ids is not None:
        cfg[VLLM_AUX_KEY] = vllm_aux_layer_ids(config.aux_layer_ids)
    return cfg


def write_config(config: DraftConfig, directory: str | Path, server: str = "sglang") -> None:
    """Write ``directory``/config.json for ``server`` atomically (via rename)."""
    out = Path(directory)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(server_hf_config(config, server), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)


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


def save_draft(draft: Eagle3Draft, directory: str | Path, dtype: str = "bfloat16",
               server: str = "sglang") -> None:
    """Write ``directory``/config.json (for ``server``) and model.safetensors (each atomically
    via rename)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: export dtype must be one of {sorted(DTYPES)}")
    if server not in SERVERS:
        raise ValueError(f"server={server!r}: export for one of {SERVERS}")
    problems = check_vocab_mapping(draft.d2t, draft.t2d)
    if problems:
        raise ValueError("refusing to export an inconsistent vocab mapping: " + "; ".join(problems))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(draft, dtype)
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    write_config(dataclasses.replace(draft.config, torch_dtype=dtype), out, server)
