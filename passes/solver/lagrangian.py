"""Lagrangian relaxation of the memory rows, solved by TRW-S + tree moves.

The memory limit couples nodes that are far apart in the graph, which local
moves cannot trade against each other. Pricing memory instead -- a price
mu[r] >= 0 per row, added to every strategy's cost as sum_r mu[r] * usage[r]
-- turns the problem into an unconstrained pairwise one (solved by message
passing, then polished by exact tree moves) whose solutions use memory where
it buys the most. Prices follow subgradient steps (Polyak's rule against the
best feasible cost); every relaxed solution that is close to feasible is
repaired and polished into a feasible candidate for the incumbent.
"""

from __future__ import annotations

import time

import numpy as np

from .core import CoreModel
from .incumbent import Incumbent
from .local_search import apply_components, greedy_sweeps, induced_forest, repair, tree_move
from .trws import TRWS


class LagrangianSearch:
    def __init__(self, cm: CoreModel, inc: Incumbent, rng: np.random.Generator,
                 trws_iters: int = 3, tree_passes: int = 3, patience: int = 10):
        self.cm = cm
        self.inc = inc
        self.rng = rng
        self.trws = TRWS(cm)
        self.mu = np.zeros(cm.T)
        self.capf = cm.cap.astype(np.float64)
        self.trws_iters = trws_iters
        self.tree_passes = tree_passes
        self.patience = patience
        self.step_scale = 1.0
        self.best_bound = -np.inf
        self.no_improve = 0
        self.xrel: np.ndarray | None = None
        self.iters = 0
        self.repairs = 0

    def _relaxed(self, theta: np.ndarray, pen: np.ndarray, deadline: float):
        """Approximate minimiser of the priced problem: TRW-S labels, then tree moves
        (also from the previous relaxed solution); None if the deadline passed."""
        cm = self.cm
        xt, _ = self.trws.run(theta, self.trws_iters, deadline)
        best = None
        for x in ([xt] if self.xrel is None else [xt, self.xrel]):
            x = tree_move(cm, x, induced_forest(cm, self.rng), pen)
            e = self.trws.energy(theta, x)
            if best is None or e < best[0]:
                best = (e, x)
        e, x = best
        for _ in range(self.tree_passes - 1):
            if time.monotonic() > deadline:
                return None
            x = tree_move(cm, x, induced_forest(cm, self.rng), pen)
        return self.trws.energy(theta, x), x

    def step(self, deadline: float) -> None:
        cm = self.cm
        pen = cm.penalty(self.mu)
        theta = cm.cost_flat + pen
        relaxed = self._relaxed(theta, pen, deadline)
        if relaxed is None:
            return
        energy, x = relaxed
        self.xrel = x
        # min over x of the priced problem, minus the prices' share of the capacities, bounds
        # the true optimum from below for any prices mu >= 0
        self.inc.offer_bound(self.trws.lower_bound(theta) - float(self.mu @ self.capf))
        load = cm.load_of(x)
        g = (load - cm.cap).astype(np.float64)
        cost = cm.cost_of(x)
        over = g > 0
        if not over.any():
            self.inc.offer(x, cost, load, "lagrangian")
        elif over.sum() <= max(50, cm.T // 20):
            self._repair_and_offer(x, load, deadline, pen)
        if self.inc.x is not None and time.monotonic() < deadline:
            # move the incumbent towards the relaxed solution where that pays and fits
            xi = self.inc.x.copy()
            li = cm.load_of(xi)
            if apply_components(cm, xi, li, x) < 0:
                self.inc.offer(xi, None, li, "lagrangian+merge")
        # dual bookkeeping and Polyak step
        bound = energy - float(self.mu @ self.capf)
        if not np.isfinite(self.best_bound) or bound > self.best_bound + 1e-9 * abs(self.best_bound):
            self.best_bound = bound
            self.no_improve = 0
        else:
            self.no_improve += 1
            if self.no_improve >= self.patience:
                self.step_scale *= 0.5
                self.no_improve = 0
                if self.step_scale < 1e-3:
                    self.step_scale = 0.5
        ub = self.inc.cost if np.isfinite(self.inc.cost) else 2.0 * abs(cost) + 1.0
        gg = np.where((self.mu > 0) | over, g, 0.0)
        nrm = float(gg @ gg)
        if nrm > 0:
            step = self.step_scale * max(ub - bound, 0.01 * abs(ub)) / nrm
            self.mu = np.maximum(0.0, self.mu + step * gg)
        self.iters += 1

    def _repair_and_offer(self, x: np.ndarray, load: np.ndarray, deadline: float,
                          pen: np.ndarray) -> None:
        cm = self.cm
        x = x.copy()
        load = load.copy()
        if not repair(cm, x, load, deadline):
            return
        self.repairs += 1
        greedy_sweeps(cm, x, load, deadline, self.rng, max_sweeps=2)
        for _ in range(2):      # feasible tree moves: keep the parts that pay and fit
            if time.monotonic() > deadline:
                break
            apply_components(cm, x, load, tree_move(cm, x, induced_forest(cm, self.rng), pen))
        self.inc.offer(x, None, load, "lagrangian+repair")

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline and not self.inc.stop_requested():
            self.step(deadline)
