"""Typed job configuration: pydantic models loaded from YAML plus dotted CLI overrides.

Every job config is a tree of ``StrictModel`` subclasses (unknown keys are errors). A job is
started as ``python jobs/<job>.py --config jobs/configs/<x>.yaml data.pii.policy=redact ...``;
overrides are merged into the YAML tree and the whole tree is validated again, so a wrong key
or type fails with its dotted path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are rejected, fields are validated."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


M = TypeVar("M", bound=StrictModel)


class RunConfig(StrictModel):
    """Where and how a job runs (the ``run:`` section of every job config)."""

    ray_address: str | None = None  # None: a running cluster if there is one, else a local Ray
    num_cpus: int | None = None  # only for a local Ray started by the job
    # the stage's artifact URI (local path, s3://, gs://); a relative path is relative to
    # $EYAS_HOME, else the current directory (refused inside Ray's working_dir copy: eyas.storage)
    output: str
    force: bool = False  # rerun even when a finished artifact with the same config exists


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (``3``, ``true``, ``[1,2]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``key.sub=value`` override set (intermediate dicts created)."""
    out = json.loads(json.dumps(tree))  # deep copy of plain YAML data
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key path."""
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {key}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err and err["type"] != "extra_forbidden" else ""))
    return "\n".join(lines)


def validate_config(cls: type[M], tree: dict[str, Any], source: str = "config") -> M:
    """Validate a plain dict against ``cls``; raise ``ConfigError`` naming each bad key."""
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(cls: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Load ``path`` (or defaults when None), apply dotted overrides, validate as ``cls``."""
    tree = read_yaml(path) if path else {}
    tree = apply_overrides(tree, overrides or [])
    return validate_config(cls, tree, source=str(path or "defaults") + (" + overrides" if overrides else ""))


def config_hash(cfg: BaseModel) -> str:
    """Stable short hash of a config's content (used to recognise a finished artifact)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (``--show-config``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def job_argparser(description: str, default_config: str | None) -> argparse.ArgumentParser:
    """The command line every job shares: ``--config FILE`` then ``key.sub=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.pii.policy=redact")
    parser.add_argument("--show-config", action="store_true",
                        help="print the whole resolved config at start (it is always stored in "
                             "each stage's manifest)")
    return parser


def parse_job_args(cls: type[M], description: str, default_config: str | None, argv: list[str] | None = None) -> M:
    """Parse a job's command line into a validated config; print one line naming it (the whole
    resolved config with ``--show-config``)."""
    args = job_argparser(description, default_config).parse_args(argv)
    cfg = load_config(cls, args.config, args.overrides)
    overrides = f", overrides: {' '.join(args.overrides)}" if args.overrides else ""
    print(f"# config {args.config} (hash {config_hash(cfg)}{overrides}); the resolved config is in "
          "each stage's manifest (--show-config prints it)", flush=True)
    if args.show_config:
        print(to_yaml(cfg), flush=True)
    return cfg
