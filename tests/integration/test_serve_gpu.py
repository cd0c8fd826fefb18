"""GPU-only serving checks (skipped without CUDA): the eyas engine on ``cuda`` behind Serve,
and a live SGLang EAGLE-3 app when ``sglang`` is installed and
``EYAS_SGLANG_MODEL`` / ``EYAS_SGLANG_DRAFT`` name a target and its EAGLE-3 head."""

from __future__ import annotations

import os

import httpx
import pytest

from conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def chat(url: str, prompt: str, max_tokens: int = 48, stream: bool = False) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json() if not stream else {"raw": r.text}


def test_eyas_engine_on_cuda_eagle3_equals_baseline(serve_port, stories260k, tmp_path) -> None:
    from ray import serve
    from test_serve_app import random_draft_dir

    from eyas.serve.app import build_app

    draft = random_draft_dir(stories260k, tmp_path / "draft")
    common = {"model": str(stories260k), "served_model_name": "m",
              "engine": {"device": "cuda", "dtype": "float32"},
              "deployment": {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.4}}}
    spec = {"speculative": {"draft_path": str(draft), "num_steps": 5, "eagle_topk": 4,
                            "num_draft_tokens": 8}}
    serve.run_many([serve.RunTarget(build_app(common), name="gbase", route_prefix="/gbase"),
                    serve.RunTarget(build_app(common | spec), name="gspec",
                                    route_prefix="/gspec")])
    root = f"http://127.0.0.1:{serve_port}"
    for prompt in ("Once upon a time", "The little dog"):
        base = chat(f"{root}/gbase", prompt)["choices"][0]["message"]["content"]
        got = chat(f"{root}/gspec", prompt)
        assert got["choices"][0]["message"]["content"] == base
        assert got["usage"]["spec_verify_ct"] >= 1


def test_sglang_eagle3_app_reports_spec_verify_ct(serve_port) -> None:
    pytest.importorskip("sglang")
    model, draft = os.environ.get("EYAS_SGLANG_MODEL"), os.environ.get("EYAS_SGLANG_DRAFT")
    if not model or not draft:
        pytest.skip("set EYAS_SGLANG_MODEL and EYAS_SGLANG_DRAFT to a target and its EAGLE-3 head")
    from ray import serve

    from eyas.serve.app import build_app

    args = {"model": model, "served_model_name": "m", "backend": "sglang",
            "sglang": {"mem_fraction_static": 0.6, "context_length": 4096},
            "speculative": {"draft_path": draft, "num_steps": 3, "eagle_topk": 1,
                            "num_draft_tokens": 4},
            "deployment": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}}
    serve.run(build_app(args), name="sgl", route_prefix="/sgl")
    url = f"http://127.0.0.1:{serve_port}/sgl"
    out = chat(url, "Write a haiku about the sea.", max_tokens=64)
    usage = out["usage"]
    assert usage["spec_verify_ct"] >= 1 and usage["spec"]["acceptance_length"] >= 1.0
    streamed = chat(url, "Write a haiku about the sea.", max_tokens=64, stream=True)["raw"]
    assert '"spec_verify_ct"' in streamed and streamed.endswith("data: [DONE]\n\n")
    info = httpx.get(f"{url}/v1/server_info").json()
    assert info["avg_spec_accept_length"] >= 1.0
