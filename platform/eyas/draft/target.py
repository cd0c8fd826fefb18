"""The frozen target tensors the draft needs: token embeddings and lm_head, nothing else.

Reads only those two tensors from a Hugging Face safetensors checkpoint (``model.safetensors``
or shards listed in ``model.safetensors.index.json``); the rest of the target never loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from eyas.draft.model import text_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EMBED_SUFFIX = "embed_tokens.weight"
LM_HEAD_SUFFIX = "lm_head.weight"


def _weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file name (relative to ``model_dir``)."""
    from safetensors import safe_open

    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' dict; it is not a safetensors index")
        return weight_map
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise FileNotFoundError(f"neither {SINGLE_FILE} nor {INDEX_FILE} in {model_dir}: the target "
                            "must be a Hugging Face safetensors checkpoint (convert .bin first)")


def _find_key(names: list[str], suffix: str, model_dir: Path) -> str | None:
    """The tensor named ``model.<suffix>`` / ``<suffix>``, else the single one ending in it
    (multimodal checkpoints prefix it, e.g. ``language_model.model.embed_tokens.weight``)."""
    for exact in ("model." + suffix, suffix):
        if exact in names:
            return exact
    hits = sorted(n for n in names if n.endswith(suffix))
    if len(hits) > 1:
        text_hits = [n for n in hits if "language_model" in n]
        if len(text_hits) == 1:
            return text_hits[0]
        raise ValueError(f"{model_dir}: several tensors end with {suffix!r}: {hits}; "
                         "cannot tell which belongs to the language model")
    return hits[0] if hits else None


def _read_tensor(model_dir: Path, file_name: str, key: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(model_dir / file_name), framework="pt") as f:
        return f.get_tensor(key)


def is_tied(config: dict[str, Any]) -> bool:
    """Whether the target ties lm_head to the embeddings (text config first, then top level;
    transformers' Llama default is untied)."""
    tc = text_config(config)
    value = tc.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return bool(value)


def load_target_head(model_dir: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(embed_weight (V, Ht), lm_head_weight (V, Ht), config dict) in the stored dtype, on CPU.

    Tied targets without a stored lm_head return the embedding tensor itself as lm_head.
    """
    path = Path(model_dir)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: point at a Hugging Face model directory")
    config = json.loads(cfg_path.read_text())
    weight_map = _weight_map(path)
    names = list(weight_map)
    embed_key = _find_key(names, EMBED_SUFFIX, path)
    if embed_key is None:
        raise ValueError(f"{path}: no tensor ending with {EMBED_SUFFIX!r}; is it a causal LM?")
    embed = _read_tensor(path, weight_map[embed_key], embed_key)
    lm_key = _find_key(names, LM_HEAD_SUFFIX, path)
    if lm_key is not None:
        lm_head = _read_tensor(path, weight_map[lm_key], lm_key)
    elif is_tied(config):
        lm_head = embed
    else:
        raise ValueError(f"{path}: no {LM_HEAD_SUFFIX!r} tensor and tie_word_embeddings is not "
                         "true in config.json; the checkpoint is incomplete")
    if lm_head.shape != embed.shape:
        raise ValueError(f"{path}: lm_head {tuple(lm_head.shape)} and embeddings "
                         f"{tuple(embed.shape)} differ in shape")
    return embed, lm_head, config
