"""One diagram through our engine, timed phase by phase, as the service runs it; prints one JSON line.

Loads a saved model folder with the service's own loader (TORCH_DTYPE, auto by default, and QUANTIZATION as given;
no adapter),
chooses the decoding path with the service's startup check (not timed), then: the vision encoder, the rest of
the prefill, and ``--new-tokens`` decoding steps forced past any end token. bench/cpu_vs_llamacpp.py runs it once
per precision, in a process of its own so that its peak RSS is its own.

    python bench/ours_diagram.py MODEL_DIR IMAGE.png --quantization int4 --new-tokens 300
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from app.model.device import resolve_placement  # noqa: E402
from app.model.engine import Engine, EngineLimits, ServingDefaults  # noqa: E402
from app.model.loader import load_model  # noqa: E402
from app.model.sequence import Sequence  # noqa: E402
from app.settings import Settings, TorchDType  # noqa: E402


class Stopwatch:
    """Seconds spent inside a module's forward (hooks: the vision encoder runs inside the model's forward)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._started = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "_started", time.perf_counter()))
        module.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter()
                                                          - self._started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("image")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--dtype", default="auto", choices=[dtype.value for dtype in TorchDType],
                        help="TORCH_DTYPE; auto: what the service picks on this CPU (bfloat16 only where native)")
    parser.add_argument("--prompt", default="Extract the table.")
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default: the service's)")
    parser.add_argument("--profile", type=int, default=0, help="print a torch.profiler table of this many steps")
    parser.add_argument("--threads", type=int, default=None, help="default: what the service would use")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.group_size:
        from app.model import int4

        int4.GROUP_SIZE = args.group_size
    settings = Settings(base_model_id=args.model_dir, adapter_path=Path(args.model_dir) / "no-adapter",
                        require_adapter=False, device="cpu", torch_dtype=args.dtype, quantization=args.quantization)
    started = time.perf_counter()
    loaded = load_model(settings, resolve_placement(settings.device, settings.torch_dtype))
    engine = Engine(loaded, ServingDefaults(args.prompt, args.new_tokens, 1024), repetition_guard=None,
                    force_max_new_tokens=True, limits=EngineLimits(max_rows=1, max_prompt_tokens=256))
    engine.choose_decode_path()
    load_s = time.perf_counter() - started
    vision = Stopwatch(engine.model.model.visual)
    inputs = engine.prepare(Image.open(args.image).convert("RGB"), args.prompt)
    sequence = Sequence(inputs, args.new_tokens)
    started = time.perf_counter()
    engine.prefill([sequence])
    prefill_s = time.perf_counter() - started
    steps = []
    for _ in range(args.new_tokens - 1):  # the prefill gave the first token
        step_started = time.perf_counter()
        engine.decode([sequence])
        steps.append(time.perf_counter() - step_started)
    diagram_s = prefill_s + sum(steps)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(args.profile):
                engine._step.positions[0] -= 1  # stay inside the slot
                engine._run_step(1, sequence.position)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as status:  # once serving: the load's transient copies are gone
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    print(json.dumps({
        "precision": loaded.placement.dtype_name, "decode_mode": engine.decode_mode, "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2), "image_tokens": inputs.image_tokens, "prompt_tokens": inputs.prompt_tokens,
        "vision_s": round(vision.seconds, 3), "prefill_s": round(prefill_s - vision.seconds, 3),
        "prefill_tok_s": round(inputs.prompt_tokens / (prefill_s - vision.seconds), 2),
        "decode_tok_s": round(len(steps) / sum(steps), 3), "diagram_s": round(diagram_s, 2),
        "new_tokens": args.new_tokens, "peak_rss_mb": round(peak_kb / 1024),
        "rss_mb": round(rss_kb / 1024)}))


if __name__ == "__main__":
    main()
