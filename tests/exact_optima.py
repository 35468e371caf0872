"""Independent optima in extended precision (mpmath), for testing certificates against the problem *as stated*:
every float input is taken as the exact number it represents, so collinearity that exists only up to rounding
(``[a, 3a]`` with ``3a`` rounded, near-duplicates, simplex rows next to a bias) is a real direction here.

None of these use the solvers under test: least squares by modified Gram–Schmidt, the ball problem by the
secular equation on an mpmath eigendecomposition, softmax forward losses by damped Newton with exact
derivatives, all at 60+ significant digits.
"""

from __future__ import annotations

import mpmath
from mpmath import mp, mpf

DPS = 60


def _matrix(rows):
    return [[mpf(float(x)) for x in row] for row in rows]


def least_squares_optimum(Z, Y) -> mpf:
    r""":math:`\min_\theta\frac1n\|Z\theta - Y\|_F^2` exactly (to ~60 digits): the residual of ``Y`` after
    projection onto the column space of ``Z``, by modified Gram–Schmidt with reorthogonalisation; a column
    whose remainder is below :math:`10^{-45}` of its norm is exactly dependent (exact dependencies leave
    :math:`\sim10^{-60}`, rounding-level ones :math:`\sim10^{-17}`)."""
    with mp.workdps(DPS + 20):
        n, d = len(Z), len(Z[0])
        cols = [[mpf(float(Z[i][j])) for i in range(n)] for j in range(d)]
        basis = []
        for col in cols:
            v = list(col)
            norm0 = mpmath.sqrt(sum(x * x for x in v))
            if norm0 == 0:
                continue
            for _ in range(2):
                for q in basis:
                    c = sum(a * b for a, b in zip(q, v))
                    v = [a - c * b for a, b in zip(v, q)]
            norm = mpmath.sqrt(sum(x * x for x in v))
            if norm > mpf(10) ** -45 * norm0:
                basis.append([x / norm for x in v])
        total = mpf(0)
        k = len(Y[0])
        for o in range(k):
            y = [mpf(float(Y[i][o])) for i in range(n)]
            for _ in range(2):
                for q in basis:
                    c = sum(a * b for a, b in zip(q, y))
                    y = [a - c * b for a, b in zip(y, q)]
            total += sum(x * x for x in y)
        return total / n


def least_squares_objective(Z, Y, theta) -> mpf:
    """``(1/n)||Z theta - Y||_F^2`` exactly for float ``theta`` ``(d, k)``."""
    with mp.workdps(DPS):
        n, d, k = len(Z), len(Z[0]), len(Y[0])
        total = mpf(0)
        for i in range(n):
            for o in range(k):
                r = sum(mpf(float(Z[i][j])) * mpf(float(theta[j][o])) for j in range(d)) - mpf(float(Y[i][o]))
                total += r * r
        return total / n


def ball_least_squares_optimum(Z, y, radius: float) -> mpf:
    r""":math:`\min_{\|\theta\|\le r}\frac1n\|Z\theta - y\|^2` for one output: eigendecomposition of
    :math:`Z^\top Z` in mpmath, then the secular equation :math:`\|\theta(\mu)\| = r` by bisection (Moré and
    Sorensen 1983); the minimum-norm unconstrained solution when it lies in the ball."""
    with mp.workdps(DPS):
        n, d = len(Z), len(Z[0])
        Zm = mpmath.matrix(_matrix(Z))
        ym = mpmath.matrix([mpf(float(v)) for v in y])
        G = Zm.T * Zm
        c = Zm.T * ym
        E, Q = mpmath.eigsy(G)
        proj = Q.T * c
        scale = max(abs(E[j]) for j in range(d)) or mpf(1)
        zero = [abs(E[j]) <= mpf(10) ** -40 * scale for j in range(d)]

        def theta(mu):
            coeffs = [mpf(0) if (zero[j] and mu == 0) else proj[j] / (E[j] + mu) for j in range(d)]
            return Q * mpmath.matrix(coeffs)

        def value(th):
            r = Zm * th - ym
            return sum(r[i] ** 2 for i in range(n)) / n

        th0 = theta(mpf(0))
        if mpmath.norm(th0) <= radius:
            return value(th0)
        lo, hi = mpf(0), mpmath.norm(c) / radius + 1
        for _ in range(250):
            mid = (lo + hi) / 2
            if mpmath.norm(theta(mid)) > radius:
                lo = mid
            else:
                hi = mid
        return value(theta(hi))


def softmax_forward_objective(X, Q, W, b, loss: str) -> mpf:
    """Forward CE/KL of the softmax head ``(W, b)`` (floats taken exactly) on features ``X`` and teacher ``Q``."""
    with mp.workdps(DPS):
        n, m = len(X), len(X[0])
        k = len(Q[0])
        total = mpf(0)
        for i in range(n):
            eta = [sum(mpf(float(X[i][j])) * mpf(float(W[c][j])) for j in range(m)) + mpf(float(b[c]))
                   for c in range(k)]
            total += _sample_loss(eta, [mpf(float(q)) for q in Q[i]], loss)
        return total / n


def _sample_loss(eta, q, loss):
    top = max(eta)
    lse = top + mpmath.log(sum(mpmath.exp(e - top) for e in eta))
    value = sum(qy * (lse - e) for qy, e in zip(q, eta) if qy != 0)
    if loss == "forward_kl":
        value += sum(qy * mpmath.log(qy) for qy in q if qy != 0)
    return value


def _ridged_newton_step(H, g, ridge):
    r"""Newton step :math:`-H^{-1}g` for :math:`H = H_0 + \text{ridge}\,I`, :math:`H_0 \succeq 0` (up to 60-digit
    rounding), by Cholesky with pivot tolerance ``ridge / 2``.

    Why Cholesky and not ``mpmath.lu_solve``: every Cholesky pivot is a Schur complement of :math:`H`, at least
    :math:`\lambda_{\min}(H) \ge` ridge in exact arithmetic, and the rounding moves it by at most about
    :math:`p^2\epsilon\max_t H_{tt}` (Higham Thm 10.5), :math:`10^{-61}p^2` of the scale against the ridge's
    :math:`10^{-50}`: it always completes. ``lu_solve`` (row-scaled partial pivoting) refuses pivots below
    :math:`\|H\|_1\epsilon` after element growth, and did on a wide design whose teacher has classes at 0 on
    every row (hypothesis found it: curvatures down to 1e-24 next to 0.78, exact null directions at the ridge).
    mpmath's own ``cholesky_solve`` is not used because its pivot tolerance is an absolute :math:`\epsilon`,
    larger than the ridge for features of scale :math:`10^{-20}`."""
    L = mpmath.cholesky(H, tol=ridge / 2)
    p = H.rows
    y = [mpf(0)] * p
    for i in range(p):
        y[i] = (-g[i] - mpmath.fsum(L[i, j] * y[j] for j in range(i))) / L[i, i]
    x = [mpf(0)] * p
    for i in reversed(range(p)):
        x[i] = (y[i] - mpmath.fsum(L[j, i] * x[j] for j in range(i + 1, p))) / L[i, i]
    return x


def softmax_forward_optimum(X, Q, loss: str, *, bias: bool = True, iterations: int = 200) -> mpf:
    r"""Infimum over :math:`(W, b)` of the forward loss, by damped Newton in mpmath in the coordinates
    :math:`\beta\in\mathbb R^{d\times(k-1)}` (logits :math:`z_i^\top\beta_c`, last class 0; :math:`z = [h, 1]`).
    The Hessian gets a ridge of :math:`10^{-50}` of its scale (exact dependencies make it singular, and a
    teacher with a class at 0 everywhere sends logits to :math:`-\infty`, its curvature to 0) and is solved by
    Cholesky (:func:`_ridged_newton_step`), which cannot fail on it; the iteration stops when the squared
    Newton decrement is below :math:`10^{-45}`. Where the infimum is not
    attained the value returned is that of the last iterate, an upper bound on the infimum."""
    with mp.workdps(DPS):
        n = len(X)
        k = len(Q[0])
        Z = [[mpf(float(x)) for x in row] + ([mpf(1)] if bias else []) for row in X]
        q = [[mpf(float(v)) for v in row] for row in Q]
        d = len(Z[0])
        kc = k - 1
        p = d * kc
        beta = [mpf(0)] * p

        def logits(bt):
            return [[sum(Z[i][j] * bt[j * kc + c] for j in range(d)) for c in range(kc)] + [mpf(0)] for i in range(n)]

        def objective(bt):
            return sum(_sample_loss(eta, q[i], loss) for i, eta in enumerate(logits(bt))) / n

        f = objective(beta)
        for _ in range(iterations):
            etas = logits(beta)
            g = [mpf(0)] * p
            H = mpmath.zeros(p, p)
            for i, eta in enumerate(etas):
                top = max(eta)
                ex = [mpmath.exp(e - top) for e in eta]
                total = sum(ex)
                s = [e / total for e in ex]
                qs = sum(q[i])
                r = [qs * s[c] - q[i][c] for c in range(kc)]
                for j in range(d):
                    zij = Z[i][j]
                    if zij == 0:
                        continue
                    for c in range(kc):
                        g[j * kc + c] += zij * r[c] / n
                for c in range(kc):
                    for c2 in range(kc):
                        a = qs * ((s[c] if c == c2 else 0) - s[c] * s[c2]) / n
                        if a == 0:
                            continue
                        for j in range(d):
                            if Z[i][j] == 0:
                                continue
                            azj = a * Z[i][j]
                            for j2 in range(d):
                                H[j * kc + c, j2 * kc + c2] += azj * Z[i][j2]
            scale = max(abs(H[t, t]) for t in range(p)) or mpf(1)
            ridge = mpf(10) ** -50 * scale
            for t in range(p):
                H[t, t] += ridge
            step = _ridged_newton_step(H, g, ridge)
            decrement2 = -sum(g[t] * step[t] for t in range(p))
            if decrement2 < mpf(10) ** -45:
                break
            alpha = mpf(1)
            for _bt in range(60):
                trial = [beta[t] + alpha * step[t] for t in range(p)]
                ft = objective(trial)
                if ft <= f - alpha * decrement2 / 4:
                    beta, f = trial, ft
                    break
                alpha /= 2
            else:
                break
        return f


def _mixture_term(q, p, loss: str):
    """One class's loss term in extended precision (``0 log 0 = 0``; a reverse loss at ``q = 0 < p`` is inf)."""
    if loss in ("forward_kl", "forward_ce"):
        if q == 0:
            return mpf(0)
        return (q * mpmath.log(q) if loss == "forward_kl" else mpf(0)) - q * mpmath.log(p)
    if loss == "reverse_kl":
        if p == 0:
            return mpf(0)
        return mpmath.inf if q == 0 else p * (mpmath.log(p) - mpmath.log(q))
    if loss == "reverse_ce":
        if p == 0:
            return mpf(0)
        return mpmath.inf if q == 0 else -p * mpmath.log(q)
    if loss == "squared":
        return (p - q) ** 2
    raise ValueError(loss)


def mixture_objective(X, Q, A, loss: str, *, feasible: bool = False) -> mpf:
    r"""The mixture head's objective :math:`\frac1n\sum_i\sum_y \ell(q_{iy}, (Ah_i)_y)` at the float head ``A``
    ``(k, m)``, every input taken as the exact number it represents. ``feasible``: first make each column sum
    to 1 exactly (its largest entry becomes 1 minus the others), so that the value is an upper bound on the
    minimum (a float head computed from a closed form sums to 1 only within rounding)."""
    with mp.workdps(DPS):
        Xm, Qm, Am = _matrix(X), _matrix(Q), _matrix(A)
        if feasible:
            for j in range(len(Am[0])):
                top = max(range(len(Am)), key=lambda y: Am[y][j])
                Am[top][j] = 1 - mpmath.fsum(Am[y][j] for y in range(len(Am)) if y != top)
        total = mpf(0)
        for x, q in zip(Xm, Qm):
            for y, row in enumerate(Am):
                total += _mixture_term(q[y], mpmath.fsum(a * h for a, h in zip(row, x)), loss)
        return total / len(Xm)


def two_class_mixture_optimum(X, Q, loss: str, *, iterations: int = 80):
    r"""Minimum of the two-class mixture objective over :math:`A = (a, 1-a)`, :math:`a\in[0,1]^m`, by damped
    Newton in extended precision from :math:`a = 1/2`, for instances whose optimum is interior: returns the
    optimum value, or ``None`` when an iterate reaches the box's boundary (no verdict) or the gradient does not
    vanish to 1e-40 (the first-order condition of this convex problem certifies the minimum)."""
    with mp.workdps(DPS):
        Xm, Qm = _matrix(X), _matrix(Q)
        m = len(Xm[0])

        def value(a):
            A = [a, [1 - v for v in a]]
            total = mpf(0)
            for x, q in zip(Xm, Qm):
                for y in range(2):
                    p = mpmath.fsum(A[y][j] * x[j] for j in range(m))
                    if p <= 0:
                        return mpmath.inf
                    total += _mixture_term(q[y], p, loss)
            return total / len(Xm)

        def derivatives(a):
            g, H = [mpf(0)] * m, [[mpf(0)] * m for _ in range(m)]
            for x, q in zip(Xm, Qm):
                p0 = mpmath.fsum(a[j] * x[j] for j in range(m))
                p1 = mpmath.fsum((1 - a[j]) * x[j] for j in range(m))
                if loss == "reverse_kl":
                    d = (mpmath.log(p0) - mpmath.log(q[0])) - (mpmath.log(p1) - mpmath.log(q[1]))
                    c = 1 / p0 + 1 / p1
                else:  # forward KL / CE
                    d = -q[0] / p0 + q[1] / p1
                    c = q[0] / p0**2 + q[1] / p1**2
                for j in range(m):
                    g[j] += d * x[j]
                    for l in range(m):
                        H[j][l] += c * x[j] * x[l]
            n = len(Xm)
            return [v / n for v in g], mpmath.matrix([[v / n for v in row] for row in H])

        a = [mpf(1) / 2] * m
        current = value(a)
        for _ in range(iterations):
            g, H = derivatives(a)
            if max(abs(v) for v in g) < mpf(10) ** -40:
                return current
            step = mpmath.lu_solve(H, mpmath.matrix(g))
            t = mpf(1)
            while True:
                trial = [a[j] - t * step[j] for j in range(m)]
                if all(0 < v < 1 for v in trial):
                    v = value(trial)
                    if v <= current:
                        break
                t /= 2
                if t < mpf(10) ** -30:
                    return None
            if t < 1 and not all(0 < v < 1 for v in [a[j] - step[j] for j in range(m)]):
                return None  # the full step leaves the box: the optimum may be on its boundary
            a, current = trial, v
        return None
