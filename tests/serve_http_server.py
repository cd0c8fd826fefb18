"""The eyas OpenAI app (``eyas.serve.routes.build_fastapi_app``) over a real stories260k engine,
served by uvicorn in its own process on 127.0.0.1: what the fuzz and stall tests attack.

Run: ``python tests/serve_http_server.py --model DIR [--config JSON]``; it prints ``PORT <n>``
once listening. ``--config`` is a JSON object of ``ServeConfig`` fields merged over the
defaults here. ``EyasHTTPServer`` starts it as a subprocess (a crash is seen as a dead pid).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from typing import Any

from schedule_server import stop_process

DEFAULTS: dict[str, Any] = {"served_model_name": "stories260k", "default_max_tokens": 8,
                            "max_tokens_limit": 64, "engine": {"max_batch_size": 4}}


async def serve(model: str, overrides: dict[str, Any]) -> None:
    import uvicorn

    from eyas.runtime import use_torch_threads
    from eyas.serve.config import ServeConfig
    from eyas.serve.routes import build_fastapi_app
    from eyas.serve.server import OpenAIServer

    use_torch_threads(1)
    server = OpenAIServer(ServeConfig.model_validate({"model": model, **DEFAULTS, **overrides}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(build_fastapi_app(server), log_level="warning", access_log=False)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


class EyasHTTPServer:
    """The server above as a subprocess; ``url``, ``pid``, ``alive``, ``close``."""

    def __init__(self, model: str, timeout_s: float = 90.0, **overrides: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--model", model, "--config", json.dumps(overrides)],
            stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if line.startswith("PORT "):
                self.url = f"http://127.0.0.1:{int(line.split()[1])}"
                self._wait_healthy(deadline)
                return
            if self.proc.poll() is not None:
                break
        self.close()
        raise RuntimeError("serve_http_server did not start; run tests/serve_http_server.py by hand")

    def _wait_healthy(self, deadline: float) -> None:
        import httpx

        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("serve_http_server never answered /health")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        stop_process(self.proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="{}")
    args = parser.parse_args()
    asyncio.run(serve(args.model, json.loads(args.config)))


if __name__ == "__main__":
    main()
