"""Our CPU engine against llama.cpp on the same machine, image and model, interleaved in one run.

Everything comes from package registries and is cached under bench/.cache/ (ignored by git):
- llama.cpp: the llama-cpp-python sdist from PyPI vendors it; its tools llama-mtmd-cli, llama-quantize and
  llama-bench are built from those sources with cmake (native CPU flags, no network options);
- the model: Qwen3-VL-2B's dimensions with random weights in Hugging Face form (bench/random_model.py), converted
  by llama.cpp's own convert_hf_to_gguf.py (text model in bf16, and the vision projector with --mmproj), then
  quantized by llama-quantize to Q8_0 and Q4_K_M;
- a 1024x768 PNG diagram (768 image tokens for both engines).

Then, round by round, for each precision pair (llama.cpp Q8_0 / ours int8, Q4_K_M / ours int4, optionally BF16 /
ours bfloat16): llama-mtmd-cli on the PNG and bench/ours_diagram.py on the same PNG, each a process of its own,
each forced to the same number of new tokens. Reported per run: vision encoder s, prefill tok/s (the prompt's
tokens, image included, after the vision encoder), decode tok/s, the diagram's time (vision + prefill + all
decoding steps, model load excluded) and the process's peak RSS; medians over rounds; the ratios.

    python bench/cpu_vs_llamacpp.py                     # 1 round, 300 new tokens, int8 and int4 pairs
    python bench/cpu_vs_llamacpp.py --rounds 3 --pairs Q4_K_M:int4,BF16:none

The converter does not know the tiny demo tokenizer the random model carries (it recognises tokenizers by a hash
of how they split a test text); it is told the tokenizer is Qwen2's, which is what it says for Qwen3-VL's own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
PYTHON = sys.executable
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
TOOLS = ("llama-mtmd-cli", "llama-quantize", "llama-bench")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    # Nothing may be fetched at build or run time: no prebuilt web UI, no HTTPS model downloads.
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
]
# Runs llama.cpp's converter with its tokenizer check answered (see the module's doc).
CONVERT_SHIM = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
for value in list(vars(base).values()):
    if isinstance(value, type) and "get_vocab_base_pre" in vars(value):
        value.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(command: list, **kwargs) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True, **kwargs)


def llama_source() -> Path:
    root = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        sdists = CACHE / "sdist"
        run([PYTHON, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdists])
        with tarfile.open(sdists / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    return root / "vendor" / "llama.cpp"


def build_llama(source: Path) -> Path:
    """The tools, built once (about 8 minutes on 2 cores)."""
    build = source / "build"
    binaries = build / "bin"
    if all((binaries / tool).is_file() for tool in TOOLS):
        return binaries
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"cannot build llama.cpp: {', '.join(missing)} not found (apt-get install cmake g++)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", source, "-B", build, *generator, *CMAKE_FLAGS])
    run(["nice", "-n", "10", "cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *TOOLS])
    return binaries


def converter_path() -> Path:
    """sentencepiece, which the converter imports for Qwen models, in a folder of its own (not the venv)."""
    target = CACHE / "pydeps"
    if not (target / "sentencepiece").is_dir():
        run([PYTHON, "-m", "pip", "install", "--quiet", "--target", target, "sentencepiece"])
    return target


def gguf_files(source: Path, binaries: Path, model_dir: Path) -> dict[str, Path]:
    folder = CACHE / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(converter_path())}
    files = {"BF16": folder / "text-bf16.gguf", "mmproj": folder / "mmproj-f16.gguf"}
    if not files["BF16"].is_file():
        run([PYTHON, "-c", CONVERT_SHIM, source, model_dir, "--outtype", "bf16", "--outfile", files["BF16"]], env=env)
    if not files["mmproj"].is_file():
        run([PYTHON, "-c", CONVERT_SHIM, source, model_dir, "--mmproj", "--outtype", "f16", "--outfile",
             files["mmproj"]], env=env)
    for kind in ("Q8_0", "Q4_K_M"):
        files[kind] = folder / f"text-{kind}.gguf"
        if not files[kind].is_file():
            run([binaries / "llama-quantize", files["BF16"], files[kind], kind, str(os.cpu_count() or 2)])
    return files


def diagram_png(width: int = 1024, height: int = 768) -> Path:
    from PIL import Image, ImageDraw

    path = CACHE / f"diagram-{width}x{height}.png"
    if not path.is_file():
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        for box in range(4):
            left = 40 + box * 240
            draw.rectangle((left, 300, left + 160, 420), outline="black", width=3)
            draw.text((left + 20, 350), f"Step {box + 1}", fill="black")
            if box < 3:
                draw.line((left + 160, 360, left + 240, 360), fill="black", width=3)
        image.save(path)
    return path


def timed_process(command: list) -> tuple[str, int]:
    """Run to the end; (stdout + stderr, peak RSS in MB of that process alone)."""
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{command[0]} failed ({process.returncode}):\n{output[-3000:]}")
    return output, round(usage.ru_maxrss / 1024)


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise ValueError(f"llama-mtmd-cli printed no match for {pattern!r}")
    return float(found.group(1))


def run_llama(binaries: Path, files: dict[str, Path], kind: str, image: Path, args) -> dict:
    output, rss = timed_process([
        binaries / "llama-mtmd-cli", "-m", files[kind], "--mmproj", files["mmproj"], "--image", image,
        "-p", args.prompt, "-n", args.new_tokens, "--ignore-eos", "--temp", "0", "-t", args.threads,
        "-tb", args.threads, "-c", 4096, "-lv", 4])  # -lv 4: the timing lines are INFO
    vision_ms = number(r"mtmd batch encoding done in (\d+) ms", output)
    prompt_ms = number(r"prompt eval time =\s+([\d.]+) ms", output)
    prompt_tokens = number(r"prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens", output)
    eval_ms = number(r"\beval time =\s+([\d.]+) ms", output.split("prompt eval time")[-1])
    runs = number(r"\beval time =\s+[\d.]+ ms /\s+(\d+) runs", output.split("prompt eval time")[-1])
    return {"vision_s": vision_ms / 1000, "prefill_tok_s": prompt_tokens / ((prompt_ms - vision_ms) / 1000),
            "decode_tok_s": runs / (eval_ms / 1000), "diagram_s": (prompt_ms + eval_ms) / 1000, "peak_rss_mb": rss,
            "prompt_tokens": int(prompt_tokens)}


def run_ours(model_dir: Path, quantization: str, image: Path, args) -> dict:
    output, rss = timed_process([PYTHON, HERE / "ours_diagram.py", model_dir, image, "--quantization", quantization,
                                 "--new-tokens", args.new_tokens, "--threads", args.threads, "--prompt", args.prompt,
                                 "--dtype", args.dtype])
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = rss
    return result


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "lscpu not available"
    name = re.search(r"Model name:\s+(.+)", lscpu)
    flags = set(re.search(r"Flags:\s+(.+)", lscpu).group(1).split()) if "Flags:" in lscpu else set()
    relevant = sorted(flag for flag in flags if flag.startswith("amx") or flag in ("avx512_bf16", "avx512f",
                                                                                     "avx512_vnni", "avx2"))
    return f"{name.group(1) if name else 'unknown CPU'}, {os.cpu_count()} CPUs, flags: {' '.join(relevant)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="each pair's two runs, interleaved, this many times")
    parser.add_argument("--pairs", default="Q8_0:int8,Q4_K_M:int4",
                        help="llama.cpp type:our QUANTIZATION, comma-separated (BF16:none for bfloat16)")
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--prompt", default="Extract the table.")
    parser.add_argument("--dtype", default="auto", help="ours: TORCH_DTYPE (auto: what the service picks on this CPU: "
                        "bfloat16 where it is native, else float32)")
    parser.add_argument("--prepare-only", action="store_true", help="build, convert and quantize, then stop")
    args = parser.parse_args()
    pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
    source = llama_source()
    binaries = build_llama(source)
    sys.path.insert(0, str(HERE))
    from random_model import save_full_size

    model_dir = save_full_size(CACHE / "qwen3-vl-2b-random")
    files = gguf_files(source, binaries, model_dir)
    image = diagram_png()
    if args.prepare_only:
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for kind, quantization in pairs:
            runners = [("llama.cpp", kind, lambda: run_llama(binaries, files, kind, image, args)),
                       ("ours", quantization, lambda: run_ours(model_dir, quantization, image, args))]
            for engine, precision, runner in runners[::-1] if round_index % 2 else runners:
                result = runner()
                results.setdefault((engine, precision), []).append(result)
                print(f"round {round_index + 1}: {engine} {precision}: {json.dumps(result)}", flush=True)
    import torch

    print(f"\n{machine()}; {args.threads} threads; torch {torch.__version__}; llama.cpp from llama-cpp-python "
          f"{LLAMA_CPP_PYTHON}; 1024x768 PNG; {args.new_tokens} new tokens; medians of {args.rounds} round(s)")
    keys = ("vision_s", "prefill_tok_s", "decode_tok_s", "diagram_s", "peak_rss_mb")
    median = {key: {field: statistics.median(run[field] for run in runs) for field in keys}
              for key, runs in results.items()}
    print(f"\n| engine | precision | vision s | prefill tok/s | decode tok/s | {args.new_tokens}-token diagram s "
          "| peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (engine, precision), row in median.items():
        if engine == "ours":  # the dtype auto chose with the quantization, e.g. float32+int4-decode
            precision = results[(engine, precision)][0]["precision"]
        print(f"| {engine} | {precision} | {row['vision_s']:.1f} | {row['prefill_tok_s']:.1f} | "
              f"{row['decode_tok_s']:.2f} | {row['diagram_s']:.1f} | {row['peak_rss_mb']:.0f} |")
    print("\n| pair | vision (llama / ours) | prefill (ours / llama) | decode (ours / llama) | diagram (llama / ours) |")
    print("|---|---:|---:|---:|---:|")
    for kind, quantization in pairs:
        theirs, ours = median[("llama.cpp", kind)], median[("ours", quantization)]
        print(f"| {kind} vs {quantization} | {theirs['vision_s'] / ours['vision_s']:.2f}x | "
              f"{ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x | "
              f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | "
              f"{theirs['diagram_s'] / ours['diagram_s']:.2f}x |")


if __name__ == "__main__":
    main()
