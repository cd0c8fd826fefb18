"""Builder of the eyas OpenAI-compatible app, for ``import_path: serve_apps.eyas_app:build_app``.

    serve run serve_apps/stories260k_eagle3.yaml        # a YAML in this folder
    serve run serve_apps.eyas_app:build_app model=assets:models/stories260k

The ``args`` are an ``eyas.serve.config.ServeConfig``; see that module for every key.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from eyas.serve.app import build_app as _build_app


def build_app(args: dict[str, Any]) -> Application:
    """Validate ``args`` and return the bound deployment (see ``eyas.serve.app.build_app``)."""
    return _build_app(args)
