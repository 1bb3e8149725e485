"""Exponential moving average of the weights, kept in float32 (sampling and evaluation use it)."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # one fused multi-tensor lerp for all parameters: a few kernel launches instead of one per parameter
        params = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1.0 - self.decay)

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
