"""Exponential moving average of the weights, kept in float32 (sampling and evaluation use it)."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        # the lists the update reads, made once: per step a detach and a cast per parameter would be one operator
        # call each (hundreds of launches on a GPU for nothing; the weights are float32, see docs/numerics.md)
        self._model = model
        self._params = [p for _, p in model.named_parameters()]
        self._shadows = list(self.shadow.values())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) (weights - shadow), one fused multi-tensor lerp for all parameters. ``skip``: a
        scalar on the device, 1 where the step was skipped (the weights did not move): then the shadow stays too,
        decided on the device without a host read."""
        if model is not self._model:
            self._model, self._params = model, [p for _, p in model.named_parameters()]
        params = self._params if all(p.dtype == torch.float32 for p in self._params) else \
            [p.float() for p in self._params]  # a float64 model (tests) is averaged in float32 as before
        if skip is None:
            torch._foreach_lerp_(self._shadows, params, 1.0 - self.decay)
            return
        # a weight on the device: _foreach_lerp_ would read a tensor weight on the host, _foreach_mul_ does not
        moves = torch._foreach_sub(params, self._shadows)
        torch._foreach_mul_(moves, (1.0 - skip.float()) * (1.0 - self.decay))
        torch._foreach_add_(self._shadows, moves)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}...")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module):
        """Temporarily swap the EMA weights into ``model`` (for validation)."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])
