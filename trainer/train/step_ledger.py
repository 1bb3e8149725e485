"""What the training loop decides and records each step, kept on the run's device and read every few steps.

A step whose host reads a device value waits for the device to finish everything queued before it, so host
work (Python, operator dispatch, the next batch) and device work add up instead of overlapping. Here every
per-step decision is tensor arithmetic on the device:

- skip: a non-finite loss on any rank (the flag rides in the step's all-reduce) or a non-finite gradient norm
  skips the update; the fused optimizer reads it as ``found_inf`` and leaves weights and moments as they were,
  the EMA and the clipping history leave it too;
- the non-finite counters (total, in a row) and a sticky "limit reached" flag: once ``max_nonfinite_in_row``
  skips come in a row, every later update is skipped as well, so the weights stay the last good ones until the
  host reads the flag, saves them and stops;
- the stop request (SIGTERM on any rank), summed by the same all-reduce;
- the loss terms, summed over the steps that were not skipped, with the last gradient norm and threshold.

``read()`` brings all of it to the host in one transfer (the loop calls it every ``logging.every_steps`` steps,
at checkpoints and validations, and at the last step) and starts the next interval.
"""

from __future__ import annotations

import math
import time

import torch


class StepLedger:
    def __init__(self, device: torch.device, max_nonfinite_in_row: int):
        self.device, self.limit = device, max_nonfinite_in_row
        zeros = dict(dtype=torch.float64, device=device)
        self.nonfinite_total = torch.zeros((), **zeros)
        self.nonfinite_in_row = torch.zeros((), **zeros)
        self.limit_reached = torch.zeros((), **zeros)
        self.stop = torch.zeros((), **zeros)
        self.names: list[str] = []
        self.loss_sums = None  # [terms], made by the first step recorded (the model names the terms)
        self.good_steps = torch.zeros((), **zeros)
        self.last_norm = torch.full((), float("nan"), **zeros)
        self.last_threshold = torch.full((), float("nan"), **zeros)
        self._start_interval()

    def _start_interval(self) -> None:
        # reset in place: a CUDA graph of the whole step (step_graph.py) writes to these very tensors
        if self.loss_sums is not None:
            self.loss_sums.zero_()
        self.good_steps.zero_()
        self.last_norm.fill_(float("nan"))
        self.last_threshold.fill_(float("nan"))
        self.steps = self.molecules = 0
        self.data_wait_s = 0.0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """Time spent after a read (validation, checkpoints) is not training time."""
        self.started = time.perf_counter()

    def decide_skip(self, nonfinite_ranks: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """1.0 if this step's update is skipped, else 0.0 (a float32 scalar on the device, the form the fused
        optimizers take as ``found_inf``); updates the non-finite counters."""
        bad = nonfinite_ranks.double() > 0
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        bad = bad.double()
        self.nonfinite_total.add_(bad)
        self.nonfinite_in_row.add_(1.0).mul_(bad)  # +1 on a skip, back to 0 on an update
        self.limit_reached.copy_(torch.maximum(self.limit_reached, (self.nonfinite_in_row >= self.limit).double()))
        return torch.maximum(bad, self.limit_reached).float()

    def record(self, names: list[str], step_losses: torch.Tensor, skip: torch.Tensor, stop: torch.Tensor,
               grad_norm: torch.Tensor | None, threshold: torch.Tensor | None) -> None:
        """Add one step on the device: its loss terms (averaged over ranks and micro-batches, non-finite ones
        zeroed) count only if the step was not skipped. ``count`` adds what the host knows of it."""
        if self.loss_sums is None:
            self.names = names
            self.loss_sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        kept = 1.0 - skip.double()
        self.loss_sums.add_(step_losses.double() * kept)
        self.good_steps.add_(kept)
        self.stop.copy_(torch.maximum(self.stop, (stop.double() > 0).double()))
        if grad_norm is not None:
            self.last_norm.copy_(grad_norm.double())
        if threshold is not None:
            self.last_threshold.copy_(threshold.double())

    def count(self, molecules: int, wait_s: float) -> None:
        """Add one step's host side: its molecules and the time spent waiting for its data."""
        self.steps += 1
        self.molecules += molecules
        self.data_wait_s += wait_s

    def packed(self) -> torch.Tensor:
        """Everything ``read`` needs, as one device vector (one transfer)."""
        sums = self.loss_sums if self.loss_sums is not None else self.good_steps.new_zeros(0)
        scalars = [self.nonfinite_total, self.nonfinite_in_row, self.limit_reached, self.stop, self.good_steps,
                   self.last_norm, self.last_threshold]
        return torch.cat([torch.stack(scalars), sums])

    def read(self, values: list[float], world_size: int) -> dict:
        """``values``: ``packed()`` on the host. -> the interval's record (the loss terms are means over its
        steps that were not skipped; omitted when every step was skipped); starts the next interval."""
        total, in_row, limit, stop, good, norm, threshold, *sums = values
        seconds = time.perf_counter() - self.started
        record = {name: s / good for name, s in zip(self.names, sums)} if good > 0 else {}
        record.update({
            # the last step's norm before clipping and its threshold (None: not computed, or not finite)
            "grad_norm": _finite_or_none(norm), "clip_threshold": _finite_or_none(threshold),
            "molecules_per_s": self.molecules * world_size / seconds if seconds > 0 else 0.0,
            "data_wait_s": self.data_wait_s, "step_time_s": seconds / max(1, self.steps),
            "steps_in_record": self.steps, "skipped_in_record": self.steps - int(round(good)),
            "nonfinite_skipped": int(total),
        })
        self.read_flags = {"nonfinite_in_row": int(in_row), "limit_reached": limit > 0, "stop": stop > 0}
        self._start_interval()
        return record

    def state_dict(self) -> dict:
        return {"nonfinite_total": int(self.nonfinite_total), "nonfinite_in_row": int(self.nonfinite_in_row)}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_total.fill_(state["nonfinite_total"])
        self.nonfinite_in_row.fill_(state["nonfinite_in_row"])
        self.limit_reached.fill_(float(state["nonfinite_in_row"] >= self.limit))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
