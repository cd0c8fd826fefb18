"""Target capture: one batched forward of the target -> per-row aux and final hidden states.

Pure PyTorch + transformers, no Ray and no I/O beyond loading the model. The target loads as
its text stack only (a multimodal checkpoint such as Llama 4 Scout without its vision tower),
spread over all the actor's GPUs when it needs several (``target_load_kwargs``). Layer convention
(see ``eyas.draft.model``): ``aux_layer_ids`` are 0-based decoder-layer OUTPUT indices; in
transformers' ``output_hidden_states`` tuple (index 0 = embeddings) layer ``i``'s output sits
at ``i + 1`` (they are captured with hooks on the layers, not through that tuple). The final
hidden state is ``last_hidden_state``: after the final norm, i.e. the
input of the target's ``lm_head`` (transformers' last ``hidden_states`` entry is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eyas.config import ConfigError
from eyas.draft.model import (
    aux_ids_to_hidden_states_indices,
    default_aux_layer_ids,
    validate_aux_layer_ids,
)


@dataclass(frozen=True)
class TargetInfo:
    """What the features depend on, read from the target's config (no weights loaded)."""

    path: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    aux_layer_ids: list[int]  # layer OUTPUT indices, validated

    @property
    def hidden_states_indices(self) -> list[int]:
        """Indices into ``output_hidden_states`` (= SGLang's "input of layer k" numbering)."""
        return aux_ids_to_hidden_states_indices(self.aux_layer_ids)


def resolve_aux_layer_ids(requested: list[int] | None, num_layers: int) -> list[int]:
    """``features.aux_layer_ids`` (None = EAGLE-3's default) -> three validated layer-output ids."""
    ids = default_aux_layer_ids(num_layers) if requested is None else requested
    try:
        return validate_aux_layer_ids(ids, num_layers)
    except ValueError as exc:
        origin = "the EAGLE-3 default" if requested is None else "features.aux_layer_ids"
        raise ConfigError(f"features.aux_layer_ids ({origin}): {exc}") from None


def target_info(path: str, aux_layer_ids: list[int] | None) -> TargetInfo:
    """Read the target's config.json (local dir or hub id) and resolve the capture layers."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path).get_text_config()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"features.target: cannot read a model config at {path} ({exc}). "
                          "Point features.target at a Hugging Face model directory.") from exc
    num_layers = int(cfg.num_hidden_layers)
    return TargetInfo(path=path, num_layers=num_layers, hidden_size=int(cfg.hidden_size),
                      vocab_size=int(cfg.vocab_size),
                      max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
                      aux_layer_ids=resolve_aux_layer_ids(aux_layer_ids, num_layers))


def target_load_kwargs(config: Any, dtype: str, use_gpu: bool, visible_gpus: int) -> dict[str, Any]:
    """``AutoModelForCausalLM.from_pretrained`` keyword arguments for the target's text stack.

    ``config`` is the checkpoint's config: its ``get_text_config()`` is passed on, so a
    multimodal checkpoint (Llama 4 Scout) loads its language model only, as the text causal
    LM class, which maps the ``language_model.`` weights and skips the vision tower. On GPUs
    ``device_map="auto"`` spreads the layers over every GPU Ray gave the actor
    (``num_gpus_per_actor``): a 70B target (~141 GB in bf16) or Scout (~218 GB) fits no single GPU.
    """
    from eyas.targets import resolve_dtype

    if use_gpu and visible_gpus < 1:
        raise RuntimeError("num_gpus_per_actor > 0 but this actor sees no CUDA device; set "
                           "num_gpus_per_actor=0 to run the target on CPU")
    kwargs: dict[str, Any] = {"config": config.get_text_config(),
                              "dtype": resolve_dtype(dtype, use_gpu)}
    if use_gpu:
        kwargs["device_map"] = "auto"
    return kwargs


def check_placement(device_map: dict[str, Any] | None, path: str, visible_gpus: int) -> None:
    """Refuse a target that ``device_map="auto"`` could not fit on the actor's GPUs: accelerate
    would run the modules it placed on ``cpu`` or ``disk`` from there, silently and slowly."""
    spilled = sorted(name for name, where in (device_map or {}).items() if where in ("cpu", "disk"))
    if spilled:
        raise ConfigError(f"features.target {path}: {len(spilled)} module(s) ({', '.join(spilled[:3])}"
                          f"{', ...' if len(spilled) > 3 else ''}) do not fit on the actor's "
                          f"{visible_gpus} GPU(s) and were placed on cpu/disk; raise "
                          "features.num_gpus_per_actor (70B: 4 x 80 GB, Scout: 8 x 80 GB)")


def text_stack(model: Any) -> Any:
    """The decoder stack of a transformers causal LM (embeddings, layers, final norm; no lm_head,
    so a forward returns ``last_hidden_state`` (B, T, H), never (B, T, V) logits)."""
    stack = getattr(model, "model", None)
    if stack is None or not hasattr(stack, "layers"):
        raise ValueError(f"{type(model).__name__} has no .model decoder stack with .layers; "
                         "features.target must be a decoder-only (or multimodal Llama-style) LM")
    return stack


def load_target(path: str, dtype: str, use_gpu: bool) -> tuple[Any, torch.device]:
    """The target's text decoder stack in eval mode, and the device its inputs go to (the
    embeddings'; with several GPUs the layers after it sit on the others). The causal LM's
    lm_head is freed with the wrapper once this returns."""
    from transformers import AutoConfig, AutoModelForCausalLM

    visible = torch.cuda.device_count() if use_gpu and torch.cuda.is_available() else 0
    kwargs = target_load_kwargs(AutoConfig.from_pretrained(path), dtype, use_gpu, visible)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    check_placement(getattr(model, "hf_device_map", None), path, visible)
    stack = text_stack(model).eval()
    return stack, stack.get_input_embeddings().weight.device


def pad_right(seqs: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> input_ids (B, T) int64 padded with 0, attention_mask (B, T) int64 (1 = real).
    Right padding keeps positions 0..n-1 for every row, as in an unbatched forward."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def decoder_layers(model: Any) -> Any:
    """The decoder layer list of a text stack (``model.layers``)."""
    if not hasattr(model, "layers"):
        raise ValueError(f"{type(model).__name__} has no .layers: pass the text stack that "
                         "load_target returns, not a causal LM or multimodal wrapper")
    return model.layers


@torch.no_grad()
def capture_batch(model: Any, seqs: list[list[int]], hidden_states_indices: list[int],
                  device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """One forward over B sequences -> per row (aux (T_b, 3H), hidden (T_b, H)) in the model dtype,
    on ``device``. aux = the outputs of the three captured layers concatenated low/mid/high.

    Only those three layer outputs are kept, through forward hooks: ``output_hidden_states``
    would hold all N + 1 states alive (11 GB per 8k-token row for an 81-layer 70B target).
    """
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("capture_batch needs at least one sequence and no empty sequence")
    layers = decoder_layers(model)
    if max(hidden_states_indices) > len(layers) or min(hidden_states_indices) < 1:
        raise ValueError(f"hidden_states indices {hidden_states_indices} outside the target's "
                         f"{len(layers)} layers")
    captured: dict[int, Tensor] = {}

    def keep(index: int) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layers[i - 1].register_forward_hook(keep(i)) for i in set(hidden_states_indices)]
    try:
        ids, mask = pad_right(seqs, device)  # (B, T), (B, T)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # a target spread over several GPUs leaves each layer's output on that layer's GPU
    aux = torch.cat([captured[i].to(device) for i in hidden_states_indices], dim=-1)  # (B, T, 3H)
    hidden = out.last_hidden_state.to(device)  # (B, T, H), after the final norm
    return [(aux[b, : len(s)], hidden[b, : len(s)]) for b, s in enumerate(seqs)]
