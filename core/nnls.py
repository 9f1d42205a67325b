"""Non-negative least squares for the cost fit's small normal equations (core/cost_fit.py uses it).

`nonnegative_least_squares` is the exact solver (Lawson-Hanson's active set method); the brute-force
`_nonnegative_least_squares_by_supports` is its fallback for a singular Gram matrix and the tests'
reference.
"""

from __future__ import annotations

import itertools

import numpy as np


def nonnegative_least_squares(gram: np.ndarray, moment: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """argmin_{x >= 0} x'Gx - 2 m'x for a small positive-definite G, exactly.

    `support` ([d] bools, e.g. the coefficients the previous solve left positive): a guess at the
    free set. When solving on it gives a positive point, the method starts there, so a fit that
    moved a little since its last solve takes one small solve instead of one per coefficient; any
    guess gives the same optimum.

    Lawson-Hanson's active set method on the normal equations: free the coordinate whose
    gradient most wants to rise, solve on the free set, step back to the boundary when a free
    coordinate would go negative. It ends at the KKT point, which for a positive-definite G is
    the unique optimum. With 7 coefficients that is a handful of tiny solves per call (the
    controller calls it every step), where trying all 2^7 supports took ~1 ms. G is rescaled to
    a unit diagonal first, so one tolerance serves coefficients of very different units.
    """
    size = len(moment)
    scale = 1.0 / np.sqrt(np.maximum(np.diag(gram), 1e-300))  # [d]
    g = gram * scale[:, None] * scale[None, :]  # [d, d], unit diagonal
    m = moment * scale  # [d]
    tolerance = 1e-10 * max(1.0, float(np.abs(m).max(initial=0.0)))
    x = np.zeros(size)
    free = np.zeros(size, dtype=bool)
    if support is not None and np.any(support):
        guess = np.asarray(support, dtype=bool).copy()  # [d]
        idx = np.flatnonzero(guess)
        try:
            part = np.linalg.solve(g[np.ix_(idx, idx)], m[idx])
        except np.linalg.LinAlgError:
            part = None
        if part is not None and (part > tolerance).all():  # a feasible start with every free coordinate positive
            x[idx], free = part, guess
    for _ in range(4 * size + 8):  # Lawson-Hanson ends within a few passes; the bound only guards cycling
        ascent = m - g @ x  # minus half the gradient: [d]
        wanting = ~free & (ascent > tolerance)
        if not wanting.any():
            return x * scale
        free[int(np.argmax(np.where(wanting, ascent, -np.inf)))] = True
        for _ in range(size):
            idx = np.flatnonzero(free)
            trial = np.zeros(size)
            try:
                trial[idx] = np.linalg.solve(g[np.ix_(idx, idx)], m[idx])
            except np.linalg.LinAlgError:
                return _nonnegative_least_squares_by_supports(gram, moment)
            if (trial[idx] > 0).all():
                x = trial
                break
            blocking = free & (trial <= 0)
            step = float(np.min(x[blocking] / (x[blocking] - trial[blocking])))
            x = x + step * (trial - x)
            free &= x > tolerance
            x[~free] = 0.0
    return _nonnegative_least_squares_by_supports(gram, moment)


def _nonnegative_least_squares_by_supports(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """The same optimum by brute force (every support's unconstrained minimiser, best feasible
    one wins): 2^d solves, the fallback for a singular G and the reference in the tests."""
    size = len(moment)
    best, best_value = np.zeros(size), 0.0  # the empty support: x = 0, objective 0
    for support_size in range(1, size + 1):
        for support in itertools.combinations(range(size), support_size):
            idx = list(support)
            try:
                part = np.linalg.solve(gram[np.ix_(idx, idx)], moment[idx])
            except np.linalg.LinAlgError:
                continue
            if np.any(part < 0):
                continue
            value = -float(moment[idx] @ part)  # at the restricted optimum x'Gx = m'x
            if value < best_value - 1e-12 * max(1.0, abs(best_value)):
                best = np.zeros(size)
                best[idx] = part
                best_value = value
    return best
