"""CUDA graphs for the denoising network (`model.denoise`), captured per input shape on first use.

Why: the network is many small operators. At QM9 batch 64 one training step dispatches about 7,400 of them for
a few milliseconds of GPU arithmetic, so on a GPU the step waits on the host (BENCHMARKS.md, H100). A graph
replays the whole forward (and, when training, the whole backward) as one launch.

One graph per key: the input shapes and dtypes, the static arguments (UniGEM's branch, heads), grad mode and
autocast state. Molecules are padded to the batch's largest, so QM9 gives one shape per largest size that
occurs (about ten); graphs are captured lazily, each in a few network evaluations.

- With gradients (training): torch.cuda.make_graphed_callables graphs forward and backward together; gradients
  reach the parameters through autograd as usual, so DeepSpeed, clipping and the optimizer stay eager. Each such
  graph keeps its own activation memory.
- Without gradients (sampling, validation, property prediction): a forward-only graph; those share one memory
  pool, and outputs are copied out of the graph's buffers before the next replay can overwrite them.

Requirements the network meets (tests/trainer/model/test_host_syncs.py): no host syncs and no randomness inside
`denoise`. Autocast runs inside the graphs with its weight cache off, which graph capture needs.

BodyGraphs, below, graphs more than the network: a whole training step (trainer/train/step_graph.py) or a whole
denoising step (trainer/model/denoising_graphs.py), one graph per key over one shared memory pool.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("trainer")


class _BoundNetwork(nn.Module):
    """The network call with its static arguments bound, returning a tuple: the form make_graphed_callables
    takes. Holding the model as a child makes its parameters the graph's parameters."""

    def __init__(self, model: nn.Module, fn, static: dict, keys: list[str]):
        super().__init__()
        self.model = model
        self.fn, self.static, self.keys = fn, static, keys

    def forward(self, *tensors):
        out = self.fn(*tensors, **self.static)
        return tuple(out[k] for k in self.keys)


class DenoiseGraphs:
    """Runs ``fn(*tensors, **static)`` (a model's eager network) through a CUDA graph of its key."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.graphs: dict = {}  # key -> (keys, callable returning a tuple)
        self.forward_pool = None

    def __deepcopy__(self, memo):
        return None  # a copied model (EMA, export) runs eagerly; graphs belong to the model they were captured on

    def _key(self, fn, tensors, static):
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        training = torch.is_grad_enabled()  # a graph without backward would silently drop the gradients
        return (fn.__name__, tuple(sorted(static.items())), tuple((tuple(t.shape), t.dtype) for t in tensors),
                training, autocast)

    def _autocast(self, key):
        enabled, dtype = key[-1]
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)

    def prepare(self, calls: list[tuple]) -> None:
        """Capture the training graphs of the network calls [(fn, tensors, static)] one loss is about to make,
        before that loss's forward: capturing a backward while an earlier call of the same step holds the
        parameters in a live autograd graph fails (their gradient accumulators sit on another stream)."""
        for fn, tensors, static in calls:
            key = self._key(fn, tensors, static)
            if not key[-2] or key in self.graphs:
                continue
            with self._autocast(key):
                bound = _BoundNetwork(self.model, fn, static, list(_eager_keys(fn, tensors, static)))
                # the sample inputs become the graph's static inputs: private copies that no later batch aliases
                sample = tuple(t.detach().clone() for t in tensors)
                # one call (and memory pool) per graph: a shared pool would require autograd to run the
                # backwards in the exact reverse order of the forwards, which it does not promise
                self.graphs[key] = (bound.keys, torch.cuda.make_graphed_callables(bound, sample,
                                                                                  allow_unused_input=True))

    def run(self, fn, tensors: tuple, static: dict) -> dict:
        key = self._key(fn, tensors, static)
        if key not in self.graphs:
            if key[-2]:
                self.prepare([(fn, tensors, static)])
            else:
                with self._autocast(key):
                    self.graphs[key] = self._capture_forward(fn, tensors, static)
        keys, graphed = self.graphs[key]
        with self._autocast(key):
            return dict(zip(keys, graphed(*tensors)))

    def _capture_forward(self, fn, tensors, static):
        static_in = tuple(t.detach().clone() for t in tensors)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # warm-up off the capture: lazy inits, cuBLAS handles
            for _ in range(2):
                fn(*static_in, **static)
        torch.cuda.current_stream().wait_stream(side)
        if self.forward_pool is None:
            self.forward_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.forward_pool):
            static_out = fn(*static_in, **static)
        keys = list(static_out)

        def replay(*inputs):
            for dst, src in zip(static_in, inputs):
                dst.copy_(src)
            graph.replay()
            return tuple(static_out[k].clone() for k in keys)

        return keys, replay


def _eager_keys(fn, tensors, static):
    with torch.no_grad():
        return fn(*tensors, **static).keys()


class BodyGraphs:
    """Runs ``body()`` (device work only, on tensors that live outside it and are written in place) as one CUDA
    graph per key: a whole training step (trainer/train/step_graph.py) or a whole denoising step
    (trainer/model/denoising_graphs.py).

    The first run of a key is eager, on a side stream (CUDA's warm-up: lazy allocations and library handles are
    made outside any capture, and the run is a real one); the second captures and replays; later runs replay. All
    keys' graphs take their temporaries from one memory pool: a body leaves nothing it made referenced after it,
    so the graphs can share the pool in any order. ``generators``: torch.Generators the body draws from besides
    the device's default one, registered with each graph so that a replay draws what the eager body would.
    ``capture=False`` (no CUDA) runs the body eagerly every time. A capture that fails is logged once
    (``what`` names the body) and every later run is eager."""

    def __init__(self, capture: bool, what: str, generators=()):
        self.capture, self.what, self.generators = capture, what, list(generators)
        self.graphs: dict = {}  # key -> torch.cuda.CUDAGraph once captured, None after the warm-up
        self.pool = None  # made at the first capture
        self.failed: str | None = None  # why capture was given up

    def run(self, key, body) -> None:
        if key not in self.graphs:
            self.graphs[key] = None
            self._warm_up(body)
            return
        if not self.capture or self.failed:
            body()
            return
        graph = self.graphs[key]
        if graph is None:
            graph = self.graphs[key] = self._capture(body)
            if graph is None:  # this run, and every later one, eagerly
                body()
                return
        graph.replay()

    def captured(self) -> int:
        return sum(graph is not None for graph in self.graphs.values())

    def _warm_up(self, body) -> None:
        if not self.capture:
            body()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, body):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.generators:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph, pool=self.pool):
                body()
        except (RuntimeError, AttributeError) as err:  # a capture records what it would run, and runs none of it
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("%s: capturing it as a CUDA graph failed (%s); it continues, run eagerly", self.what,
                        self.failed)
            return None
        return graph
