"""Tolerances for float32 results, derived from the arithmetic they check, not from a CPU.

float32 rounds every operation to within ``eps / 2`` (``eps = 2**-23``, about 1.2e-7) of
the exact result, relative. A sum of ``n`` terms, each at most ``M`` in size, computed in
any order, lies within ``n * eps * M`` of the exact sum (the recursive-summation bound,
Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 4.4; pairwise and
vectorised sums do better). Two float32 computations of one value in different orders
(another CPU's vector width or fused multiply-adds, another device count, another kernel)
therefore differ by at most twice that, on any IEEE-754 machine. A test compares with
these bounds, so it passes wherever the arithmetic is right, and fails where a term is
wrong: a wrong term moves the result by far more than ``eps`` times the sum of sizes.

``terms`` counts the roundings a result goes through (the terms of its sums, the
operations of a closed form); ``magnitude`` is the size of the largest term (or
intermediate), which is what the roundings are relative to.
"""

import numpy as np

#: float32's machine epsilon (the spacing of float32 numbers at 1).
EPS32 = float(np.finfo(np.float32).eps)


def f32_atol(terms: int, magnitude: float) -> float:
    """Absolute tolerance of two float32 evaluations of ``terms`` terms up to ``magnitude``."""
    return 2.0 * terms * EPS32 * float(magnitude)


def f32_rtol(terms: int, condition: float = 1.0) -> float:
    """Relative tolerance: :func:`f32_atol` over the result's size.

    ``condition`` is the size of the largest term over the size of the result (1 for a sum
    of terms of one sign; large where terms cancel).
    """
    return 2.0 * terms * EPS32 * float(condition)


def assert_f32_close(actual, desired, *, terms: int, magnitude: float | None = None) -> None:
    """``actual`` equals ``desired`` up to float32 rounding of ``terms`` terms.

    ``magnitude`` defaults to the largest ``|desired|`` (elementwise results of one size).
    """
    desired = np.asarray(desired, np.float64)
    if magnitude is None:
        magnitude = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), desired, rtol=0, atol=f32_atol(terms, magnitude)
    )
