"""Finding local models and datasets named in configs.

A config value ``assets:models/stories260k`` points into the shared asset folder
(``$EYAS_ASSETS``, else ``../shared/assets`` beside the repository). Any other value is a
local path, a storage URI, or a Hugging Face id (which works only where a hub is reachable).
"""

from __future__ import annotations

import os
from pathlib import Path

from eyas.config import ConfigError

ASSETS_PREFIX = "assets:"
REPO_ROOT = Path(__file__).resolve().parents[2]


def assets_root() -> Path | None:
    """The shared asset folder, or None when it is absent on this machine."""
    candidates = [os.environ.get("EYAS_ASSETS"), REPO_ROOT.parent / "shared" / "assets",
                  Path.cwd().parent / "shared" / "assets"]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            return Path(cand).resolve()
    return None


def resolve_asset(value: str, key: str) -> str:
    """Turn a config value into a usable path/URI/id; ``key`` names the config key in errors."""
    if not value.startswith(ASSETS_PREFIX):
        return value
    root = assets_root()
    rel = value[len(ASSETS_PREFIX):].lstrip("/")
    if root is None:
        raise ConfigError(
            f"{key}={value!r}: the shared asset folder was not found (set EYAS_ASSETS or place "
            f"it at {REPO_ROOT.parent / 'shared' / 'assets'}). Point {key} at a local model or "
            f"dataset path (or a Hugging Face id where a hub is reachable)."
        )
    return str(root / rel)


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` with no scheme and no such local path: a Hugging Face hub id."""
    return "://" not in value and value.count("/") == 1 and not Path(value).exists() and not value.startswith((".", "/"))
