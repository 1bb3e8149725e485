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

import torch

from molscale.trainer.model.cuda_graphs import BodyGraphs


class StepGraphs:
    """Runs ``body(micro_batches)`` (one whole training step, device work only) as a CUDA graph per shape key."""

    def __init__(self, body, capture: bool):
        self.body = body
        self.graphs = BodyGraphs(capture, 'train.cuda_graphs "step": the training step')
        # shape key -> the step's micro-batches as the graph reads them: copied into before each step
        self.shapes: dict[tuple, list[dict]] = {}

    @property
    def capture(self) -> bool:
        return self.graphs.capture

    @capture.setter
    def capture(self, value: bool) -> None:
        self.graphs.capture = value

    @staticmethod
    def key(batches: list[dict]) -> tuple:
        return tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(b.items()) if torch.is_tensor(v))
                     for b in batches)

    def run(self, batches: list[dict]) -> None:
        """One training step on ``batches`` (micro-batches on the run's device)."""
        key = self.key(batches)
        static = self.shapes.get(key)
        if static is None:
            # private copies: the graph reads these addresses on every replay
            static = self.shapes[key] = [{k: v.clone() for k, v in b.items() if torch.is_tensor(v)} for b in batches]
        else:
            for dst, src in zip(static, batches):
                for name, buffer in dst.items():
                    buffer.copy_(src[name], non_blocking=True)
        self.graphs.run(key, lambda: self.body(static))

    def summary(self) -> dict:
        """Shapes seen, graphs captured, and why capture was given up (None if it was not)."""
        return {"shapes": len(self.shapes), "graphs": self.graphs.captured(), "capture_failed": self.graphs.failed}
