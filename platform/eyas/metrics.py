"""Custom Ray metrics (exported to Prometheus and the Ray dashboard) with per-process caching.

Metric names are prefixed ``eyas_`` and documented in the README's dashboard page. Outside a
Ray worker or driver the calls are no-ops, so library code can record unconditionally.
"""

from __future__ import annotations

from functools import cache
from typing import Any


def _ray_ready() -> bool:
    import ray

    return ray.is_initialized()


@cache
def _counter(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys)


@cache
def _gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


@cache
def _histogram(name: str, description: str, boundaries: tuple[float, ...], tag_keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Histogram

    return Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tag_keys)


def inc(name: str, value: float = 1.0, description: str = "", **tags: str) -> None:
    """Add ``value`` to counter ``name`` with ``tags``."""
    if value and _ray_ready():
        _counter(name, description or name, tuple(sorted(tags))).inc(value, tags=tags or None)


def set_gauge(name: str, value: float, description: str = "", **tags: str) -> None:
    """Set gauge ``name`` to ``value``."""
    if _ray_ready():
        _gauge(name, description or name, tuple(sorted(tags))).set(value, tags=tags or None)


def observe(name: str, value: float, boundaries: tuple[float, ...], description: str = "", **tags: str) -> None:
    """Record ``value`` in histogram ``name``."""
    if _ray_ready():
        _histogram(name, description or name, boundaries, tuple(sorted(tags))).observe(value, tags=tags or None)
