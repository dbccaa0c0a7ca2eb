"""The decoding step captured once per batch bucket as a CUDA graph, then replayed.

An eager step of a 2B model is ~600 small kernel launches, each paid for in Python; a replay is one launch.
Rows are padded up to the next bucket (1, 2, 4, 8, ... up to the slot count); padding rows compute on idle
slots and are ignored. All graphs share one memory pool, captured largest first so the smaller ones reuse it.
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


class GraphedDecodeStep:
    """Same contract as DecodeStep.__call__, replaying a captured graph instead of running the modules."""

    def __init__(self, step: DecodeStep, max_rows: int):
        self.step = step
        self.buckets = batch_buckets(max_rows)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s: float | None = None

    def capture(self) -> None:
        started = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for rows in self.buckets:
                for _ in range(WARMUP_RUNS):
                    self.step(rows)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.step(rows)
            self.graphs[rows] = graph
        torch.cuda.synchronize()
        self.step.reset()  # the warm-up runs advanced positions and wrote tokens
        self.capture_s = time.perf_counter() - started
        logger.info("captured the decoding step as %d CUDA graphs (batch buckets %s) in %.1f s",
                    len(self.graphs), self.buckets, self.capture_s)

    def __call__(self, rows: int, kv_tokens: int | None = None) -> torch.Tensor:
        bucket = self.buckets[bisect.bisect_left(self.buckets, rows)]
        self.graphs[bucket].replay()
        return self.step.tokens[:rows]
