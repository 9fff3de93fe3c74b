"""Fits the rational erf of src/ops/layer_norm.rs (`erf64`, used by the CPU GELU) and prints its
coefficients as Rust constants.

Usage: /opt/gdenv/bin/python tools/fit_erf.py      (numpy and mpmath)

erf(z) = z P(z^2) / Q(z^2) on 0 < z <= 6 (erf is odd; past 6 it is 1 to within 2e-17), P and Q
of degree 9, Q(0) = 1. Fitted by iteratively reweighted linear least squares in relative error
(Loeb's method) on Chebyshev nodes against mpmath's erf at 40 digits; then checked on a dense
grid from 1e-30 to 6, evaluated in float64 by Horner's rule as the Rust code does. Prints the
largest relative error (2.6e-9) and checks that Q has no zero on [0, 36].
"""

import mpmath as mp
import numpy as np

mp.mp.dps = 40
DEGREE = 9
Z_MAX = 6.0


def erf_ref(z):
    return np.array([float(mp.erf(mp.mpf(float(v)))) for v in z])


def horner(coeffs, s):
    acc = np.full_like(s, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * s + c
    return acc


def fit(nodes=6000, iters=40):
    k = np.arange(nodes)
    z = Z_MAX * (0.5 - 0.5 * np.cos(np.pi * (k + 0.5) / nodes))
    u = (z / Z_MAX) ** 2  # fit in s / Z_MAX^2 for conditioning, rescaled below
    f = erf_ref(z) / z
    q_prev = np.ones_like(u)
    powers = np.vander(u, DEGREE + 1, increasing=True)
    for _ in range(iters):
        # P(u) - f (Q(u) - 1) = f, weighted by 1 / (f Q_prev(u)): relative error of P / Q.
        a = np.hstack([powers, -f[:, None] * powers[:, 1:]])
        w = 1.0 / (q_prev * f)
        c, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = c[: DEGREE + 1], np.concatenate([[1.0], c[DEGREE + 1:]])
        q_prev = horner(q, u)
    scale = Z_MAX ** (2 * np.arange(DEGREE + 1))
    return p / scale, q / scale


def main():
    p, q = fit()
    z = np.concatenate([np.geomspace(1e-30, 1e-3, 200), np.linspace(1e-3, Z_MAX, 60001)])
    got = z * horner(p, z * z) / horner(q, z * z)
    worst = np.max(np.abs(got - erf_ref(z)) / erf_ref(z))
    q_min = horner(q, np.linspace(0.0, Z_MAX**2, 1_000_001)).min()
    assert q_min > 0, "Q has a zero in range"
    print(f"// max relative error {worst:.2e} on (0, {Z_MAX}]; min Q {q_min:.3f}")
    for name, coeffs in (("ERF_P", p), ("ERF_Q", q)):
        print(f"const {name}: [f64; {DEGREE + 1}] = [")
        for c in coeffs:
            print(f"    {float(c)!r},")
        print("];")


if __name__ == "__main__":
    main()
