"""Re-export a draft directory for another server: the same tensors, that server's config.json.

    python -m eyas.export.convert SRC DEST --for vllm [--target TARGET_DIR]

SRC and DEST are local paths or s3:// / gs:// URIs (e.g. ``<train run.output>/draft``, which
the training job writes for SGLang). Only the aux-layer numbering in config.json differs
between servers (``eyas.export.writer.server_hf_config``). DEST is checked with
``eyas.export.check`` before it is written; exits 1 listing the problems.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from eyas import storage
from eyas.draft.model import DraftConfig
from eyas.export.check import check_draft_dir, print_outcome
from eyas.export.writer import CONFIG_FILE, SERVERS, WEIGHTS_FILE, write_config


def convert_draft(src: str, dest: str, server: str, target_dir: str | None = None) -> list[str]:
    """Write the draft at ``src`` to ``dest`` for ``server``. Returns the problems
    ``check_draft_dir`` finds in the result (against ``target_dir`` when given); ``dest`` is
    written only when there are none."""
    config = DraftConfig.from_hf_config(json.loads(storage.read_bytes(storage.join(src, CONFIG_FILE))))
    with tempfile.TemporaryDirectory(prefix="eyas-convert-") as tmp:
        storage.copy(storage.join(src, WEIGHTS_FILE), str(Path(tmp) / WEIGHTS_FILE))
        write_config(config, tmp, server)
        problems = check_draft_dir(tmp, target_dir)
        if not problems:
            storage.copy(tmp, dest)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eyas.export.convert",
                                     description="Re-export an EAGLE-3 draft directory for a server.")
    parser.add_argument("src", help="exported draft directory (config.json + model.safetensors)")
    parser.add_argument("dest", help="where to write the re-exported directory")
    parser.add_argument("--for", dest="server", choices=SERVERS, default="sglang",
                        help="the server that loads DEST (default sglang)")
    parser.add_argument("--target", default=None, help="target model directory to check sizes against")
    args = parser.parse_args(argv)
    problems = convert_draft(args.src, args.dest, args.server, args.target)
    label = f"{args.dest} (not written)" if problems else args.dest
    return print_outcome(label, problems, f"written for {args.server}")


if __name__ == "__main__":
    sys.exit(main())
