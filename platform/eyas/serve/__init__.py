"""Serving: an OpenAI-compatible Ray Serve app over the eyas engine (CPU/GPU) or SGLang (GPU).

- ``config``: ``ServeConfig``, the builder args (model, backend, EAGLE-3, limits, auth, scaling).
- ``api``: request/response models, OpenAI-style errors, the SSE format, the usage extension.
- ``backends``: the small backend interface and its two implementations.
- ``server``: request handling without Ray; ``routes``: the FastAPI app over it.
- ``app``: the Serve deployment and ``build_app`` (referenced from ``serve_apps/*.yaml``).

Nothing heavy (torch, ray, sglang) is imported by ``import eyas.serve``.
"""
