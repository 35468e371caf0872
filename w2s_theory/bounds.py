r"""The :math:`\sqrt{\cdot}`-bounds (Lemma 1 of docs/theory.md): constants derived with sympy, the bounds as checks, and
an auditor for candidate constants.

Statement (docs/theory.md, "Lemma 1 and the tighter lower bound"): with :math:`L(A, B) = \mathbb E\,\mathrm{KL}(A\|B)`,
:math:`d` the KL disagreement between teacher and student in either direction,

.. math::

    |L(F^*, F_w) - L(F^*, F_{sw})| \;\le\; C\,\sqrt{d(F_w, F_{sw})},\qquad
    d = \mathbb E\,\mathrm{KL}(F_{sw}\|F_w)\ \text{(reverse)}\ \text{or}\ \mathbb E\,\mathrm{KL}(F_w\|F_{sw})\ \text{(forward)},

when every probability of :math:`F_w` and :math:`F_{sw}` is at least :math:`\gamma`. Its two halves are the
*upper* bound :math:`L(F^*,F_{sw}) \le L(F^*,F_w) + C\sqrt d` and the *lower* bound
:math:`L(F^*,F_{sw}) \ge L(F^*,F_w) - C\sqrt d` on the student's error. The paper (Yao et al. 2025) states
such bounds with constants :math:`C_1, C_2` that are **not known here**; nothing in this module is the paper's
constant. What is here:

* :func:`provable_sqrt_constant` :math:`= 1/(\sqrt2\gamma)` (docs/theory.md's provable version);
* :func:`sharp_binary_constant` :math:`= \sqrt{2(1-\gamma)/\gamma}`, the supremum of the ratio over all
  instances (docs/theory.md, checked numerically and by :func:`audit_constant`; the local analysis in
  :func:`derive_constants` shows it does not depend on the number of classes);
* :func:`hellinger_sqrt_constant` :math:`= 2/\sqrt\gamma`, a provable constant derived here through the
  Hellinger distance, tighter than :math:`1/(\sqrt2\gamma)` whenever :math:`\gamma < 1/8`;
* :func:`derive_constants`: the sympy derivations and the relations between the constants.

Why no optimality certificate is needed: :math:`L(F^*,F_w) - L(F^*,F_{sw}) = \mathbb E\sum_y F^*_y\log(F_{sw,y}/F_{w,y})`
for *any* three models, and each constant above bounds it for *every* pair :math:`(F_w, F_{sw})` with floor
:math:`\gamma`, optimal or not. So :func:`sqrt_bound` evaluates an inequality that is exact for the computed
student (certificate 0, only a floating-point rounding bound), and every violating pair is a legitimate
counterexample even to a version of the lemma stated for trained students: :math:`F_{sw}` is the exact
projection of :math:`F_w` onto the (convex) singleton class :math:`\{F_{sw}\}`.

The cross-entropy versions (``loss="ce"``): :math:`L_{CE}(F^*, F) = L(F^*, F) + \mathbb E H(F^*)`, so the left-hand
side is unchanged, while :math:`d_{CE} = d + \mathbb E H(\cdot) \ge d`; every KL bound implies its CE version.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import sympy as sp

from .bregman import NEGATIVE_ENTROPY, rounding_bound, verdict
from .divergences import cross_entropy, kl
from .theorems import TheoremResult

__all__ = [
    "GAMMA",
    "provable_sqrt_constant",
    "sharp_binary_constant",
    "hellinger_sqrt_constant",
    "range_bound",
    "derive_constants",
    "parse_constant",
    "MAX_EXPONENT",
    "sqrt_bound",
    "sharp_limit_instance",
    "exact_ratio",
    "AuditResult",
    "audit_constant",
    "DIRECTIONS",
    "SIDES",
]

#: The probability floor as a sympy symbol (the only free symbol a candidate constant may use).
GAMMA = sp.Symbol("gamma", positive=True)
DIRECTIONS = ("reverse", "forward")
SIDES = ("both", "upper", "lower")

SOURCE_PROVABLE = "docs/theory.md (provable version: Lipschitz log + Pinsker + Jensen)"
SOURCE_SHARP = "docs/theory.md (sharp constant, numerical); local limit derived in w2s_theory.bounds"


def _check_gamma(gamma) -> float:
    g = float(gamma)
    if not (0 < g <= 0.5) or not math.isfinite(g):
        raise ValueError(f"gamma: the probability floor must be in (0, 1/2] (two classes need 2*gamma <= 1), "
                         f"got {gamma!r}")
    return g


def provable_sqrt_constant(gamma: float) -> float:
    r"""The provable constant :math:`C(\gamma) = 1/(\sqrt2\,\gamma)`, valid for both directions of :math:`d`.

    Derivation (docs/theory.md; reproduced symbolically by :func:`derive_constants`): for probabilities in
    :math:`[\gamma, 1]`, :math:`\log` is :math:`L`-Lipschitz with :math:`L = \max_{p\in[\gamma,1]} 1/p = 1/\gamma`, so
    :math:`|\sum_y F^*_y\log(a_y/b_y)| \le \max_y|\log a_y - \log b_y| \le \max_y|a_y - b_y|/\gamma \le
    \mathrm{TV}(a, b)/\gamma`. Pinsker, :math:`\mathrm{TV}(a,b) \le \sqrt{\mathrm{KL}/2}` (either direction, TV is
    symmetric), and Jensen, :math:`\mathbb E\sqrt{\mathrm{KL}} \le \sqrt{\mathbb E\,\mathrm{KL}}`, give
    :math:`|\text{gain}| \le \sqrt{d}/(\sqrt2\gamma)`.
    """
    return 1.0 / (math.sqrt(2.0) * _check_gamma(gamma))


def sharp_binary_constant(gamma: float) -> float:
    r"""The sharp constant :math:`C^*(\gamma) = \sqrt{2(1-\gamma)/\gamma}`: the supremum of
    :math:`|\text{gain}|/\sqrt d` over all instances with floor :math:`\gamma` (both directions, both signs).

    Derivation of the value (local limit, :func:`derive_constants`): put :math:`F^*` on a class :math:`y` where
    :math:`b_y = \gamma` and let :math:`a_y = \gamma + t`, the other classes giving up :math:`t` in proportion to
    their mass (the minimiser of the quadratic form of KL, by Lagrange). Then
    :math:`\log(a_y/b_y)^2 = t^2/\gamma^2 + O(t^3)` and :math:`\mathrm{KL} = t^2/(2\gamma(1-\gamma)) + O(t^3)` in
    either direction, so the squared ratio tends to :math:`2(1-\gamma)/\gamma` as :math:`t\to0`, from below
    (the first-order coefficients are negative), for every number of classes. That nothing exceeds it is
    docs/theory.md's numerical finding, re-checked by :func:`audit_constant` and the paper check
    ``sharp_constant_attainment``; the supremum is approached, never attained. (The team's first notes quoted 44.67 at
    :math:`\gamma = 10^{-3}`; the value is :math:`\sqrt{1998} = 44.699`.)
    """
    g = _check_gamma(gamma)
    return math.sqrt(2.0 * (1.0 - g) / g)


def hellinger_sqrt_constant(gamma: float) -> float:
    r"""A provable constant derived here (not docs/theory.md's, not the paper's): :math:`C_H(\gamma) = 2/\sqrt\gamma`.

    :math:`|\log a - \log b| = 2|\log\sqrt a - \log\sqrt b| \le 2|\sqrt a - \sqrt b|/\sqrt\gamma` (log is
    :math:`1/\sqrt\gamma`-Lipschitz on :math:`[\sqrt\gamma, 1]`), and
    :math:`\max_y(\sqrt{a_y} - \sqrt{b_y})^2 \le \sum_y(\sqrt{a_y}-\sqrt{b_y})^2 = 2(1 - \mathrm{BC}) \le
    -2\log\mathrm{BC} \le \mathrm{KL}` in either direction (Rényi divergence of order 1/2 below KL). With Jensen,
    :math:`|\text{gain}| \le (2/\sqrt\gamma)\sqrt d`. It is within :math:`\sqrt{2/(1-\gamma)}` of the sharp constant
    and below :math:`1/(\sqrt2\gamma)` exactly when :math:`\gamma < 1/8`: the :math:`1/\gamma` rate of the
    provable constant is an artefact of the Lipschitz-plus-Pinsker route, the true rate is
    :math:`1/\sqrt\gamma`.
    """
    return 2.0 / math.sqrt(_check_gamma(gamma))


def range_bound(gamma: float, k: int = 2) -> float:
    r"""The trivial bound :math:`|\text{gain}| \le \max_y|\log(a_y/b_y)| \le \log\frac{1-(k-1)\gamma}{\gamma}`
    (all probabilities in :math:`[\gamma, 1-(k-1)\gamma]`): a :math:`\sqrt\cdot`-bound says something only for
    misfits below :math:`(\text{range}/C)^2`."""
    g = _check_gamma(gamma)
    if k * g > 1:
        raise ValueError(f"k = {k} classes cannot all have probability >= gamma = {g}")
    return math.log((1 - (k - 1) * g) / g)


# --------------------------------------------------------------------------------------------------------
# Symbolic derivations
# --------------------------------------------------------------------------------------------------------


def _binary_kl(a, b):
    return a * sp.log(a / b) + (1 - a) * sp.log((1 - a) / (1 - b))


@functools.lru_cache(maxsize=1)
def derive_constants() -> dict:
    r"""The sympy derivations behind the constants, as a dict of simplified expressions in :data:`GAMMA`.

    Keys:

    * ``log_lipschitz``: :math:`\max_{p\in[\gamma,1]}\frac{d}{dp}\log p = 1/\gamma` (computed with the floor
      written as :math:`\gamma = 1/(2+v)`, :math:`v\ge0`, so that sympy knows :math:`\gamma\le1/2`);
    * ``provable``: ``log_lipschitz`` times the Pinsker factor :math:`\sqrt{1/2}`, i.e. :math:`\sqrt2/(2\gamma)`;
    * ``sharp_squared_reverse`` / ``sharp_squared_forward``: the limit :math:`t\to0` of
      :math:`\log((\gamma+t)/\gamma)^2/\mathrm{KL}` for :math:`a = (\gamma + t, 1-\gamma-t)`, :math:`b = (\gamma, 1-\gamma)`
      with :math:`\mathrm{KL}(a\|b)` resp. :math:`\mathrm{KL}(b\|a)` (series to third order); both are
      :math:`2(1-\gamma)/\gamma`;
    * ``sharp_slope_reverse`` / ``sharp_slope_forward``: the first-order coefficients :math:`\alpha` of those
      series, :math:`\text{ratio}^2 = C^{*2} + \alpha t + O(t^2)`; both negative, so the limit is approached
      from below;
    * ``sharp_squared_three_classes``: the same limit for :math:`k = 3` with the compensating change
      :math:`(\delta_2,\delta_3)` chosen by Lagrange to minimise the quadratic form
      :math:`\tfrac12\sum_z\delta_z^2/b_z` of KL; it equals ``sharp_squared_reverse`` whatever :math:`b_2, b_3`
      (the constant does not depend on the number of classes);
    * ``sharp``: :math:`\sqrt{2(1-\gamma)/\gamma}`;
    * ``hellinger``: :math:`2/\sqrt\gamma` (see :func:`hellinger_sqrt_constant`);
    * ``sharp_over_provable``: :math:`C^*/C = 2\sqrt{\gamma(1-\gamma)} \le 1`, equal to 1 only at
      :math:`\gamma = 1/2` (``sharp_equals_provable_at``);
    * ``hellinger_below_provable_below``: the root :math:`\gamma = 1/8` of :math:`C_H = C`;
    * ``informative_misfit``: :math:`2\gamma^2\log^2(1/\gamma)`, the misfit below which the provable bound
      :math:`C\sqrt d` beats the range bound :math:`\log(1/\gamma)`;
    * ``informative_peak``: where :math:`\gamma\log(1/\gamma)` (hence ``informative_misfit``) peaks,
      :math:`\gamma = 1/e`. This is where :math:`\gamma < 1/e` matters here: below :math:`1/e` (e.g. the
      example :math:`\gamma = 10^{-3}`), a smaller floor shrinks the range of misfits about which the provable
      bound says anything;
    * ``log_constant_gap``: :math:`C^{*2} - 2\log^2(1/\gamma)`, positive on :math:`(0, 1/2]` because with
      :math:`u = 1/\gamma` it is :math:`2(u - 1 - \log^2u)`, zero at :math:`u = 1` and increasing
      (derivative :math:`1 - 2\log(u)/u \ge 1 - 2/e > 0`, since :math:`\log(u)/u` peaks at :math:`u = e`):
      any constant of order :math:`\log(1/\gamma)` with factor :math:`\le\sqrt2` — e.g. the docs/design.md example
      ``sqrt(2)*log(1/gamma)`` — is below :math:`C^*` for every :math:`\gamma` and cannot hold uniformly.

    The paper's own "tighter lower bound" relation (its :math:`C_2 \le C_1` for :math:`\gamma < 1/e`) could not be
    reconstructed without the paper's text and is not claimed here. Note that the supremum of the *one-sided*
    ratios (gain alone, or minus gain alone) is also :math:`C^*` (the local limit can be taken with either sign),
    so no lower-bound constant below :math:`C^*` can hold uniformly either.
    """
    g, t, p, v = GAMMA, sp.Symbol("t", positive=True), sp.Symbol("p", positive=True), sp.Symbol("v", nonnegative=True)
    out: dict = {}
    floor = 1 / (2 + v)  # gamma in (0, 1/2]
    lip = sp.maximum(sp.diff(sp.log(p), p), p, sp.Interval(floor, 1))
    out["log_lipschitz"] = sp.simplify(lip.subs(v, 1 / g - 2))
    out["provable"] = sp.simplify(out["log_lipschitz"] * sp.sqrt(sp.Rational(1, 2)))

    num = sp.series(sp.log((g + t) / g) ** 2, t, 0, 4).removeO()
    for name, den in (("reverse", _binary_kl(g + t, g)), ("forward", _binary_kl(g, g + t))):
        series = sp.series(num / sp.series(den, t, 0, 4).removeO(), t, 0, 2).removeO()
        out[f"sharp_squared_{name}"] = sp.simplify(series.subs(t, 0))
        out[f"sharp_slope_{name}"] = sp.factor(sp.simplify(sp.diff(series, t).subs(t, 0)))

    b2, lam, d2, d3 = sp.symbols("b2 lambda d2 d3")
    b3 = 1 - g - b2
    stationary = [sp.diff(d2**2 / b2 + d3**2 / b3 - lam * (d2 + d3 + t), x) for x in (d2, d3)]
    solution = sp.solve(stationary + [d2 + d3 + t], [d2, d3, lam], dict=True)[0]
    quadratic = sp.simplify((t**2 / g + d2**2 / b2 + d3**2 / b3).subs(solution))
    out["sharp_squared_three_classes"] = sp.simplify((t / g) ** 2 / (quadratic / 2))

    out["sharp"] = sp.sqrt(2 * (1 - g) / g)
    out["hellinger"] = 2 / sp.sqrt(g)
    out["sharp_over_provable"] = sp.simplify(out["sharp"] / out["provable"])
    out["sharp_equals_provable_at"] = sp.solve(sp.Eq(out["sharp_over_provable"] ** 2, 1), g)
    out["hellinger_below_provable_below"] = sp.solve(sp.Eq(out["hellinger"], out["provable"]), g)[0]
    out["informative_misfit"] = sp.simplify((sp.log(1 / g) / out["provable"]) ** 2)
    out["informative_peak"] = sp.solve(sp.diff(g * sp.log(1 / g), g), g)[0]
    u = sp.Symbol("u", positive=True)
    out["log_constant_gap"] = sp.simplify(out["sharp"] ** 2 - 2 * sp.log(1 / g) ** 2)
    out["log_constant_gap_in_u"] = sp.expand(out["log_constant_gap"].subs(g, 1 / u))
    out["log_over_u_peak"] = sp.solve(sp.diff(sp.log(u) / u, u), u)[0]
    return out


# --------------------------------------------------------------------------------------------------------
# Candidate constants
# --------------------------------------------------------------------------------------------------------

_ALLOWED_NAMES = {
    "gamma": GAMMA, "g": GAMMA, "log": sp.log, "ln": sp.log, "sqrt": sp.sqrt, "exp": sp.exp, "e": sp.E,
    "E": sp.E, "pi": sp.pi, "abs": sp.Abs, "Abs": sp.Abs, "min": sp.Min, "max": sp.Max, "Min": sp.Min,
    "Max": sp.Max,
}


#: Limits that keep evaluating a candidate constant fast (``"9^9^9^9"`` would otherwise run for ever): the
#: longest expression and the largest ``|exponent|`` of any power; besides, every intermediate value must be
#: a finite double (so an exact integer never exceeds about 1e308).
MAX_EXPRESSION_LENGTH = 500
MAX_EXPONENT = 1000

#: Functions of a candidate constant: name -> (sympy function, float function, number of arguments).
_FUNCTIONS = {
    "log": (sp.log, None, (1, 2)), "ln": (sp.log, None, (1,)), "sqrt": (sp.sqrt, math.sqrt, (1,)),
    "exp": (sp.exp, math.exp, (1,)), "abs": (sp.Abs, abs, (1,)), "Abs": (sp.Abs, abs, (1,)),
    "min": (sp.Min, min, None), "Min": (sp.Min, min, None), "max": (sp.Max, max, None), "Max": (sp.Max, max, None),
}
_CONSTANTS = {"e": (sp.E, math.e), "E": (sp.E, math.e), "pi": (sp.pi, math.pi)}


def _float_log(*args) -> float:
    if len(args) == 1:
        return math.log(args[0])
    return math.log(args[0]) / math.log(args[1])


def _walk(node, expr: str, gamma: float | None):
    """``(sympy value, float value)`` of an expression tree (:mod:`ast`), checked node by node: only the
    allowed operations, every ``|exponent|`` at most :data:`MAX_EXPONENT`, every float finite. The float is
    ``None`` where it depends on ``gamma`` and ``gamma`` is ``None`` (then only gamma-free parts are
    checked); sympy values are built only after their float passed, so nothing huge is ever computed."""
    import ast

    def fail(why: str):
        raise ValueError(f"constant: {why} in {expr!r}")

    def number(x):
        if x is None:
            return None
        if isinstance(x, complex) or not math.isfinite(x):
            fail("a value that is not a finite real number (too large, or complex)")
        return float(x)

    def guard(f, *args):
        if any(a is None for a in args):
            return None
        try:
            return number(f(*args))
        except (OverflowError, ZeroDivisionError, ValueError, TypeError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("constant:"):
                raise
            fail(f"a value that cannot be evaluated ({type(exc).__name__}: {exc})")

    if isinstance(node, ast.Expression):
        return _walk(node.body, expr, gamma)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = node.value
        if isinstance(value, int) and value.bit_length() > 1024:
            fail("a number that is too large")
        return (sp.Integer(value) if isinstance(value, int) else sp.Float(repr(value))), number(float(value))
    if isinstance(node, ast.Name):
        if node.id in ("gamma", "g"):
            return GAMMA, gamma
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        fail(f"name {node.id!r} used as a value")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        s_val, f_val = _walk(node.operand, expr, gamma)
        return (s_val, f_val) if isinstance(node.op, ast.UAdd) else (-s_val, None if f_val is None else -f_val)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
        (ls, lf), (rs, rf) = _walk(node.left, expr, gamma), _walk(node.right, expr, gamma)
        if isinstance(node.op, ast.Pow):
            if rf is not None and abs(rf) > MAX_EXPONENT:
                fail(f"an exponent of size {abs(rf):.3g} (at most {MAX_EXPONENT} is allowed)")
            value = guard(lambda a, b: a ** b, lf, rf)
            return sp.Pow(ls, rs), value
        op = {ast.Add: (lambda a, b: a + b), ast.Sub: (lambda a, b: a - b), ast.Mult: (lambda a, b: a * b),
              ast.Div: (lambda a, b: a / b)}[type(node.op)]
        return op(ls, rs), guard(op, lf, rf)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        function, float_function, arity = _FUNCTIONS[node.func.id]
        if float_function is None:
            float_function = _float_log
        if (arity is not None and len(node.args) not in arity) or not node.args:
            fail(f"{node.func.id}() with {len(node.args)} arguments")
        parts = [_walk(a, expr, gamma) for a in node.args]
        return function(*(p[0] for p in parts)), guard(float_function, *(p[1] for p in parts))
    fail(f"{type(node).__name__} is not allowed (only numbers, gamma, + - * / ^ and "
         "log, sqrt, exp, abs, min, max)")


def _tree(text: str):
    import ast

    try:
        return ast.parse(text.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"constant: cannot parse {text!r} ({type(exc).__name__})") from None


def parse_constant(expr) -> sp.Expr:
    r"""A candidate constant as a sympy expression in :data:`GAMMA`: a number, a sympy expression, or a string
    such as ``"sqrt(2)*log(1/gamma)"`` (``^`` means power). Only numbers, ``+ - * / ^ ( ) ,`` and the names
    ``gamma log ln sqrt exp e pi abs min max`` are accepted (the string is read as a syntax tree and never
    evaluated as Python); anything else is a ``ValueError`` naming what is wrong. So that evaluation is always
    fast, an expression has at most :data:`MAX_EXPRESSION_LENGTH` characters, every exponent is at most
    :data:`MAX_EXPONENT` in size, and every gamma-free part is a finite double (``"9^9^9^9"`` is refused at
    once)."""
    if isinstance(expr, sp.Expr):
        parsed = expr
    elif isinstance(expr, (int, float)) and not isinstance(expr, bool):
        parsed = sp.Float(expr) if isinstance(expr, float) else sp.Integer(expr)
    elif isinstance(expr, str):
        text = expr.strip()
        if not text:
            raise ValueError("constant: empty expression; give a number or an expression in gamma")
        if len(text) > MAX_EXPRESSION_LENGTH:
            raise ValueError(f"constant: expression of {len(text)} characters; at most {MAX_EXPRESSION_LENGTH}")
        bad = re.findall(r"[^0-9A-Za-z_.+\-*/^(), \t]", text)
        if bad:
            raise ValueError(f"constant: character {bad[0]!r} is not allowed in {expr!r}")
        names = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text))
        unknown = sorted(names - set(_ALLOWED_NAMES))
        if unknown:
            raise ValueError(f"constant: unknown name {unknown[0]!r} in {expr!r}; use gamma and "
                             "log, sqrt, exp, e, pi, abs, min, max")
        if "**" in text:
            raise ValueError(f"constant: write powers as ^ in {expr!r}")
        try:
            parsed, _ = _walk(_tree(text), text, None)
        except RecursionError:
            raise ValueError(f"constant: {expr!r} is nested too deeply") from None
    else:
        raise ValueError(f"constant: expected a number, a string or a sympy expression, got {type(expr).__name__}")
    if not isinstance(parsed, sp.Expr):
        raise ValueError(f"constant: {expr!r} is not an expression")
    extra = parsed.free_symbols - {GAMMA}
    if extra:
        raise ValueError(f"constant: {expr!r} uses {sorted(map(str, extra))}; only gamma is allowed")
    return parsed


def _constant_value(parsed: sp.Expr, gamma: float, digits: int = 30) -> sp.Float:
    if parsed.free_symbols:
        # Every power and intermediate value at this gamma within the limits of parse_constant, before sympy.
        _walk(_tree(str(parsed)), str(parsed), float(gamma))
    value = sp.N(parsed.subs(GAMMA, sp.Float(gamma, digits)), digits)
    if not value.is_real or not value.is_finite or not value > 0:
        raise ValueError(f"constant: {parsed} evaluates to {value} at gamma = {gamma}; it must be a finite "
                         "positive number")
    return value


# --------------------------------------------------------------------------------------------------------
# The bounds as checks
# --------------------------------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=float)


def sqrt_bound(truth, teacher, student, *, side: str = "both", direction: str = "reverse", loss: str = "kl",
               gamma: float | None = None, constant: Callable[[float], float] | float = provable_sqrt_constant,
               name: str | None = None) -> TheoremResult:
    r"""The :math:`\sqrt\cdot`-bound on a batch of instances (arrays ``(..., n, k)``):

    * ``side="upper"``: :math:`L(F^*,F_{sw}) \le L(F^*,F_w) + C\sqrt d` (lhs :math:`L(F^*,F_{sw})`);
    * ``side="lower"``: :math:`L(F^*,F_{sw}) \ge L(F^*,F_w) - C\sqrt d` (written ``rhs - lhs >= 0`` with
      lhs :math:`= L(F^*,F_w) - C\sqrt d`, rhs :math:`= L(F^*,F_{sw})`);
    * ``side="both"``: :math:`|L(F^*,F_w) - L(F^*,F_{sw})| \le C\sqrt d`.

    :math:`L` is :math:`\mathbb E\,\mathrm{KL}(F^*\|\cdot)` (``loss="kl"``) or :math:`\mathbb E\,\mathrm{CE}(F^*,\cdot)`
    (``"ce"``); :math:`d` is :math:`\mathbb E\,\ell(F_{sw}, F_w)` (``direction="reverse"``) or
    :math:`\mathbb E\,\ell(F_w, F_{sw})` (``"forward"``) with the same :math:`\ell`. The floor is ``gamma`` if
    given (a ``ValueError`` if some probability of teacher or student is below it), else each instance's own
    floor :math:`\min(F_w, F_{sw})`; an instance with floor 0 is outside the lemma's hypothesis (its constant is
    infinite; ``details["applicable"]`` is False). ``constant`` is a function of :math:`\gamma` or a number.

    Certificate 0: the inequality holds for every pair with the floor, so the computed student is as good an
    instance as the exact one (module docstring); the rounding bound covers the evaluation. ``details``:
    ``tightness`` (left side / :math:`C\sqrt d`), ``ratio`` (the empirical constant :math:`\text{gain}/\sqrt d`),
    ``floor``, ``constant``, ``sharp_constant``, ``misfit``, ``gain``, ``applicable``.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if loss not in ("kl", "ce"):
        raise ValueError(f"loss must be 'kl' or 'ce', not {loss!r}")
    A, T, P = _np(truth), _np(teacher), _np(student)
    A, T, P = np.broadcast_arrays(A, T, P)
    ell = kl if loss == "kl" else cross_entropy
    floor = np.minimum(T.min(axis=(-1, -2)), P.min(axis=(-1, -2)))
    if gamma is not None:
        g = _check_gamma(gamma)
        if (floor < g * (1 - 1e-12)).any():
            raise ValueError(f"gamma: some teacher or student probability is {floor.min():.3g} < gamma = {g}")
        floor = np.full_like(floor, g)
    applicable = floor > 0
    with np.errstate(divide="ignore"):
        if callable(constant):
            C = np.array([constant(min(f, 0.5)) if f > 0 else np.inf for f in np.ravel(floor)]).reshape(floor.shape)
        else:
            C = np.where(applicable, float(constant), np.inf)
        sharp = np.array([sharp_binary_constant(min(f, 0.5)) if f > 0 else np.inf
                          for f in np.ravel(floor)]).reshape(floor.shape)
    err_w, err_s = ell(A, T).mean(-1), ell(A, P).mean(-1)
    d = (ell(P, T) if direction == "reverse" else ell(T, P)).mean(-1)
    gain = err_w - err_s
    root = np.sqrt(np.maximum(d, 0))
    with np.errstate(invalid="ignore"):
        bound = np.where(root == 0, 0.0, C * root)
    if side == "upper":
        lhs, rhs = err_s, err_w + bound
        deviation = -gain
    elif side == "lower":
        lhs, rhs = err_w - bound, err_s
        deviation = gain
    else:
        lhs, rhs = np.abs(gain), bound
        deviation = np.abs(gain)
    with np.errstate(invalid="ignore", divide="ignore"):
        slack = np.where(np.isinf(rhs) & (rhs > 0), np.inf, rhs - lhs)
        tightness = np.where(bound > 0, deviation / bound, np.where(deviation > 0, np.inf, 0.0))
        ratio = np.where(root > 0, gain / root, 0.0)
    nk = int(np.prod(A.shape[-2:]))
    d_pair = [(P, T)] if direction == "reverse" else [(T, P)]
    rnd = _np(rounding_bound(NEGATIVE_ENTROPY, [(A, T), (A, P)] + d_pair, nk))
    with np.errstate(invalid="ignore"):
        rnd = rnd + np.where(np.isfinite(C), C, 0.0) * np.sqrt(_np(rounding_bound(NEGATIVE_ENTROPY, d_pair, nk)))
    cert = np.zeros_like(slack)
    statement = {
        "upper": "L(F*,F_sw) <= L(F*,F_w) + C sqrt(d)",
        "lower": "L(F*,F_sw) >= L(F*,F_w) - C sqrt(d)",
        "both": "|L(F*,F_w) - L(F*,F_sw)| <= C sqrt(d)",
    }[side] + f"  (d = {direction} {loss.upper()}, floor gamma)"
    return TheoremResult(
        name or f"sqrt_bound_{side}_{direction}_{loss}", statement, SOURCE_PROVABLE, lhs, rhs, slack, cert, rnd,
        np.asarray(verdict(slack, cert, rnd)), False,
        {"tightness": tightness, "ratio": ratio, "floor": floor, "constant": C, "sharp_constant": sharp,
         "misfit": d, "gain": gain, "applicable": applicable},
    )


def sharp_limit_instance(gamma: float, tau, *, k: int = 2, sign: int = 1):
    r"""Instances on the path along which the ratio tends to :math:`C^*(\gamma)` (one sample each):
    :math:`F_w = (\gamma, \text{rest})`, :math:`F_{sw,0} = \gamma(1 + \tau)` with the other classes giving up
    :math:`\gamma\tau` in proportion to their mass, :math:`F^* = e_0`. ``sign=-1`` swaps teacher and student
    (the student at the floor). ``tau`` may be an array; returns ``(truth, teacher, student)`` of shape
    ``(len(tau), 1, k)``."""
    g = _check_gamma(gamma)
    if k * g > 1:
        raise ValueError(f"k = {k} classes cannot all have probability >= gamma = {g}")
    tau = np.atleast_1d(np.asarray(tau, dtype=float))
    rest = np.full(k - 1, (1 - g) / (k - 1))
    base = np.concatenate([[g], rest])
    moved = np.concatenate([np.full((tau.size, 1), g) * (1 + tau[:, None]),
                            rest[None, :] * (1 - g * tau[:, None] / (1 - g))], axis=1)
    teacher = np.broadcast_to(base, moved.shape).copy()
    student = moved
    if sign < 0:
        teacher, student = student, teacher
    truth = np.zeros_like(teacher)
    truth[:, 0] = 1.0
    return truth[:, None, :], teacher[:, None, :], student[:, None, :]


# --------------------------------------------------------------------------------------------------------
# Exact (multiple-precision) evaluation and the auditor
# --------------------------------------------------------------------------------------------------------


def exact_ratio(teacher_q, student_q, gamma: float, *, direction: str = "reverse", side: str = "both",
                digits: int = 50) -> dict:
    r"""The ratio :math:`\max_{F^*}\text{gain}/\sqrt d` of one instance, evaluated in ``digits``-digit arithmetic
    (mpmath), for the *exact* distributions :math:`F = \gamma + (1 - k\gamma)\,q/\sum q` built from the
    nonnegative arrays ``teacher_q``, ``student_q`` (``(n, k)``): they sum to 1 and respect the floor exactly,
    so the verdict on a candidate constant does not depend on float rounding. Returns a dict with ``ratio``,
    ``gain`` and ``misfit`` (floats rounded from the exact values), the maximising one-hot ``truth`` ``(n, k)``
    and the float ``teacher``, ``student`` rows."""
    import mpmath as mp

    with mp.workdps(digits):
        gm = mp.mpf(gamma)
        tq, sq = np.asarray(teacher_q, dtype=float), np.asarray(student_q, dtype=float)
        n, k = tq.shape

        def dist(row):
            s = mp.fsum(mp.mpf(x) for x in row)
            return [gm + (1 - k * gm) * mp.mpf(x) / s for x in row]

        W = [dist(r) for r in tq]
        S = [dist(r) for r in sq]
        logr = [[mp.log(S[i][y] / W[i][y]) for y in range(k)] for i in range(n)]
        if direction == "reverse":
            d = mp.fsum(S[i][y] * logr[i][y] for i in range(n) for y in range(k)) / n
        else:
            d = mp.fsum(-W[i][y] * logr[i][y] for i in range(n) for y in range(k)) / n
        up = mp.fsum(max(r) for r in logr) / n  # best gain (F* on the class with the largest log-ratio)
        down = -mp.fsum(min(r) for r in logr) / n  # best "minus gain"
        if side == "lower":
            best, pick = up, 1
        elif side == "upper":
            best, pick = down, -1
        else:
            best, pick = (up, 1) if up >= down else (down, -1)
        ratio = float(best / mp.sqrt(d)) if d > 0 else 0.0
        truth = np.zeros((n, k))
        for i, r in enumerate(logr):
            vals = [float(x) for x in r]
            truth[i, int(np.argmax(vals) if pick > 0 else np.argmin(vals))] = 1.0
        return {"ratio": ratio, "gain": float(pick * best), "misfit": float(d), "truth": truth,
                "teacher": np.array([[float(x) for x in r] for r in W]),
                "student": np.array([[float(x) for x in r] for r in S])}


def _stable_excess(r):
    """(1 + r) log(1 + r) - r, accurate for small r (series) and exact at the boundary r = -1."""
    r = np.asarray(r, dtype=float)
    small = np.abs(r) < 1e-3
    rs = np.where(small, r, 0.0)
    series = rs * rs * (0.5 + rs * (-1 / 6 + rs * (1 / 12 + rs * (-1 / 20))))
    rl = np.where(small, 0.5, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = np.where(rl <= -1, 1.0, (1 + rl) * np.log1p(np.maximum(rl, -1 + 1e-300)) - rl)
    return np.where(small, series, closed)


def _ratios(q_w, q_s, gamma, direction, side):
    """Float ratios for a batch ``(B, n, k)`` of (teacher, student) weight vectors, with the best truth.

    KL is summed as :math:`\\sum_y b_y\\,e((a_y - b_y)/b_y)`, :math:`e(r) = (1+r)\\log(1+r) - r \\ge 0` (no
    cancellation between classes), and :math:`a - b` is taken from the weights (no cancellation with the floor).
    Instances whose largest change is below :math:`10^{-7}\\gamma` are discarded (ratio 0): there, rounding
    rather than the instance decides the ratio."""
    k = q_w.shape[-1]
    scale = 1 - k * gamma
    W = gamma + scale * q_w
    S = gamma + scale * q_s
    diff = scale * (q_s - q_w)
    logr = np.log1p(diff / W)
    if direction == "reverse":
        d = (W * _stable_excess(diff / W)).sum(-1).mean(-1)
    else:
        d = (S * _stable_excess(-diff / S)).sum(-1).mean(-1)
    up = logr.max(-1).mean(-1)
    down = -logr.min(-1).mean(-1)
    best = up if side == "lower" else down if side == "upper" else np.maximum(up, down)
    valid = (np.abs(diff).max(axis=(-1, -2)) >= 1e-7 * gamma) & (d > 0) & np.isfinite(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(valid, best / np.sqrt(np.where(valid, d, 1.0)), 0.0)
    return np.where(np.isfinite(ratio), ratio, 0.0)


def _random_weights(rng, count, n, k):
    """Teacher and student weight vectors from a mixture of proposals: Dirichlet rows with concentrations
    spread over two decades (small ones put classes at the floor), students that are independent, mixed
    towards a random point with a weight spread over seven decades (the direction the local analysis of
    :func:`sharp_binary_constant` says is worst), or perturbed in logit space."""
    alpha = 10 ** rng.uniform(-1.5, 0.7, size=(count, 1, 1))
    g_w = rng.gamma(np.broadcast_to(alpha, (count, n, k)))
    q_w = g_w / np.maximum(g_w.sum(-1, keepdims=True), 1e-300)
    q_w = np.where(g_w.sum(-1, keepdims=True) > 0, q_w, 1.0 / k)
    kind = rng.integers(0, 3, size=(count, 1, 1))
    other = rng.gamma(np.broadcast_to(10 ** rng.uniform(-1.5, 0.7, size=(count, 1, 1)), (count, n, k)))
    other = np.where(other.sum(-1, keepdims=True) > 0, other / np.maximum(other.sum(-1, keepdims=True), 1e-300),
                     1.0 / k)
    eta = 10 ** rng.uniform(-7, 0, size=(count, 1, 1))
    mixed = (1 - eta) * q_w + eta * other
    logits = np.log(np.maximum(q_w, 1e-300)) + 10 ** rng.uniform(-4, 0.5, size=(count, 1, 1)) * rng.normal(
        size=(count, n, k))
    logits -= logits.max(-1, keepdims=True)
    perturbed = np.exp(logits)
    perturbed /= perturbed.sum(-1, keepdims=True)
    q_s = np.where(kind == 0, other, np.where(kind == 1, mixed, perturbed))
    return q_w, q_s


@dataclass
class AuditResult:
    """What :func:`audit_constant` found. ``worst_ratio`` is the largest :math:`|\\text{gain}|/\\sqrt d` over the
    instances searched, re-evaluated exactly (:func:`exact_ratio`); ``violated`` is ``worst_ratio > constant``.
    ``worst_instance`` holds the instance: ``truth``, ``teacher``, ``student`` (``(n, k)`` lists), ``gain``,
    ``misfit``, ``ratio``, ``floor``."""

    expression: str
    gamma: float
    constant: float
    direction: str
    side: str
    budget: int
    seed: int
    evaluations: int
    violated: bool
    worst_ratio: float
    worst_instance: dict
    sharp_constant: float
    provable_constant: float
    notes: list = field(default_factory=list)

    @property
    def margin(self) -> float:
        """``worst_ratio / constant``: above 1 is a violation."""
        return self.worst_ratio / self.constant

    def as_dict(self) -> dict:
        def plain(v):
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, (np.floating, np.integer)):
                return v.item()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {
            "expression": self.expression, "gamma": self.gamma, "constant": self.constant,
            "direction": self.direction, "side": self.side, "budget": self.budget, "seed": self.seed,
            "evaluations": int(self.evaluations), "violated": bool(self.violated), "worst_ratio": self.worst_ratio,
            "margin": self.margin, "sharp_constant": self.sharp_constant,
            "provable_constant": self.provable_constant, "worst_instance": plain(self.worst_instance),
            "notes": list(self.notes),
        }


def audit_constant(expr, gamma: float, *, direction: str = "reverse", budget: int = 2000, seed: int = 0,
                   side: str = "both") -> AuditResult:
    r"""Search for instances that violate :math:`|L(F^*,F_w) - L(F^*,F_{sw})| \le C\sqrt{d}` with floor ``gamma``.

    ``expr`` is the candidate :math:`C`: a number or an expression in ``gamma`` (:func:`parse_constant`).
    ``direction`` picks :math:`d` (``"reverse"``: :math:`\mathbb E\,\mathrm{KL}(F_{sw}\|F_w)`, ``"forward"``:
    :math:`\mathbb E\,\mathrm{KL}(F_w\|F_{sw})`); ``side`` the absolute value (``"both"``) or one half
    (``"upper"``: :math:`-\text{gain}`, ``"lower"``: :math:`\text{gain}`).

    Method, within ``budget`` evaluations of an instance:

    1. random search (half the budget): ``k`` in {2, 3, 4} classes, ``n`` in {1, 2, 3} samples, teacher and
       student built as :math:`\gamma + (1-k\gamma)q` from weights :math:`q` drawn by :func:`_random_weights`;
       for each pair the truth is the best one (one-hot on the class with the largest log-ratio, per sample);
    2. local optimisation (the other half): Nelder–Mead on the logits of both weight vectors, started from
       the best random instances of distinct shapes;
    3. the best instances are re-evaluated in 50-digit arithmetic (:func:`exact_ratio`), on exactly normalised
       distributions; ``violated`` and ``worst_ratio`` come from those values only.

    Random search cannot prove a constant valid: "not violated" means "no violation found within the budget".
    """
    from scipy.optimize import minimize

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    if int(budget) < 10:
        raise ValueError(f"budget must be at least 10 evaluations, got {budget!r}")
    budget = int(budget)
    g = _check_gamma(gamma)
    parsed = parse_constant(expr)
    c_exact = _constant_value(parsed, g)
    constant = float(c_exact)
    rng = np.random.default_rng([int(seed), 7])
    shapes = [(n, k) for k in (2, 3, 4) for n in (1, 2, 3) if k * g < 1]
    if not shapes:
        raise ValueError(f"gamma = {g}: no instance with two or more distinct distributions has this floor")
    random_budget = budget // 2
    # Single-sample instances get three times the share: the worst case lives there (by Jensen a mixture of
    # samples cannot beat its best sample), but several samples are searched too.
    weights = np.array([3.0 if n == 1 else 1.0 for n, _ in shapes])
    counts = np.maximum(1, np.floor(random_budget * weights / weights.sum())).astype(int)
    candidates = []  # (ratio, n, k, q_w, q_s)
    evaluations = 0
    for (n, k), count in zip(shapes, counts):
        q_w, q_s = _random_weights(rng, count, n, k)
        r = _ratios(q_w, q_s, g, direction, side)
        evaluations += int(count)
        order = np.argsort(-r)[:4]
        candidates += [(float(r[i]), n, k, q_w[i], q_s[i]) for i in order if r[i] > 0]
    candidates.sort(key=lambda c: -c[0])

    # Local optimisation from the best start of each shape (then the next best overall).
    starts, seen = [], set()
    for cand in candidates:
        if (cand[1], cand[2]) not in seen:
            starts.append(cand)
            seen.add((cand[1], cand[2]))
    starts = sorted(starts, key=lambda c: -c[0])[:6]
    local_budget = max(0, budget - evaluations)
    improved = []
    for i, (r0, n, k, qw, qs) in enumerate(starts):
        fev = local_budget // max(1, len(starts) - i)
        if fev < 20:
            break
        x0 = np.concatenate([np.log(np.maximum(qw, 1e-300)).ravel(), np.log(np.maximum(qs, 1e-300)).ravel()])
        x0 = np.maximum(x0, -700)

        def unpack(x, n=n, k=k):
            z = x.reshape(2, n, k)
            z = z - z.max(-1, keepdims=True)
            q = np.exp(z)
            q /= q.sum(-1, keepdims=True)
            return q[0], q[1]

        def negative_ratio(x, n=n, k=k):
            qw_, qs_ = unpack(x)
            return -float(_ratios(qw_[None], qs_[None], g, direction, side)[0])

        res = minimize(negative_ratio, x0, method="Nelder-Mead",
                       options={"maxfev": fev, "xatol": 1e-10, "fatol": 1e-13, "adaptive": True})
        evaluations += int(res.nfev)
        local_budget -= int(res.nfev)
        qw_best, qs_best = unpack(res.x)
        improved.append((-float(res.fun), n, k, qw_best, qs_best))
    pool = sorted(improved + candidates, key=lambda c: -c[0])[:5]

    worst = None
    for _, n, k, qw, qs in pool:
        exact = exact_ratio(qw, qs, g, direction=direction, side=side)
        if worst is None or exact["ratio"] > worst[0]["ratio"]:
            worst = (exact, n, k, qw, qs)
    notes = []
    if worst is None or worst[0]["ratio"] == 0:
        ratio, inst = 0.0, {}
        notes.append("no instance with a measurable change was found")
    else:
        exact, n, k, qw, qs = worst
        ratio = exact["ratio"]
        inst = {"truth": exact["truth"], "teacher": exact["teacher"], "student": exact["student"],
                "teacher_weights": qw, "student_weights": qs, "gain": exact["gain"], "misfit": exact["misfit"],
                "ratio": ratio, "floor": g, "n": n, "k": k}
    violated = bool(ratio > c_exact)
    return AuditResult(
        expression=str(expr), gamma=g, constant=constant, direction=direction, side=side, budget=budget,
        seed=int(seed), evaluations=evaluations, violated=violated, worst_ratio=float(ratio),
        worst_instance=inst, sharp_constant=sharp_binary_constant(g), provable_constant=provable_sqrt_constant(g),
        notes=notes,
    )
