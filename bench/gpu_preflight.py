"""Before the GPU check spends its minutes: what runs here, and can the service and the benches import?

Prints the versions that decide the figures (Python, torch, CUDA, cuDNN, transformers, tokenizers, ...), where
each package came from (the carried wheels or the machine), and on CUDA which SDPA backend torch would pick for
the decode attention call, left to itself and with the backends the service pins. Then it imports what the
service and the benches import and builds the processor (Qwen3VLVideoProcessor needs torchvision). The first
failure ends it with one line that starts with "PREFLIGHT FAILED", its traceback above it.

    python bench/gpu_preflight.py --device cuda --site /tmp/site   (bench/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import re
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (import name, distribution name): the packages whose versions matter to the figures or to importing.
PACKAGES = [("torch", "torch"), ("torchvision", "torchvision"), ("transformers", "transformers"),
            ("tokenizers", "tokenizers"), ("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors"),
            ("accelerate", "accelerate"), ("peft", "peft"), ("numpy", "numpy"), ("PIL", "pillow"),
            ("fastapi", "fastapi"), ("starlette", "starlette"), ("pydantic", "pydantic"),
            ("typing_extensions", "typing-extensions"), ("uvicorn", "uvicorn"), ("httpx", "httpx"),
            ("prometheus_client", "prometheus-client")]
# What the service (python -m app), bench/gpu_check.py and bench/serve_bench.py import.
IMPORTS = ["app.settings", "app.http.app", "app.http.server", "app.service.inference", "app.model.engine",
           "app.model.decode_paths", "app.model.loader", "app.demo", "uvicorn.protocols.http.httptools_impl",
           "multipart", "pypdfium2", "resvg_py", "defusedxml.ElementTree", "fastapi_swagger", "httpx",
           "xgrammar"]  # imported at the first response_format request, not at start: checked here


class PreflightError(Exception):
    pass


def step(what: str, action):
    try:
        return action()
    except Exception as error:  # noqa: BLE001 - any failure here is the one line the run stops on
        traceback.print_exc()
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PreflightError(f"{what}: {type(error).__name__}: {first}") from error


def origin(module, site: Path | None) -> str:
    path = Path(getattr(module, "__file__", "") or "")
    if site is not None and site in path.parents:
        return "carried"
    return "machine" if path.parts else "built-in"


def report_versions(site: Path | None) -> None:
    print(f"python {platform.python_version()} ({sys.executable})")
    for name, distribution in PACKAGES:
        module = step(f"import {name}", lambda name=name: importlib.import_module(name))
        version = getattr(module, "__version__", None) or importlib.metadata.version(distribution)
        print(f"{distribution:<18} {version:<24} {origin(module, site)}")
    if site is not None:
        carried = {path.name.split("-")[0].lower().replace("_", "-") for path in site.glob("*.dist-info")}
        for name, distribution in PACKAGES:
            module = sys.modules[name]
            if distribution in carried and origin(module, site) != "carried":
                raise PreflightError(f"{distribution} is carried but {module.__file__} was imported: the machine's "
                                     "copy shadows it (PYTHONPATH?)")


def report_device(device: str) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    from app.model.attention import flash_available, pinned_sdpa

    print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"CUDA available: {torch.cuda.is_available()}")
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    print(f"aten._flash_attention_forward with seqused_k: {op is not None and 'seqused_k' in str(op.default._schema)}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError("BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        print(f"device {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2 ** 30:.0f} GiB")
    # The decode call of the sdpa paths at the default 2,432-token slot: bf16 query [rows, kv_heads, 2, dim]
    # (the two query heads sharing a KV head), strided K/V views of the slot cache, a bool mask that broadcasts.
    query = torch.randn(4, 8, 2, 128, device=device, dtype=torch.bfloat16)
    keys = torch.randn(4, 2432, 8, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    mask = torch.ones(4, 1, 1, 2432, dtype=torch.bool, device=device)

    def choice() -> str:
        picked = torch._fused_sdp_choice(query, keys, keys, mask)
        return f"{SDPBackend(picked).name} ({picked})"

    def pinned() -> str:
        with pinned_sdpa():
            return choice()

    print(f"SDPA backend for the decode call on {device}: left to torch {step('SDPA choice', choice)}; pinned as "
          f"the service runs it {step('SDPA choice under pinned_sdpa()', pinned)}")
    print(f"flash decode path: {flash_available(torch.device(device), torch.bfloat16) or 'can be tried'}")


def check_imports() -> None:
    for name in IMPORTS:
        step(f"import {name}", lambda name=name: importlib.import_module(name))
    # The engine is written against requirements.txt's transformers (engine.py, decode_step.py): under 5.17, for
    # one, the Qwen3-VL rotary embedding wants position ids of another shape and the engine fails as it starts.
    import transformers

    pinned = re.search(r"^transformers==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    if pinned and transformers.__version__ != pinned.group(1):
        raise PreflightError(f"transformers {transformers.__version__} ({transformers.__file__}) is imported; the "
                             f"engine is written against {pinned.group(1)} (requirements.txt): carry its wheels")
    from random_model import tokenizer_and_processor

    step("build the tokenizer and processor (random_model.tokenizer_and_processor)", tokenizer_and_processor)
    print(f"imports: {len(IMPORTS)} modules, the processor built")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--site", type=Path, default=None, help="where the carried wheels were installed")
    args = parser.parse_args()
    site = args.site.resolve() if args.site and args.site.is_dir() else None
    try:
        report_versions(site)
        report_device(args.device)
        check_imports()
    except PreflightError as error:
        print(f"PREFLIGHT FAILED: {error}", flush=True)
        return 1
    print("preflight passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
