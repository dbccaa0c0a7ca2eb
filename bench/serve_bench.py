"""Throughput and latency of the running service: our configuration vs the seed's naive one, same run.

Starts the service itself (a subprocess on loopback) once per configuration and drives it with
concurrent clients. Prints, per model, configuration and concurrency: p50/p95 latency, time to first
token, decode tokens/s, diagrams/min and the service's peak RSS, then the ratios ours / naive.

    python bench/serve_bench.py --model tiny                       # the offline demo model (~2 min)
    python bench/serve_bench.py --model full --concurrency 1,4     # Qwen3-VL-2B dimensions, random weights

"naive" = the seed's configuration: float16, one request at a time, no pixel budget, decoding step run eagerly.
"before" (with --baseline-ref REF) = the service as it was at git REF (e.g. the commit before a change),
started from a temporary worktree with the "ours" settings: an A/B of two versions of the code in one run.
Every request is forced to exactly --new-tokens tokens (FORCE_MAX_NEW_TOKENS) so runs are comparable.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OURS = {"TORCH_DTYPE": "auto", "MAX_IMAGE_TOKENS": "1024"}  # MAX_BATCH_SIZE: the largest concurrency measured
CONFIGS = {
    "ours": OURS,
    # The same with the opt-in int8 weights for decoding (QUANTIZATION=int8).
    "ours-int8": {**OURS, "QUANTIZATION": "int8"},
    "naive": {"TORCH_DTYPE": "float16", "MAX_BATCH_SIZE": "1", "MAX_IMAGE_TOKENS": "16384", "CUDA_GRAPHS": "false"},
}


def diagram(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for lane in range(3):
        top = 20 + lane * (height - 40) // 3
        draw.rectangle((20, top, width - 20, top + (height - 40) // 3 - 10), outline="black", width=2)
        for box in range(4):
            left = 120 + box * (width - 160) // 4
            draw.rectangle((left, top + 30, left + 120, top + 90), outline="blue", width=2)
            draw.text((left + 8, top + 50), f"Step {lane * 4 + box + 1}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Service:
    def __init__(self, model_env: dict[str, str], config_env: dict[str, str], new_tokens: int, log: Path,
                 tree: Path = ROOT):
        self.port = free_port()
        env = {**os.environ, **model_env, **config_env, "HOST": "127.0.0.1", "PORT": str(self.port),
               "DEVICE": os.environ.get("BENCH_DEVICE", "cpu"), "MAX_NEW_TOKENS": str(new_tokens),
               "FORCE_MAX_NEW_TOKENS": "true", "MAX_QUEUE": "64", "REQUEST_TIMEOUT_S": "7200",
               "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "WARNING"}
        self.log = log.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "app"], cwd=tree, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 1800) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}; the end of {self.log.name}:\n"
                                   + self.log_tail())
            try:
                health = httpx.get(f"{self.base}/health", timeout=5)
                if health.status_code == 200:
                    return
                if health.json().get("status") == "failed":  # it stays up answering 503: waiting cannot help
                    raise RuntimeError(f"the model failed to load: {health.json().get('reason')}; the end of "
                                       f"{self.log.name}:\n" + self.log_tail())
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"service never became ready; the end of {self.log.name}:\n" + self.log_tail())

    def log_tail(self, lines: int = 25) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def decode_mode(self) -> str:
        health = httpx.get(f"{self.base}/health", timeout=5).json()
        return f"decode_mode={health.get('decode_mode')} decode_fallback={health.get('decode_fallback')}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# --mixed: a quarter of the requests sample (OpenAI API, temperature), a quarter answer under a JSON schema.
MIXED_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["rows"],
                "properties": {"rows": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["number", "action", "role"],
                    "properties": {"number": {"type": "integer"}, "action": {"type": "string", "maxLength": 60},
                                   "role": {"type": "string", "maxLength": 40}}}}}}


def post_request(base: str, png: bytes, index: int, mixed: bool) -> dict:
    """One diagram; its metadata (/infer's, or a chat completion's details)."""
    if mixed and index % 4 == 1:
        model = httpx.get(f"{base}/v1/models", timeout=60).json()["data"][0]["id"]
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        response = httpx.post(f"{base}/v1/chat/completions", timeout=7200, json={
            "model": model, "temperature": 0.8, "top_p": 0.95, "seed": index,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        response.raise_for_status()
        return response.json()["details"]
    form = {"json_schema": json.dumps(MIXED_SCHEMA)} if mixed and index % 4 == 2 else {}
    response = httpx.post(f"{base}/infer", files={"file": ("d.png", png, "image/png")}, data=form, timeout=7200)
    response.raise_for_status()
    return response.json()["metadata"]


def drive(base: str, png: bytes, concurrency: int, requests: int, mixed: bool = False) -> dict[str, float]:
    latencies: list[float] = []
    ttfts: list[float] = []
    decode_rates: list[float] = []
    decode_times: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        started = time.perf_counter()
        meta = post_request(base, png, index, mixed)
        elapsed = time.perf_counter() - started
        decode_s = meta["generation_time"] - (meta["first_token_time"] or 0)
        with lock:
            tokens.append(meta["completion_tokens"])
            latencies.append(elapsed)
            ttfts.append(meta["queue_time"] + meta["preprocess_time"] + (meta["first_token_time"] or 0))
            decode_times.append(decode_s)
            if meta["completion_tokens"] > 1 and decode_s > 0:
                decode_rates.append((meta["completion_tokens"] - 1) / decode_s)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "ttft_s": statistics.median(ttfts),
        "decode_tok_s": statistics.median(decode_rates) if decode_rates else float("nan"),
        "diagrams_per_min": 60 * requests / wall,
        "tok_s": sum(tokens) / wall,
        "decode_s": statistics.median(decode_times),
    }


def tiny_model_env() -> dict[str, str]:
    from app.demo import ensure_built

    built = ensure_built(Path(tempfile.gettempdir()) / "vlm-bench" / "tiny")
    return {"BASE_MODEL_ID": str(built / "base-model"), "ADAPTER_PATH": str(built / "weights")}


def full_model_env(folder: Path, config: Path | None = None) -> dict[str, str]:
    """Qwen3-VL-2B dimensions (or ``config``'s) with random weights, as bench/gpu_check.py --save-model left
    them in ``folder``; built and saved there (bf16, ~4.3 GB at full size) only when missing."""
    if not (folder / "config.json").is_file():
        import torch
        from random_model import (FULL_SIZE_CONFIG, build_config, build_model, save_for_service,
                                  set_generation_ids, tokenizer_and_processor)

        started = time.perf_counter()
        tokenizer, processor = tokenizer_and_processor()
        device = "cuda" if os.environ.get("BENCH_DEVICE") == "cuda" and torch.cuda.is_available() else "cpu"
        model = build_model(build_config(config or FULL_SIZE_CONFIG, tokenizer), dtype=torch.bfloat16,
                            device=device)
        set_generation_ids(model, tokenizer)
        save_for_service(model, processor, folder)
        del model
        print(f"built and saved the full-size model in {time.perf_counter() - started:.1f} s: {folder}", flush=True)
    else:
        print(f"full-size model: {folder} (saved before, not rebuilt)", flush=True)
    return {"BASE_MODEL_ID": str(folder), "ADAPTER_PATH": str(folder / "no-adapter"), "REQUIRE_ADAPTER": "false"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="requests per client at each concurrency (default: tiny 6, full 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: tiny 64, full 128")
    parser.add_argument("--image", default="1024x768")
    parser.add_argument("--configs", default="ours,naive", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--naive-concurrency", default=None, help="levels for naive (default: --concurrency)")
    parser.add_argument("--baseline-ref", default=None, help="also run the service as of this git ref ('before')")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--mixed", type=int, default=0, metavar="N",
                        help="also, for the ours config: N concurrent clients all greedy against N with a quarter "
                             "sampled and a quarter under a JSON schema, interleaved (3 rounds)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="--model full: the saved model to load (default: where gpu_check.py --save-model "
                             "puts it); built there when missing")
    parser.add_argument("--config", type=Path, default=None,
                        help="--model full: the architecture to build when --model-dir has no model "
                             "(default: Qwen3-VL-2B's)")
    args = parser.parse_args()
    per_client = args.requests_per_client or (6 if args.model == "tiny" else 1)
    new_tokens = args.new_tokens or (64 if args.model == "tiny" else 128)
    width, height = (int(v) for v in args.image.split("x"))
    png = diagram(width, height)
    if args.model == "tiny":
        model_env = tiny_model_env()
    else:
        from random_model import SAVED_FULL_MODEL

        model_env = full_model_env(args.model_dir or SAVED_FULL_MODEL, args.config)
    levels = [int(c) for c in args.concurrency.split(",")]
    naive_levels = [int(c) for c in (args.naive_concurrency or args.concurrency).split(",")]
    ours = {**OURS, "MAX_BATCH_SIZE": str(max(levels))}
    configs = {name: ({**CONFIGS[name], "MAX_BATCH_SIZE": str(max(levels))} if name.startswith("ours")
                      else CONFIGS[name], ROOT, naive_levels if name == "naive" else levels)
               for name in args.configs.split(",")}
    if args.baseline_ref:
        worktree = Path(tempfile.mkdtemp(prefix="vlm-bench-before-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline_ref],
                       check=True, capture_output=True)
        configs = {"before": (ours, worktree, levels), **configs}
    print(f"model={args.model} image={width}x{height} new_tokens={new_tokens} machine={platform.machine()} "
          f"cpus={os.cpu_count()} python={platform.python_version()}", flush=True)
    results: dict[str, dict[int, dict[str, float]]] = {}
    failed: dict[str, str] = {}
    mixed: dict[str, float] = {}
    logs = Path(tempfile.mkdtemp(prefix="vlm-bench-logs-"))
    for name, (config, tree, config_levels) in configs.items():
        service = Service(model_env, config, new_tokens, logs / f"{name}.log", tree)
        try:
            began = time.perf_counter()
            service.wait_ready()
            print(f"  {name:<9} ready in {time.perf_counter() - began:.1f} s, {service.decode_mode()}", flush=True)
            drive(service.base, png, 1, 1)  # warm caches outside the measurement
            results[name] = {}
            for concurrency in config_levels:
                figures = drive(service.base, png, concurrency, concurrency * per_client)
                figures["peak_rss_mb"] = peak_rss_mb(service.process.pid)
                results[name][concurrency] = figures
                print(f"  {name:<9} c={concurrency:<3} " + "  ".join(f"{k}={v:.3f}" for k, v in figures.items()),
                      flush=True)
                if args.json:  # as each figure comes: a run cut short keeps what it measured
                    args.json.write_text(json.dumps({**results, **({"failed": failed} if failed else {})}, indent=2))
            if args.mixed and name == "ours":
                mixed = compare_mixed(service.base, png, args.mixed, args.mixed * per_client)
        except Exception as error:  # noqa: BLE001 - one configuration failing leaves the others to measure
            failed[name] = f"{type(error).__name__}: {error}"
            print(f"  {name:<9} FAILED: {failed[name]}", flush=True)
        finally:
            service.stop()
    if args.baseline_ref:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    columns = ["p50_s", "p95_s", "ttft_s", "decode_tok_s", "diagrams_per_min", "peak_rss_mb"]
    print(f"\n| config | concurrency | {' | '.join(columns)} |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, by_level in results.items():
        for concurrency, figures in by_level.items():
            print(f"| {name} | {concurrency} | " + " | ".join(f"{figures[c]:.3f}" for c in columns) + " |")
    for base in ("naive", "before"):
        for name in [name for name in results if name.startswith("ours") and base in results]:
            print(f"\n| concurrency | throughput {name}/{base} | p50 latency {base}/{name} "
                  f"| p95 latency {base}/{name} |")
            print("|---:|---:|---:|---:|")
            for concurrency in [level for level in levels if level in results[base].keys() & results[name].keys()]:
                mine, theirs = results[name][concurrency], results[base][concurrency]
                print(f"| {concurrency} | {mine['diagrams_per_min'] / theirs['diagrams_per_min']:.2f}x "
                      f"| {theirs['p50_s'] / mine['p50_s']:.2f}x | {theirs['p95_s'] / mine['p95_s']:.2f}x |")
    for name, by_level in results.items():
        top = levels[-1]
        if name.startswith("ours") and 1 in by_level and top in by_level and top != 1:
            print(f"{name}: throughput at concurrency {top} vs its own concurrency 1: "
                  f"{by_level[top]['diagrams_per_min'] / by_level[1]['diagrams_per_min']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({**results, **({"failed": failed} if failed else {}),
                                         **({"mixed": mixed} if mixed else {})}, indent=2))
    return 1 if failed else 0


def compare_mixed(base: str, png: bytes, concurrency: int, requests: int, rounds: int = 3) -> dict:
    """All greedy against mixed, interleaved; tokens/s (grammar answers end when their JSON does)."""
    runs: dict[str, list[float]] = {"greedy": [], "mixed": []}
    for _ in range(rounds):
        for kind in runs:
            runs[kind].append(drive(base, png, concurrency, requests, mixed=kind == "mixed")["tok_s"])
    medians = {kind: statistics.median(values) for kind, values in runs.items()}
    print(f"\n| c={concurrency}, {requests} requests, median of {rounds} | tokens/s |\n|---|---:|\n"
          f"| all greedy | {medians['greedy']:.1f} |\n| 1/4 sampled, 1/4 JSON schema | {medians['mixed']:.1f} |\n"
          f"mixed / all greedy: {medians['mixed'] / medians['greedy']:.2f}x", flush=True)
    return {**medians, "ratio": medians["mixed"] / medians["greedy"]}


if __name__ == "__main__":
    sys.exit(main())
