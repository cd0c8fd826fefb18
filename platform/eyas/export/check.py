"""Check an exported draft directory before anything serves it.

    python -m eyas.export.check DIR [--target TARGET_DIR]

Prints every problem (missing / unexpected keys, shapes, dtypes, d2t / t2d consistency,
config fields, and sizes against the target's config.json when given) and exits 1; exits 0
when the directory is a loadable EAGLE-3 draft.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from eyas.draft.model import (
    ARCHITECTURE,
    DTYPES,
    NUM_AUX_LAYERS,
    DraftConfig,
    expected_tensor_shapes,
    text_config,
    validate_aux_layer_ids,
)
from eyas.draft.vocab import check_vocab_mapping
from eyas.export.writer import VLLM_AUX_KEY, vllm_aux_layer_ids

REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                   "rms_norm_eps", "max_position_embeddings", "vocab_size", "draft_vocab_size",
                   "torch_dtype")


def check_config_fields(cfg: dict[str, Any]) -> list[str]:
    """Problems with the fixed fields of a draft config.json."""
    problems = [f"config.json: missing {key!r}" for key in REQUIRED_FIELDS if cfg.get(key) is None]
    if cfg.get("architectures") != [ARCHITECTURE]:
        problems.append(f"config.json: architectures={cfg.get('architectures')!r}; expected "
                        f"[{ARCHITECTURE!r}] (servers pick the EAGLE-3 loader by it)")
    if cfg.get("num_hidden_layers") != 1:
        problems.append(f"config.json: num_hidden_layers={cfg.get('num_hidden_layers')!r}; "
                        "expected 1")
    if cfg.get("tie_word_embeddings") is not False:
        problems.append(f"config.json: tie_word_embeddings={cfg.get('tie_word_embeddings')!r}; "
                        "expected false (the draft lm_head is its own)")
    if cfg.get("torch_dtype") is not None and cfg["torch_dtype"] not in DTYPES:
        problems.append(f"config.json: torch_dtype={cfg['torch_dtype']!r}; use one of {sorted(DTYPES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"config.json: hidden_act={cfg['hidden_act']!r}; the head uses silu")
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is not None and (len(ids) != NUM_AUX_LAYERS or len(set(ids)) != len(ids)):
        problems.append(f"config.json: eagle_aux_hidden_state_layer_ids={ids}; need "
                        f"{NUM_AUX_LAYERS} distinct layers")
    return problems + check_vllm_aux_ids(cfg)


def check_vllm_aux_ids(cfg: dict[str, Any]) -> list[str]:
    """A top-level ``eagle_aux_hidden_state_layer_ids`` (vLLM's numbering, written by
    ``--for vllm``) must be ``eagle_config``'s OUTPUT indices + 1, so that vLLM, SGLang and the
    eyas reader capture the layers the head was trained on."""
    top = cfg.get(VLLM_AUX_KEY)
    if top is None:
        return []
    nested = (cfg.get("eagle_config") or {}).get(VLLM_AUX_KEY)
    if nested is None:
        return [f"config.json: top-level {VLLM_AUX_KEY}={top} (vLLM's numbering) but no "
                f"eagle_config.{VLLM_AUX_KEY}: SGLang and eyas would capture their default "
                "layers; re-export with `python -m eyas.export.convert`"]
    want = vllm_aux_layer_ids([int(i) for i in nested])
    if [int(i) for i in top] != want:
        return [f"config.json: top-level {VLLM_AUX_KEY}={top}; vLLM needs {want} (eagle_config's "
                f"layer outputs {nested} + 1), or it captures other layers than the head was "
                "trained on"]
    return []


def check_tensors(weights: Path, config: DraftConfig) -> list[str]:
    """Problems with the tensors of ``weights`` against ``config``: keys, shapes, dtypes,
    finiteness and the vocab mapping."""
    from safetensors import SafetensorError, safe_open

    expected = expected_tensor_shapes(config)
    float_dtype = DTYPES[config.torch_dtype]
    problems: list[str] = []
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        return [f"{weights.name}: cannot be read ({exc}); re-export the draft"]
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"{weights.name}: missing key {name!r}")
    for name in sorted(set(tensors) - set(expected)):
        why = " (the server injects the target's embeddings)" if "embed_tokens" in name else ""
        problems.append(f"{weights.name}: unexpected key {name!r}{why}")
    for name in sorted(set(tensors) & set(expected)):
        tensor, shape = tensors[name], expected[name]
        if tuple(tensor.shape) != shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)}; expected {shape} from config.json")
        want = {"d2t": torch.int64, "t2d": torch.bool}.get(name, float_dtype)
        if tensor.dtype != want:
            problems.append(f"{name}: dtype {tensor.dtype}; expected {want}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name}: contains NaN or Inf values")
    if "d2t" in tensors and "t2d" in tensors:
        problems += [f"vocab mapping: {p}" for p in check_vocab_mapping(tensors["d2t"], tensors["t2d"])]
    return problems


def _stored_shape(weights: Path, name: str) -> tuple[int, ...] | None:
    """Shape of one stored tensor without loading it; None when absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape()) if name in f.keys() else None  # noqa: SIM118
    except (SafetensorError, OSError):
        return None


def check_against_target(config: DraftConfig, weights: Path, target_dir: Path) -> list[str]:
    """Problems of the draft's sizes against the target's config.json."""
    path = target_dir / "config.json"
    if not path.is_file():
        return [f"target: {path} not found; pass the target's Hugging Face model directory"]
    tc = text_config(json.loads(path.read_text()))
    problems = []
    pairs = [("vocab_size", config.vocab_size, tc.get("vocab_size")),
             ("hidden_size", config.hidden_size, tc.get("hidden_size")),
             ("target_hidden_size", config.target_hidden_size, tc.get("hidden_size"))]
    for name, mine, theirs in pairs:
        if mine != theirs:
            problems.append(f"target: draft {name}={mine} but the target has {theirs}")
    fc_shape = _stored_shape(weights, "fc.weight")
    fc_in = NUM_AUX_LAYERS * int(tc.get("hidden_size") or 0)
    if fc_shape is not None and fc_shape[-1] != fc_in:
        problems.append(f"target: fc.weight takes {fc_shape[-1]} inputs but 3 * the target's "
                        f"hidden_size is {fc_in}")
    if config.aux_layer_ids is not None and tc.get("num_hidden_layers"):
        try:
            validate_aux_layer_ids(config.aux_layer_ids, int(tc["num_hidden_layers"]))
        except ValueError as exc:
            problems.append(f"target: {exc}")
    return problems


def check_draft_dir(directory: str | Path, target_dir: str | Path | None = None) -> list[str]:
    """Every problem found in an exported draft directory (empty list = OK)."""
    path = Path(directory)
    cfg_path, weights = path / "config.json", path / "model.safetensors"
    missing = [f"{f.name}: not found in {path}" for f in (cfg_path, weights) if not f.is_file()]
    if not cfg_path.is_file():
        return missing
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        return missing + [f"config.json: not valid JSON ({exc})"]
    problems = missing + check_config_fields(cfg)
    try:
        config = DraftConfig.from_hf_config(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        return problems + [f"config.json: {exc}"]
    if weights.is_file():
        problems += check_tensors(weights, config)
    if target_dir is not None:
        problems += check_against_target(config, weights, Path(target_dir))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eyas.export.check",
                                     description="Check an exported EAGLE-3 draft directory.")
    parser.add_argument("directory", help="draft directory (config.json + model.safetensors)")
    parser.add_argument("--target", default=None, help="target model directory to compare sizes")
    args = parser.parse_args(argv)
    return print_outcome(args.directory, check_draft_dir(args.directory, args.target), "OK")


def print_outcome(directory: str, problems: list[str], ok: str) -> int:
    """Print a directory's problems (or ``ok``); the exit status: 1 when there are problems."""
    if problems:
        print(f"{directory}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"{directory}: {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
