"""Reading an API key, for the serve apps and the load-test clients alike."""

from __future__ import annotations

import os
from pathlib import Path


def read_api_key(api_key_file: str | None, api_key_env: str | None, owner: str = "") -> str | None:
    """The key from ``api_key_file`` (mounted on the nodes) or from this process's environment
    variable ``api_key_env``; None when neither is named. A named but unreadable, empty or unset
    source is a ValueError prefixed with ``owner`` (e.g. ``"endpoint eagle3: "``). Never pass a
    key through ``runtime_env.env_vars``: Ray writes runtime_env to its logs and dashboard."""
    if api_key_file is not None:
        try:
            key = Path(api_key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(f"{owner}api_key_file={api_key_file!r} cannot be read on this node "
                             f"({exc.strerror}): mount the key file at that path on every node "
                             "that needs it, or remove api_key_file") from None
        if not key:
            raise ValueError(f"{owner}api_key_file={api_key_file!r} is empty: write the key into it")
        return key
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env, "")
    if not key:
        raise ValueError(f"{owner}api_key_env={api_key_env!r} but that variable is not set in this "
                         "process's environment: export it on every node before `ray start` "
                         "(not in runtime_env, which Ray logs in plain text), or use "
                         "api_key_file, or remove api_key_env")
    return key
