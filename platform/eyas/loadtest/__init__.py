"""Load testing OpenAI-compatible endpoints: concurrency sweeps, TTFT/TPOT/ITL, plots.

Public entry: ``run_load_test(LoadTestConfig) -> LoadTestResult`` and ``print_table(result)``.
They are imported lazily, so ``import eyas.loadtest`` pulls in neither Ray nor aiohttp.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "LoadTestConfig": "eyas.loadtest.config",
    "LoadTestResult": "eyas.loadtest.runner",
    "run_load_test": "eyas.loadtest.runner",
    "print_table": "eyas.loadtest.report",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'eyas.loadtest' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
