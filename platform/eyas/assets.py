"""Finding local models and datasets named in configs.

A config value ``assets:models/stories260k`` points into the shared asset folder
(``$EYAS_ASSETS``, else ``../shared/assets`` beside the repository, beside ``$EYAS_HOME`` or
beside the current directory). Any other value is a local path, a storage URI, or a Hugging Face
id (which works only where a hub is reachable). Under ``ray job submit --working-dir`` the job
runs in Ray's copy of the checkout, so ``../shared/assets`` is found through ``$EYAS_HOME`` (the
checkout, passed in the job's runtime_env) and a relative path that exists there resolves to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from eyas.config import ConfigError

ASSETS_PREFIX = "assets:"
ASSETS_ENV = "EYAS_ASSETS"
HOME_ENV = "EYAS_HOME"  # = eyas.storage.HOME_ENV (not imported: storage pulls in pyarrow)
REPO_ROOT = Path(__file__).resolve().parents[2]


def assets_root() -> Path | None:
    """The shared asset folder, or None when it is absent on this machine."""
    for cand in asset_candidates():
        if Path(cand).is_dir():
            return Path(cand).resolve()
    return None


def asset_candidates() -> list[Path]:
    """Where the shared asset folder is looked for, in order."""
    out = [Path(os.environ[ASSETS_ENV]).expanduser()] if os.environ.get(ASSETS_ENV) else []
    if os.environ.get(HOME_ENV):
        out.append(Path(os.environ[HOME_ENV]).expanduser().parent / "shared" / "assets")
    return out + [REPO_ROOT.parent / "shared" / "assets", Path.cwd().parent / "shared" / "assets"]


def home_relative(value: str) -> str:
    """A relative local path that exists under ``$EYAS_HOME`` as an absolute path there (a job
    submitted with ``--working-dir`` runs elsewhere); any other value unchanged."""
    home = os.environ.get(HOME_ENV)
    if not home or "://" in value or not value or Path(value).expanduser().is_absolute():
        return value
    cand = Path(home).expanduser() / value
    return str(cand) if cand.exists() else value


def resolve_asset(value: str, key: str) -> str:
    """Turn a config value into a usable path/URI/id; ``key`` names the config key in errors."""
    if not value.startswith(ASSETS_PREFIX):
        return home_relative(value)
    root = assets_root()
    rel = value[len(ASSETS_PREFIX):].lstrip("/")
    if root is None:
        looked = ", ".join(str(c) for c in asset_candidates())
        raise ConfigError(
            f"{key}={value!r}: the shared asset folder was not found (looked in {looked}): set "
            f"{ASSETS_ENV}=/abs/path/shared/assets, or {HOME_ENV}=<checkout> for a job submitted with "
            f"--working-dir (README: Running jobs), or point {key} at a local model or dataset path."
        )
    return str(root / rel)


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` with no scheme and no such local path: a Hugging Face hub id."""
    return "://" not in value and value.count("/") == 1 and not Path(value).exists() and not value.startswith((".", "/"))
