"""The decoding step captured once per batch bucket as a CUDA graph, then replayed.

An eager step of a 2B model is hundreds of small kernel launches, each paid for in Python; a replay is one
launch. Rows are padded up to the next bucket (1, 2, 4, 8, ... up to the slot count); padding rows compute on
idle slots, read one key, never advance and are ignored. All graphs share one memory pool, captured largest
first so the smaller ones reuse it.

``BucketedStep`` runs the step exactly as the graphs do (full bucket, whole slot, warm-up garbage left in idle
slots) but eagerly, on any device: what the tests use to check the graph semantics on the CPU.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from app.model.decode_step import DecodeStep

logger = logging.getLogger(__name__)

WARMUP_RUNS = 2  # before capture, on a side stream: cuBLAS workspaces and allocator pools get created


def batch_buckets(max_rows: int) -> list[int]:
    """Powers of two below ``max_rows``, and ``max_rows`` itself."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return buckets + [max_rows]


class BucketedStep:
    """Same contract as DecodeStep.run: the step over the whole padded bucket and the whole slot."""

    def __init__(self, step: DecodeStep, max_rows: int):
        self.step = step
        self.buckets = batch_buckets(max_rows)
        self.capture_s: float | None = None

    def bucket(self, rows: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, rows)]

    def warm_up(self) -> None:
        for rows in self.buckets:
            for _ in range(WARMUP_RUNS):
                self.step.set_active(rows)
                self.step(rows)

    def capture(self) -> None:
        started = time.perf_counter()
        self.warm_up()
        self.step.reset()  # the warm-up runs advanced positions and wrote tokens; the cache keeps their garbage
        self.capture_s = time.perf_counter() - started

    def replay(self, bucket: int) -> None:
        self.step(bucket)

    def __call__(self, rows: int, kv_tokens: int | None = None) -> torch.Tensor:
        self.step.set_active(rows)
        self.replay(self.bucket(rows))
        return self.step.tokens[:rows]


class GraphedDecodeStep(BucketedStep):
    """Replays a captured graph per bucket instead of running the step's kernels one by one."""

    def __init__(self, step: DecodeStep, max_rows: int):
        super().__init__(step, max_rows)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def capture(self) -> None:
        started = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.warm_up()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.step(rows)
            self.graphs[rows] = graph
        torch.cuda.synchronize()
        self.step.reset()
        self.capture_s = time.perf_counter() - started
        logger.info("captured the %s decoding step as %d CUDA graphs (batch buckets %s) in %.1f s",
                    self.step.name, len(self.graphs), self.buckets, self.capture_s)

    def replay(self, bucket: int) -> None:
        self.graphs[bucket].replay()

    def release(self) -> None:
        """Drop the graphs and their memory pool (a path that failed its check)."""
        self.graphs.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
