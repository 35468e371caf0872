r"""Scale-invariant column handling and provable positive definiteness, for the certificates of the squared and
softmax solvers.

A certificate must hold for the problem *as stated*: the column space of the design :math:`Z` in exact
arithmetic, whatever the units of its columns. Three pieces make that possible:

* :func:`power_of_two_scales`: every column is divided by a power of two close to its norm. Multiplying by a
  power of two is exact in floating point (barring under/overflow), so :math:`Z_s = Z D` spans exactly the same
  space and every rank decision taken on :math:`Z_s` is independent of the columns' units (features
  :math:`\times10^{-20}` and :math:`\times10^{20}` give bit-identical :math:`Z_s`).
* :func:`exactly_redundant_columns`: columns that can be removed without changing the exact column space:
  zero columns, all-but-one constant column, and columns bitwise equal to :math:`\pm` an earlier one after
  scaling. Any other dependency (e.g. ``[a, 3a]``, where ``3a`` was rounded) is *not* exact, and a
  certificate that ignored it would be about a different problem; those cases are left to
  :func:`positive_definite_bound`, which then fails to prove anything.
* :func:`positive_definite_bound`: from a computed symmetric matrix :math:`\hat M` and a bound on
  :math:`\|M - \hat M\|_2` (the rounding in forming it), a factor :math:`\rho < 1` with
  :math:`M \succeq (1-\rho)LL^\top` for the computed Cholesky factor :math:`L`, or "not provable".
* :func:`shift_is_below_the_spectrum`: a proof of :math:`\lambda_{\min}(M) \ge t` for a stored symmetric
  :math:`M` by one Cholesky factorisation of :math:`M - (t + c)I` (no inverse), for the mixture head's
  strong-convexity modulus.

Rounding model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.): :math:`\gamma_j =
ju/(1-ju)`, :math:`u = 2^{-53}`; inner products of length :math:`j` have error at most
:math:`\gamma_j|x|^\top|y|` (§3.1); Cholesky gives :math:`LL^\top = \hat M + \Delta`,
:math:`|\Delta|\le\gamma_{p+1}|L||L^\top|` (Thm 10.3); a computed inverse :math:`X` of :math:`LL^\top` is taken
to satisfy :math:`\|X - (LL^\top)^{-1}\|_2 \le \eta\,\|(LL^\top)^{-1}\|_2` with
:math:`\eta = 4p^2u\,\mathrm{cond}(L)` (the triangular-inverse bounds of Ch. 14 with a safety factor; the
certificate is refused when :math:`\eta > 0.1`).
"""

from __future__ import annotations

import torch

__all__ = ["cholesky_ex", "unit_roundoff_gamma", "rounded_up", "power_of_two_scales", "exactly_redundant_columns",
           "PositiveDefiniteBound", "positive_definite_bound", "shift_is_below_the_spectrum", "frobenius_norm_squared",
           "derivative_term_magnitude"]

_U = 2.0**-53


def unit_roundoff_gamma(count, dtype=torch.float64):
    r""":math:`\gamma_j = ju/(1-ju)` (Higham §3.1), for a number or a tensor of counts, with :math:`u` the unit
    roundoff of ``dtype`` (float64 unless given); ``inf`` once :math:`ju \ge 1/2` (the formula turns negative
    at :math:`ju > 1`, where no such bound exists: a count that grows with the logits' range reaches it near a
    range of 4.5e15). The one definition every solver and check uses."""
    x = count * (_U if dtype == torch.float64 else torch.finfo(dtype).eps / 2)
    if isinstance(x, torch.Tensor):
        return torch.where(x < 0.5, x / (1 - x), torch.full_like(x, float("inf")))
    return x / (1 - x) if x < 0.5 else float("inf")


def rounded_up(x, count):
    r"""Upper bound on the exact value :math:`x \ge 0` of an expression whose computed value ``x`` is
    :math:`\hat x = x(1+\theta)`, :math:`|\theta|\le\gamma_c` with :math:`c` = ``count`` (a number or a tensor):
    the value of at most :math:`c` rounded operations on nonnegative terms (products, quotients, square roots,
    sums of nonnegative numbers: no cancellation; a correctly rounded square root counts once, a library
    ``exp``/``log`` within 1 ulp counts twice), Higham Lemma 3.1.

    Returned: :math:`\mathrm{fl}(\hat x\cdot\mathrm{fl}(1+\gamma_{2c+2})) \ge x`. Why: :math:`x \le \hat x/(1-\gamma_c)`
    and the result is :math:`\ge \hat x(1+\gamma_{2c+2})(1-u)^2`; with :math:`a = cu`,
    :math:`(1+\gamma_{2c+2})(1-u)^2(1-\gamma_c) = \frac{(1-u)^2(1-2a)}{(1-a)(1-2a-2u)} \ge 1`, since
    :math:`(1-u)^2(1-2a) - (1-a)(1-2a-2u) = a(1-2a+2u-2u^2) + u^2 > 0` for :math:`a < 1/2` (the rounding of
    :math:`\gamma` itself, relative :math:`2u`, is a second-order :math:`O(cu^2)` term inside that first-order
    margin :math:`cu`). Valid in the normal range (results above :math:`2^{-1022}`; the certificates' bounds
    are at least about :math:`u^2`). ``inf`` stays ``inf``; ``count`` with :math:`cu\ge1/4` gives ``inf``."""
    return x * (1 + unit_roundoff_gamma(2 * count + 2))


def power_of_two_scales(Z: torch.Tensor) -> torch.Tensor:
    r"""Per-column powers of two :math:`2^{-e_j}` with :math:`2^{e_j}` within a factor :math:`\sqrt2` of the column
    norm (1 for a zero column), shape ``(..., d)``: ``Z * scales[..., None, :]`` is exact and has column norms in
    :math:`[1/\sqrt2, \sqrt2]`."""
    norms = Z.norm(dim=-2)
    exponents = torch.where(norms > 0, torch.round(torch.log2(norms.clamp_min(1e-300))), torch.zeros_like(norms))
    return torch.ldexp(torch.ones_like(norms), (-exponents).to(torch.int32))


def exactly_redundant_columns(Zs: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    r"""Columns of the scaled design ``(..., n, d)`` whose removal leaves the exact column space unchanged:
    zero columns, constant columns other than the last constant one, and columns bitwise equal to
    :math:`\pm` an earlier kept column. Returns a boolean mask ``(..., d)`` (True = redundant).

    ``gram``: the computed :math:`Z_s^\top Z_s` ``(..., d, d)``, when the caller has it. Candidates are then
    taken from it instead of from passes over the design, and only they are compared exactly: a zero column
    has :math:`\hat G_{jj} = 0`; a constant column :math:`a\mathbf 1` has :math:`\hat G_{jj}` within
    :math:`\gamma_n` of :math:`na^2`; a column equal to :math:`\pm` another has :math:`|\hat G_{ij}|` within
    :math:`2\gamma_n` of :math:`\sqrt{\hat G_{ii}\hat G_{jj}}` (both are sums of the same :math:`n` squares);
    the tests below leave a relative slack of :math:`10^{-9} + 4\gamma_n` around these, so every exact case
    is a candidate and the result is the same as without ``gram``."""
    if gram is not None:
        return _redundant_from_gram(Zs, gram)
    zero = (Zs == 0).all(dim=-2)
    constant = (Zs == Zs[..., :1, :]).all(dim=-2) & ~zero
    # Keep the last constant column (the bias, when there is one): drop constant columns with a later constant.
    later_constant = constant.flip(-1).to(torch.int64).cumsum(-1).flip(-1) - constant.to(torch.int64) > 0
    redundant = zero | (constant & later_constant)
    d = Zs.shape[-1]
    if d > 1:
        # Candidates for +-duplicates: equal fingerprints (a cheap filter), then an exact comparison.
        weights = torch.linspace(1.0, 2.0, Zs.shape[-2], dtype=Zs.dtype, device=Zs.device)
        fingerprint = (Zs.abs() * weights[:, None]).sum(dim=-2)  # (..., d)
        close = (fingerprint[..., :, None] - fingerprint[..., None, :]).abs() <= 1e-9 * fingerprint[..., :, None]
        redundant = _exact_duplicates(Zs, close, zero, redundant)
    return redundant


def _redundant_from_gram(Zs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """:func:`exactly_redundant_columns` with candidates from the Gram matrix ``gram``."""
    n = Zs.shape[-2]
    slack = 1e-9 + 4 * unit_roundoff_gamma(n)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    first = Zs[..., 0, :]
    zero = _columns_where(Zs, diag == 0, lambda columns: (columns == 0).all(dim=-1))
    maybe_constant = ((diag - n * first**2).abs() <= slack * diag) & ~zero
    constant = _columns_where(Zs, maybe_constant, lambda columns: (columns == columns[..., :1]).all(dim=-1))
    later_constant = constant.flip(-1).to(torch.int64).cumsum(-1).flip(-1) - constant.to(torch.int64) > 0
    redundant = zero | (constant & later_constant)
    if Zs.shape[-1] > 1:
        close = gram.abs() >= (1 - slack) * (diag[..., :, None] * diag[..., None, :]).sqrt()
        redundant = _exact_duplicates(Zs, close, zero, redundant)
    return redundant


def _columns_where(Zs: torch.Tensor, candidates: torch.Tensor, test) -> torch.Tensor:
    """``candidates`` ``(..., d)`` narrowed to the columns for which ``test`` (on columns ``(N, n)``) holds."""
    out = torch.zeros_like(candidates)
    if bool(candidates.any()):
        out[candidates] = test(Zs.mT[candidates])
    return out


def _exact_duplicates(Zs: torch.Tensor, close: torch.Tensor, zero: torch.Tensor, redundant: torch.Tensor):
    r"""``redundant`` plus the columns bitwise equal to :math:`\pm` an earlier kept column, among the candidate
    pairs ``close`` ``(..., d, d)``."""
    d = Zs.shape[-1]
    close = close & torch.ones(d, d, dtype=torch.bool, device=Zs.device).tril(-1)  # pairs (j, i) with i < j
    close = close & ~zero[..., :, None] & ~zero[..., None, :]
    if bool(close.any()):
        flat = Zs.reshape(-1, *Zs.shape[-2:])
        flat_close = close.reshape(-1, d, d)
        flat_red = redundant.reshape(-1, d).clone()
        for b, j, i in flat_close.nonzero().tolist():
            if flat_red[b, i] or flat_red[b, j]:
                continue
            col_j, col_i = flat[b, :, j], flat[b, :, i]
            if torch.equal(col_j, col_i) or torch.equal(col_j, -col_i):
                flat_red[b, j] = True
        redundant = flat_red.reshape(redundant.shape)
    return redundant


class PositiveDefiniteBound:
    r"""Outcome of :func:`positive_definite_bound`, batched: ``ok`` (proved), the Cholesky factor ``L`` and inverse
    ``X`` of :math:`\hat M`, ``rho`` with :math:`M\succeq(1-\rho)LL^\top`, ``eta`` (relative accuracy of ``X``),
    ``trace_inverse`` :math:`\mathrm{tr}(X)` and ``inverse_bound`` :math:`\ge\|(LL^\top)^{-1}\|_2`."""

    def __init__(self, ok, L, X, rho, eta, trace_inverse, inverse_bound):
        self.ok, self.L, self.X, self.rho, self.eta = ok, L, X, rho, eta
        self.trace_inverse, self.inverse_bound = trace_inverse, inverse_bound

    def inverse_norm(self) -> torch.Tensor:
        r"""Upper bound on :math:`\|L^{-1}\|_2 = \|(LL^\top)^{-1}\|_2^{1/2}`."""
        return self.inverse_bound.sqrt()


def positive_definite_bound(M: torch.Tensor, error: torch.Tensor, factor=None) -> PositiveDefiniteBound:
    r"""Prove :math:`M \succ 0` for the exact matrix :math:`M` with :math:`\|M - \hat M\|_2\le` ``error``
    (``M`` is the computed :math:`\hat M`, ``(B, p, p)``).

    With :math:`LL^\top = \hat M + \Delta` (Cholesky), :math:`\|\Delta\|_2 \le \gamma_{p+1}\|L\|_F^2 =
    \gamma_{p+1}\mathrm{tr}(LL^\top)`. Bound on :math:`\Lambda = \|(LL^\top)^{-1}\|_2` from the computed inverse
    :math:`X`: every eigenvalue of :math:`X` is within :math:`\eta\Lambda` of the matching one of
    :math:`(LL^\top)^{-1}` (Weyl), so the largest is :math:`\ge(1-\eta)\Lambda` and the other :math:`p-1` are
    :math:`\ge-\eta\Lambda`: :math:`\mathrm{tr}(X)\ge(1-p\eta)\Lambda`, i.e. :math:`\Lambda\le
    \mathrm{tr}(X)/(1-p\eta)` (``inverse_bound``; :math:`+\infty` unless :math:`p\eta < 1`). With :math:`\delta` =
    ``error`` + :math:`\gamma_{p+1}\|L\|_F^2`, :math:`M \succeq LL^\top - \delta I \succeq
    (1-\rho)LL^\top` for :math:`\rho = \delta\Lambda` (``inverse_bound``, :math:`\delta` and :math:`\rho` are
    each rounded up by the count of their own roundings, :func:`rounded_up`). Proved (``ok``) when the
    factorisation succeeded, :math:`\eta\le 0.1`, :math:`p\eta\le 1/2` and :math:`\rho\le 1/2`. ``factor``: the output ``(L, info)`` of
    :func:`cholesky_ex` of ``M`` when the caller has it already."""
    p = M.shape[-1]
    L, info = cholesky_ex(M) if factor is None else factor
    factored = info == 0
    safe_L = torch.where(factored[:, None, None], L, torch.eye(p, dtype=M.dtype, device=M.device).expand_as(L))
    X = torch.cholesky_inverse(safe_L)
    trace_inverse = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace = (safe_L**2).sum(dim=(-2, -1))
    cond_L = (trace * trace_inverse).clamp_min(0).sqrt()
    eta = 4 * p * p * _U * cond_L
    margin = 1 - p * eta
    # Rounded up (rounded_up) by their counts: tr(X) a sum of p terms, 1 - p eta (no cancellation: p eta <= 1/2
    # where it matters) 2, the quotient 1; tr(LL^T) a sum of p(p+1)/2 squares, gamma (2), the product and the
    # sum 2; rho's product 1.
    inverse_bound = torch.where(margin > 0, rounded_up(trace_inverse / margin.clamp_min(1e-300), p + 3),
                                torch.full_like(trace_inverse, float("inf")))
    delta = rounded_up(error + unit_roundoff_gamma(p + 1) * trace, p * (p + 1) // 2 + 5)
    rho = rounded_up(delta * inverse_bound, 1)
    ok = (factored & torch.isfinite(rho) & (eta <= 0.1) & (p * eta <= 0.5) & (rho <= 0.5)
          & (trace_inverse > 0))
    return PositiveDefiniteBound(ok, safe_L, X, rho, eta, trace_inverse, inverse_bound)


def shift_is_below_the_spectrum(M: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    r"""Whether :math:`\lambda_{\min}(M) \ge t` is proved for the stored symmetric ``M`` ``(b, p, p)`` and
    ``shift`` :math:`t`, by one Cholesky factorisation (after Rump 2006, "Verification of positive
    definiteness"): :math:`\hat S = \mathrm{fl}(M - (t + c)I)`, whose diagonal is rounded once
    (:math:`|\hat S_{jj} - (M_{jj} - t - c)| \le u|\hat S_{jj}|/(1-u)`), factors to completion only if
    :math:`LL^\top = \hat S + \Delta` with :math:`|\Delta| \le \gamma_{p+1}|L||L^\top|` (Higham, Thm 10.3), so
    :math:`\|\Delta\|_2 \le \gamma_{p+1}\|L\|_F^2 \le \gamma_{p+1}\mathrm{tr}\,\hat S/(1-\gamma_{p+1})`
    and :math:`M - tI \succeq (c(1-u) - ut - \|\Delta\|_2 - u\max|\hat S_{jj}|/(1-u))I` (the subtracted
    :math:`\mathrm{fl}(t + c)` is rounded too). ``c`` is twice that bound, taken from the trace of
    :math:`M - tI`, and checked against the factored matrix's own."""
    p = M.shape[-1]
    eye = torch.eye(p, dtype=M.dtype, device=M.device)
    g = unit_roundoff_gamma(p + 1)
    diag = M.diagonal(dim1=-2, dim2=-1)
    room = (g / (1 - g) * (diag - shift[:, None]).clamp_min(0).sum(-1) * (1 + unit_roundoff_gamma(p + 2))
            + 2 * _U * (diag.abs().amax(-1) + shift)) * 2
    S = M - (shift + room)[:, None, None] * eye
    _, info = cholesky_ex(S)
    S_diag = S.diagonal(dim1=-2, dim2=-1)
    needed = (g / (1 - g) * S_diag.clamp_min(0).sum(-1) * (1 + unit_roundoff_gamma(p + 2))
              + _U / (1 - _U) * S_diag.abs().amax(-1)) * (1 + 4 * _U)
    # the subtracted fl(t + c) is at least (t + c)(1 - u), so c (1 - u) - u t must cover the two errors
    return (info == 0) & (room * (1 - _U) - _U * shift >= needed) & torch.isfinite(room)


def cholesky_ex(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex(M)``, with ``info`` also nonzero (``p``: the last minor) where the factor is not
    finite. On CUDA ``cholesky_ex`` reports success for a matrix with NaN entries (its pivot test is false for
    NaN), on the CPU it does not: every factorisation here goes through this function, so that a solver and a
    certificate treat such a matrix alike on either device."""
    L, info = torch.linalg.cholesky_ex(M)
    finite = torch.isfinite(L).flatten(-2).all(-1)
    return L, torch.where(finite | (info != 0), info, torch.full_like(info, M.shape[-1]))


def frobenius_norm_squared(Z: torch.Tensor) -> torch.Tensor:
    """``||Z||_F^2`` over the last two axes, rounded up (:func:`rounded_up`: a sum of ``N`` squares carries
    ``N`` roundings per term)."""
    n = Z.shape[-2] * Z.shape[-1]
    return rounded_up((Z**2).sum(dim=(-2, -1)), n)



def blocked_sum(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    r"""Sum over the last axis in two explicit levels (blocks of about :math:`\sqrt n`, then the block sums), and
    the count :math:`j` with :math:`|\hat s - s| \le \gamma_j\sum|x_i|`. Any summation order of :math:`\ell` terms
    errs by at most :math:`\gamma_{\ell-1}\sum|x_i|` (Higham §4.2), so two levels give
    :math:`j = (b-1) + (\lceil n/b\rceil - 1)`, about :math:`2\sqrt n` instead of :math:`n`."""
    n = values.shape[-1]
    block = max(1, int(n**0.5))
    count = -(-n // block)
    pad = block * count - n
    if pad:
        values = torch.cat([values, values.new_zeros((*values.shape[:-1], pad))], dim=-1)
    total = values.reshape(*values.shape[:-1], count, block).sum(dim=-1).sum(dim=-1)
    return total, max(block - 1, 0) + max(count - 1, 0)


def derivative_term_magnitude(name: str, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    r"""Sum of the magnitudes of the terms the derivative :math:`\ell'(q, p)` of loss ``name`` is computed from
    (its rounding is a few units of roundoff of this; non-finite only at ``p = 0`` or ``q = 0``, where the
    derivative is infinite or pinned); ``None`` for a loss without a stated formula."""
    log_p, log_q = torch.log(p).abs(), torch.log(q).abs()
    if name in ("forward_kl", "forward_ce"):  # -q/p
        return q / p
    if name == "reverse_kl":  # log p - log q + 1
        return log_p + log_q + 1
    if name == "reverse_ce":  # -log q
        return log_q
    if name == "squared":  # 2(p - q)
        return 2 * (p + q)
    if name in ("bregman:negative_entropy", "bregman:generalized_kl"):  # log p - log q
        return log_p + log_q + 2
    if name == "bregman:itakura_saito":  # 1/q - 1/p
        return 1 / p + 1 / q
    if name == "bregman:squared_norm":  # 2p - 2q
        return 2 * (p + q)
    if name == "js":  # (log p - log((p + q)/2)) / 2
        return 0.5 * (log_p + torch.log((p + q) / 2).abs())
    if name == "jeffreys":  # log p - log q + 1 - q/p
        return log_p + log_q + 1 + q / p
    if name == "hellinger":  # 1 - sqrt(q/p)
        return 1 + torch.sqrt(q / p)
    if name == "chi2":  # 2(p - q)/q
        return 2 * (p + q) / q
    if name == "reverse_chi2":  # 1 - (q/p)^2
        return 1 + (q / p) ** 2
    if name.startswith("tv"):  # bounded by 1 in magnitude, a few operations
        return torch.full_like(p, 2.0)
    return None
