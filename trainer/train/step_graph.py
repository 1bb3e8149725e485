"""The whole training step as one CUDA graph per batch shape (``train.cuda_graphs: "step"``).

Why: with the network alone replayed as graphs (trainer/model/cuda_graphs.py) the host still launches the loss
arithmetic, the clipping, the optimizer, the EMA and DeepSpeed's Python around them, hundreds of operator calls
a step, and each batch shape keeps its own activation memory. Here one graph holds all of it, and every shape's
graph draws its temporaries (the gradients among them) from one shared memory pool: nothing a graph makes
outlives its replay (the weights, optimizer moments, EMA and the step ledger are allocated outside any capture
and written in place, and nothing a capture made is referenced after it), so the graphs can share the pool in
any order.

What a captured step needs, and where it comes from:
- no host reads (the step's decisions live on the device: step_ledger.py, clipping.py; tested by the sync
  counter in tests/trainer/train/test_device_step.py);
- no tensor made outside a capture and written inside it may be replaced later: the ledger resets in place, the
  learning rate is a tensor on the device that the schedule fills in place, and the stop request is a device flag;
- nothing made inside a capture is referenced after it: the gradients are made by each step's backward (from the
  pool) and dropped at its end, as DeepSpeed's zero_grad drops them;
- every lazy allocation (optimizer moments, the property scale's device copy, cuBLAS handles) made before
  capture: the first step of each shape runs eagerly (on a side stream, as CUDA's warm-up) and is a real training
  step; the next step of that shape captures and replays;
- random draws from the device's default generator, which graphs advance on every replay.

DeepSpeed's ``engine.step`` is not captured: its step counters and learning-rate schedule are Python state that
a replay would not advance. The graph runs the same arithmetic (the loss scaled by 1/accumulation, the
optimizer's step, zeroed gradients) and the loop advances those counters on the host after each replay
(``Trainer._engine_bookkeeping``). With several ranks the step stays DeepSpeed's (its bucketed all-reduce runs
from Python hooks): ``"step"`` then falls back to the network's graphs.

On a machine without CUDA, ``capture=False`` runs the same body on the same static buffers eagerly: the tests
check on the CPU that this path takes the loop's decisions and keeps every persistent tensor in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("trainer")


@dataclass
class _Shape:
    static: list[dict]         # the step's micro-batches as the graph reads them: copied into before each step
    graph: object | None = None  # torch.cuda.CUDAGraph once captured


class StepGraphs:
    """Runs ``body(micro_batches)`` (one whole training step, device work only) as a CUDA graph per shape key."""

    def __init__(self, body, capture: bool):
        self.body, self.capture = body, capture
        self.shapes: dict[tuple, _Shape] = {}
        self.pool = None  # one memory pool for every shape's graph (made at the first capture)
        self.failed: str | None = None  # why capture was given up (the run then continues eagerly)

    @staticmethod
    def key(batches: list[dict]) -> tuple:
        return tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(b.items()) if torch.is_tensor(v))
                     for b in batches)

    def run(self, batches: list[dict]) -> None:
        """One training step on ``batches`` (micro-batches on the run's device)."""
        key = self.key(batches)
        shape = self.shapes.get(key)
        if shape is None:
            # private copies: the graph reads these addresses on every replay
            shape = self.shapes[key] = _Shape([{k: v.clone() for k, v in b.items() if torch.is_tensor(v)}
                                               for b in batches])
            self._warm_up(shape.static)
            return
        for dst, src in zip(shape.static, batches):
            for name, buffer in dst.items():
                buffer.copy_(src[name], non_blocking=True)
        if not self.capture or self.failed:
            self.body(shape.static)
            return
        if shape.graph is None:
            shape.graph = self._capture(shape.static)
            if shape.graph is None:  # capture failed: this step (and the rest of the run) eagerly
                self.body(shape.static)
                return
        shape.graph.replay()

    def _warm_up(self, static: list[dict]) -> None:
        if not self.capture:
            self.body(static)
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body(static)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, static: list[dict]):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.body(static)
        except RuntimeError as err:  # a capture records nothing it ran: the weights are as before the attempt
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("train.cuda_graphs \"step\": capturing the training step failed (%s); the run continues "
                        "with the same step run eagerly", self.failed)
            return None
        return graph

    def summary(self) -> dict:
        """Shapes seen, graphs captured, and why capture was given up (None if it was not)."""
        return {"shapes": len(self.shapes), "graphs": sum(s.graph is not None for s in self.shapes.values()),
                "capture_failed": self.failed}
