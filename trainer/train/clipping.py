"""EDM's adaptive gradient clipping: the threshold follows the recent gradient norms.

max_norm = 1.5 * mean + 2 * std of the last ``history`` norms; the norm pushed to the history is the
clipped one, so a single spike cannot raise the threshold. The history starts from one large value
(3000, as the EDM code does) so that the first steps are effectively unclipped.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class AdaptiveClipper:
    def __init__(self, history: int = 50, initial: float = 3000.0):
        self.norms: deque[float] = deque([initial], maxlen=history)

    def threshold(self) -> float:
        values = np.asarray(self.norms, dtype=np.float64)
        return float(1.5 * values.mean() + 2.0 * values.std())

    def push(self, grad_norm: float, threshold: float) -> None:
        self.norms.append(min(float(grad_norm), threshold))

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "history": self.norms.maxlen}

    def load_state_dict(self, state: dict) -> None:
        self.norms = deque(state["norms"], maxlen=state["history"])
