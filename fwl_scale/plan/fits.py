"""Scaling-law fits: L(N) = E + A·N^-α and Chinchilla's L(N, D) = E + A/N^α + B/D^β.

As Hoffmann et al. (2022, appendix D.2): the parameters are fitted in log space, A = e^a, B = e^b,
E = e^e, minimising the Huber loss (δ = 1e-3) of log L̂ - log L with L̂ written as a log-sum-exp
(LSE(a - α log N, b - β log D, e)), by L-BFGS from a grid of initialisations, the best kept. L-BFGS is
torch's (float64), torch being a dependency already. Its starting points: for each exponent on a grid
the law is linear in A, B, E, solved by least squares (numpy); the few best starts are refined.

The compute-optimal frontier: C = F(N)·D with F the training FLOPs per token of model/flops.py (the
FWL's extra work included), itself fitted per arm as F(N) = k·N^γ over the runs; for each compute C,
N_opt minimises L(N, C/F(N)) on a dense log grid of N.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class PowerLaw:
    """L(N) = E + A·N^-α."""

    E: float
    A: float
    alpha: float
    huber: float  # the objective at the optimum

    def __call__(self, n):
        return self.E + self.A * np.asarray(n, dtype=float) ** -self.alpha


@dataclass(frozen=True)
class Chinchilla:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    huber: float

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta


def _lbfgs(objective, start: list[float]) -> tuple[list[float], float]:
    # Function-level: torch only for the optimiser; the rest of the module is numpy.
    import torch

    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        value = float(objective(x))
    return x.detach().tolist(), value


def _starts(loss: np.ndarray, columns: list[np.ndarray], exponents: list[tuple[float, ...]], keep: int = 3):
    """The `keep` best (coefficients, exponents) of the grid by least squares of L = E + Σ c_i·col_i(exp_i),
    positive coefficients only, ranked by the squared error of log L."""
    found = []
    for exps in exponents:
        design = np.stack([col ** -x for col, x in zip(columns, exps)] + [np.ones_like(loss)], axis=1)
        coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
        if np.all(coef > 0):
            found.append((float(np.sum((np.log(design @ coef) - np.log(loss)) ** 2)), coef, exps))
    found.sort(key=lambda r: r[0])
    if not found:  # no positive solution: start from the middle of the grid with unit coefficients
        return [(np.ones(len(columns) + 1), exponents[len(exponents) // 2])]
    return [(coef, exps) for _, coef, exps in found[:keep]]


def _check(values, name: str, positive: bool = True) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        raise ValueError(f"fit: {name} must be finite{' and positive' if positive else ''}, got {values}")
    return arr


def _distinct(values: np.ndarray) -> list[int]:
    return sorted({int(v) for v in values})


def fit_power_law(n, loss) -> PowerLaw:
    """L(N) = E + A·N^-α by Huber on log L; needs at least 3 points of distinct N."""
    import torch  # function-level: see _lbfgs

    n, loss = _check(n, "N"), _check(loss, "L")
    if len(set(n.tolist())) < 3:
        raise ValueError(f"fit: L(N) has 3 parameters and needs >= 3 distinct sizes, got {_distinct(n)}")
    logn, logl = torch.tensor(np.log(n)), torch.tensor(np.log(loss))

    def objective(x):
        a, e, alpha = x
        pred = torch.logsumexp(torch.stack([a - alpha * logn, e.expand_as(logn)]), dim=0)
        return torch.nn.functional.huber_loss(pred, logl, delta=HUBER_DELTA, reduction="sum")

    starts = _starts(loss, [n], [(x,) for x in np.linspace(0.02, 2.0, 100)])
    (a, e, alpha), value = min((_lbfgs(objective, [math.log(c[0]), math.log(c[1]), x[0]]) for c, x in starts),
                               key=lambda r: r[1])
    return PowerLaw(E=math.exp(e), A=math.exp(a), alpha=alpha, huber=value)


def fit_chinchilla(n, d, loss) -> Chinchilla:
    """L(N, D) = E + A/N^α + B/D^β by Huber on log L; needs >= 5 points over >= 2 sizes and budgets."""
    import torch  # function-level: see _lbfgs

    n, d, loss = _check(n, "N"), _check(d, "D"), _check(loss, "L")
    if not len(n) == len(d) == len(loss) or len(n) < 5 or len(set(n.tolist())) < 2 or len(set(d.tolist())) < 2:
        raise ValueError(f"fit: L(N, D) has 5 parameters and needs >= 5 points over >= 2 sizes and >= 2 token "
                         f"budgets, got {len(n)} points, sizes {_distinct(n)}, budgets {_distinct(d)}")
    logn, logd, logl = torch.tensor(np.log(n)), torch.tensor(np.log(d)), torch.tensor(np.log(loss))

    def objective(x):
        a, b, e, alpha, beta = x
        pred = torch.logsumexp(torch.stack([a - alpha * logn, b - beta * logd, e.expand_as(logn)]), dim=0)
        return torch.nn.functional.huber_loss(pred, logl, delta=HUBER_DELTA, reduction="sum")

    grid = list(itertools.product(np.linspace(0.02, 1.5, 40), np.linspace(0.02, 1.5, 40)))
    starts = _starts(loss, [n, d], grid)
    (a, b, e, alpha, beta), value = min(
        (_lbfgs(objective, [*np.log(c).tolist(), *x]) for c, x in starts), key=lambda r: r[1])
    return Chinchilla(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, huber=value)


@dataclass(frozen=True)
class FlopsLaw:
    """Training FLOPs per token as a function of N: F(N) = k·N^γ (least squares in log-log)."""

    k: float
    gamma: float

    def __call__(self, n):
        return self.k * np.asarray(n, dtype=float) ** self.gamma


def fit_flops(n, flops_per_token) -> FlopsLaw:
    n, f = _check(n, "N"), _check(flops_per_token, "FLOPs per token")
    if len(set(n.tolist())) < 2:
        return FlopsLaw(k=float(np.mean(f / n)), gamma=1.0)
    gamma, logk = np.polyfit(np.log(n), np.log(f), 1)
    return FlopsLaw(k=float(math.exp(logk)), gamma=float(gamma))


def frontier(law: Chinchilla, flops: FlopsLaw, compute, n_range=(1e3, 1e13)) -> dict[str, np.ndarray]:
    """For each compute C (FLOPs): N_opt, D_opt = C / F(N_opt) and L_opt, minimised on a log grid of N."""
    compute = _check(compute, "compute")
    grid = np.logspace(math.log10(n_range[0]), math.log10(n_range[1]), 4000)
    d = compute[:, None] / flops(grid)[None, :]
    losses = law(grid[None, :], d)
    best = np.argmin(losses, axis=1)
    n_opt = grid[best]
    return {"compute": compute, "n_opt": n_opt, "d_opt": compute / flops(n_opt), "loss": losses[np.arange(len(best)), best]}


def to_json(obj) -> dict:
    return {"law": type(obj).__name__, **asdict(obj)}
