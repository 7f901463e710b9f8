"""The best feasible core assignment found so far, shared by all search phases."""

from __future__ import annotations

import time

import numpy as np

from .core import CoreModel


class Incumbent:
    def __init__(self, cm: CoreModel, t_start: float, progress=None, stop=None, on_bound=None):
        self.cm = cm
        self.on_bound = on_bound  # (value) -> None: a proven lower bound on the core optimum
        self.bound = -np.inf
        self.stop = stop          # () -> bool: the caller already holds a proven optimum
        self.t_start = t_start
        self.x: np.ndarray | None = None
        self.cost = np.inf
        self.first_feasible: float | None = None
        self.progress = progress
        self.updates = 0

    def offer_bound(self, value: float) -> None:
        if value > self.bound:
            self.bound = value
            if self.on_bound is not None:
                self.on_bound(value)

    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop()

    def offer(self, x: np.ndarray, cost: float | None = None, load: np.ndarray | None = None,
              source: str = "") -> bool:
        """Keep ``x`` if it is memory-feasible and cheaper; True when kept."""
        cm = self.cm
        if cost is None:
            cost = cm.cost_of(x)
        if not cost < self.cost:
            return False
        if load is None:
            load = cm.load_of(x)
        if cm.T and (load > cm.cap).any():
            return False
        self.x = x.copy()
        self.cost = cost
        self.updates += 1
        now = time.monotonic() - self.t_start
        if self.first_feasible is None:
            self.first_feasible = now
        if self.progress is not None:
            self.progress(source, cost, self.x)
        return True
