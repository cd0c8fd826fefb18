"""The Ray Serve application: one autoscaled deployment serving the OpenAI-compatible API.

``build_app(args)`` is the builder a ``serve run``/``serve deploy`` YAML references (through
``import_path: eyas.serve.app:build_app``, importable wherever eyas is installed: ``serve
deploy`` ships no code): it validates ``args`` as a ``ServeConfig`` on the driver and returns
the bound deployment with the configured replicas, autoscaling and
``ray_actor_options``. Each replica builds its ``OpenAIServer`` (tokenizer + backend) once and
serves ``routes.build_fastapi_app`` over it; Serve's health check calls the backend's.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from eyas.config import validate_config
from eyas.serve.config import ServeConfig


@serve.deployment
@serve.ingress()
class EyasOpenAIDeployment:
    """A replica: the tokenizer and the engine, loaded once; the FastAPI app over them."""

    def __init__(self, config: dict[str, Any]) -> None:
        from eyas.serve.server import OpenAIServer

        self.server = OpenAIServer(ServeConfig.model_validate(config))

    def __serve_build_asgi_app__(self) -> Any:
        from eyas.serve.routes import build_fastapi_app

        return build_fastapi_app(self.server)

    def check_health(self) -> None:
        """Serve marks the replica unhealthy (and replaces it) when this raises."""
        self.server.backend.check_health()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()


CONTROL_HEADROOM = 64
"""Requests a replica takes beyond its generation requests (running + queued): health checks,
model lists, and bodies still uploading, so that none of these waits behind generation."""


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """``Deployment.options(...)`` for ``cfg.deployment`` (None values left out).

    Serve's per-replica limit is the app's own generation bound (``max_ongoing_requests`` +
    ``max_queued_requests``, enforced by ``server.Admission`` with 503 + Retry-After beyond)
    plus ``CONTROL_HEADROOM``: Serve counts a request from the moment it reaches a replica,
    before its body arrives, and a limit as low as the generation bound let stalled uploads
    lock out ``/health``."""
    dep = cfg.deployment
    actor = {k: v for k, v in dep.ray_actor_options.model_dump().items()
             if v is not None and v != {}}
    serve_limit = dep.max_ongoing_requests + cfg.max_queued_requests + CONTROL_HEADROOM
    opts: dict[str, Any] = {"name": dep.name, "max_ongoing_requests": serve_limit,
                            "ray_actor_options": actor}
    if dep.autoscaling is not None:
        opts["autoscaling_config"] = {k: v for k, v in dep.autoscaling.model_dump().items()
                                      if v is not None}
    else:
        opts["num_replicas"] = dep.num_replicas or 1
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for builder ``args`` (a ``ServeConfig`` as a dict)."""
    cfg = validate_config(ServeConfig, dict(args), source="serve app args")
    deployment = EyasOpenAIDeployment.options(**deployment_options(cfg))
    return deployment.bind(cfg.model_dump(mode="json"))
