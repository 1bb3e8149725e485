"""EDM's adaptive gradient clipping, kept on the run's device: the threshold follows the recent gradient norms.

max_norm = 1.5 * mean + 2 * std (population) of the last ``history`` norms; the norm pushed to the history is the
clipped one, so a single spike cannot raise the threshold. The history starts from one large value (3000, as
the EDM code does) so that the first steps are effectively unclipped. (Released EDM code: utils.py,
gradient_clipping and its Queue of 50 norms.)

The history is a ring buffer of float64 tensors on the device, so that computing the threshold, clipping and
recording the norm never read a value back to the host: a training step can run ahead of the device.
"""

from __future__ import annotations

import torch

INITIAL_NORM = 3000.0


class AdaptiveClipper:
    def __init__(self, history: int = 50, initial: float = INITIAL_NORM, device: torch.device | str = "cpu"):
        self.history = history
        self.norms = torch.zeros(history, dtype=torch.float64, device=device)
        self.slots = torch.arange(history, device=device)
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # entries in use (at most history)
        self.next = torch.zeros((), dtype=torch.long, device=device)    # the slot the next norm goes to
        self._load([initial])

    def threshold(self) -> torch.Tensor:
        """The clipping threshold (a float64 scalar on the device)."""
        in_use = (self.slots < self.filled).to(self.norms.dtype)
        count = self.filled.to(self.norms.dtype)
        mean = (self.norms * in_use).sum() / count
        var = ((self.norms - mean).square() * in_use).sum() / count
        return 1.5 * mean + 2.0 * var.sqrt()

    def push(self, grad_norm: torch.Tensor, threshold: torch.Tensor, take: torch.Tensor | None = None) -> None:
        """Record min(grad_norm, threshold); ``take`` (a bool scalar on the device) False leaves the history as
        it was (a skipped step records nothing). Elementwise selects, no indexing by a device value: no host read."""
        take = torch.ones((), dtype=torch.bool, device=self.norms.device) if take is None else take
        value = torch.minimum(grad_norm.to(self.norms.dtype), threshold.to(self.norms.dtype))
        here = (self.slots == self.next) & take
        self.norms.copy_(torch.where(here, value, self.norms))
        self.filled.copy_(torch.where(take, (self.filled + 1).clamp(max=self.history), self.filled))
        self.next.copy_(torch.where(take, (self.next + 1) % self.history, self.next))

    def state_dict(self) -> dict:
        """The norms oldest first (read on the host: checkpoints only)."""
        norms, filled, nxt = self.norms.tolist(), int(self.filled), int(self.next)
        order = list(range(filled)) if filled < self.history else [*range(nxt, self.history), *range(nxt)]
        return {"norms": [norms[i] for i in order], "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if state["history"] != self.history:
            self.__init__(state["history"], device=self.norms.device)
        self._load(state["norms"][-self.history:])

    def _load(self, norms: list[float]) -> None:
        self.norms.zero_()
        self.norms[:len(norms)] = torch.tensor(norms, dtype=torch.float64)
        self.filled.fill_(len(norms))
        self.next.fill_(len(norms) % self.history)
