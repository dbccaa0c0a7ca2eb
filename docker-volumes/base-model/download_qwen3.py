#!/usr/bin/env python3
"""Pre-download the base model into this folder, in the Hugging Face cache layout the container reads.

Mounting the folder at /root/.cache/huggingface (HF_HOME) then means no download at container start.

    python3 docker-volumes/base-model/download_qwen3.py [--model Qwen/Qwen3-VL-2B-Instruct] [--revision main]

Resumable (run it again after an interruption), shows a progress bar, reads HF_TOKEN.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What serving needs: weights, configs, tokenizer and processor files; not the README or images.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen3-VL-2B-Instruct", help="Hub model id")
    parser.add_argument("--revision", default="main", help="branch, tag or commit")
    parser.add_argument("--cache-dir", type=Path, default=HERE,
                        help="HF_HOME to fill (default: this folder, which the container mounts)")
    args = parser.parse_args(argv)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        print("needs huggingface_hub: pip install huggingface_hub", file=sys.stderr)
        return 2
    hub_cache = args.cache_dir / "hub"  # HF_HOME/hub is where transformers looks
    print(f"downloading {args.model}@{args.revision} into {hub_cache}")
    try:
        path = snapshot_download(
            repo_id=args.model, revision=args.revision, cache_dir=str(hub_cache),
            allow_patterns=ALLOW_PATTERNS, token=os.environ.get("HF_TOKEN") or None,
        )
    except (GatedRepoError, RepositoryNotFoundError) as error:
        print(f"cannot access {args.model}: {error}. Set HF_TOKEN if the model is gated or private.",
              file=sys.stderr)
        return 1
    except OSError as error:  # connection errors subclass OSError (requests/httpx)
        print(f"cannot reach the Hugging Face Hub ({type(error).__name__}: {error}). Check the network or "
              "proxy (HTTPS_PROXY), or copy an existing cache folder here. Re-running resumes.", file=sys.stderr)
        return 1
    print(f"done: {path}\nmount this folder at /root/.cache/huggingface (see README, Docker section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
