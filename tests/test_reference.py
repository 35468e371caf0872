"""The exact reference solvers (cvxpy) and what they certify; the batched mixture solver checked against them.

Every comparison of objectives uses certificates (Frank–Wolfe gaps computed at feasible points) plus a
rounding allowance of ``1e-12`` for evaluating a mean of O(1) terms in float64. The remaining fixed numbers
are accuracy targets (the batched solver's 1e-9, the reference's 1e-6) or float64 rounding (``4 * eps``).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import minimize_scalar

from w2s_theory.divergences import get_loss
from w2s_theory.heads import LinearHead, MixtureHead
from w2s_theory.solvers import fit
from w2s_theory.solvers.reference import SolverError, fit_reference, fit_reference_batch, linear_head_lmo

ROUNDING = 1e-12
ALL_LOSSES = ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce", "squared")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _random_instance(rng, n, m, k, concentration=0.5):
    features = rng.dirichlet(np.full(m, concentration), size=n)
    teacher = rng.dirichlet(np.ones(k), size=n)
    return features, teacher


def _batched(features, teacher, loss):
    """The batched mixture solver on one student: ``(objective, gap, A)`` as floats / numpy."""
    res = fit(torch.as_tensor(features)[None], torch.as_tensor(teacher)[None], loss=loss, head="mixture")
    return res.objective.item(), res.gap.item(), res.params["A"][0].numpy()


def _mean_loss(loss, teacher, probs):
    return float(np.mean(get_loss(loss).per_sample(teacher, probs)))


# ---------------------------------------------------------------------------------------------------------
# 1. Closed forms on the constant class (docs/theory.md): m = 1, feature identically 1.
# ---------------------------------------------------------------------------------------------------------


def _constant_class_projection(teacher, loss):
    """Reverse KL: normalised geometric mean p ∝ exp(mean_i log q_i); forward KL: arithmetic mean."""
    if loss == "forward_kl":
        return teacher.mean(axis=0)
    with np.errstate(divide="ignore"):
        g = np.exp(np.log(teacher).mean(axis=0))
    return g / g.sum()


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
@FAST
@given(data=st.data())
def test_constant_class_projection_is_geometric_mean_for_reverse_and_arithmetic_mean_for_forward(loss, data):
    k = data.draw(st.sampled_from([2, 3]), label="k")
    n = data.draw(st.integers(1, 8), label="n")
    raw = data.draw(arrays(np.float64, (n, k), elements=st.sampled_from([0.0, 1e-3, 0.1, 0.3, 0.5, 1.0])))
    assume((raw.sum(axis=1) > 0).all())
    teacher = raw / raw.sum(axis=1, keepdims=True)
    features = np.ones((n, 1))
    if loss == "reverse_kl" and (teacher == 0).any(axis=0).all():
        # Every class has a zero somewhere: every constant has infinite reverse KL.
        assert fit_reference(features, teacher, loss).objective.item() == np.inf
        assert _batched(features, teacher, loss)[0] == np.inf
        return
    p_star = _constant_class_projection(teacher, loss)
    optimum = _mean_loss(loss, teacher, p_star[None].repeat(n, axis=0))

    ref = fit_reference(features, teacher, loss)
    solvers = {"cvxpy": (ref.objective.item(), ref.gap.item(), ref.params["A"][0].numpy()),
               "batched": _batched(features, teacher, loss)}
    for name, (obj, gap, A) in solvers.items():
        assert np.isfinite(gap), name
        # The closed form is the optimum, and the certificate bounds how far above it the solver is.
        assert optimum - ROUNDING <= obj <= optimum + gap + ROUNDING, (name, obj, optimum, gap)
        # Φ(p) − Φ* is KL(p‖p*) (reverse) or KL(p*‖p) (forward) ≥ ½‖p − p*‖₁² (Pinsker): the certificate
        # bounds the distance to the closed form too.
        assert np.abs(A[:, 0] - p_star).sum() <= np.sqrt(2 * (gap + ROUNDING)) + 1e-9, (name, A[:, 0], p_star)


# ---------------------------------------------------------------------------------------------------------
# 2. Acceptance: the batched mixture solver agrees with cvxpy within the certificates.
# ---------------------------------------------------------------------------------------------------------


def test_batched_mixture_solver_agrees_with_cvxpy_within_certificates():
    rng = np.random.default_rng(20250211)
    rows = []
    for instance in range(20):
        k = 2 if instance % 2 == 0 else 3
        loss = "reverse_kl" if instance % 4 < 2 else "forward_kl"
        n, m = int(rng.integers(50, 301)), int(rng.integers(3, 11))
        features, teacher = _random_instance(rng, n, m, k)
        ref = fit_reference(features, teacher, loss)
        obj_c, gap_c = ref.objective.item(), ref.gap.item()
        obj_b, gap_b, _ = _batched(features, teacher, loss)
        rows.append((instance, k, n, m, loss, obj_b - obj_c, gap_b, gap_c))

        # cvxpy's head is in the class exactly (its objective is then an upper bound on the optimum).
        A_c = ref.params["A"][0].numpy()
        assert (A_c >= 0).all() and np.abs(A_c.sum(axis=0) - 1).max() <= 4 * np.finfo(float).eps, rows[-1]

        assert gap_b <= 1e-9, rows[-1]
        assert abs(obj_b - obj_c) <= max(gap_b, gap_c) + ROUNDING, rows[-1]
        # Each gap is a true upper bound: cvxpy's objective is evaluated at a feasible point, so it is at least
        # the optimum, hence obj_b - obj_c <= obj_b - optimum <= gap_b (and symmetrically for cvxpy).
        assert obj_b - obj_c <= gap_b + ROUNDING, rows[-1]
        assert obj_c - obj_b <= gap_c + ROUNDING, rows[-1]
    worst_diff = max(abs(r[5]) for r in rows)
    worst_gap_b = max(r[6] for r in rows)
    worst_gap_c = max(r[7] for r in rows)
    print(f"\n20 instances: worst |obj diff| {worst_diff:.2e}, worst batched gap {worst_gap_b:.2e}, "
          f"worst cvxpy gap {worst_gap_c:.2e}")


# ---------------------------------------------------------------------------------------------------------
# 3. The linear head contains the mixture head; its outputs are in the class exactly.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_linear_head_optimum_is_at_most_mixture_head_optimum(loss):
    rng = np.random.default_rng(7)
    for k in (2, 3):
        features, teacher = _random_instance(rng, n=40, m=4, k=k)
        mix = fit_reference(features, teacher, loss, "mixture")
        lin = fit_reference(features, teacher, loss, "linear", gamma=0.0)
        # min_linear <= min_mixture <= obj_mixture, and obj_linear <= min_linear + gap_linear.
        assert lin.objective.item() <= mix.objective.item() + lin.gap.item() + ROUNDING
        assert lin.gap.item() <= 1e-6 and mix.gap.item() <= 1e-6


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.sampled_from([2, 3]),
    n=st.integers(1, 30),
    m=st.integers(1, 5),
    gamma=st.sampled_from([0.0, 1e-3, 0.05, 0.2]),
    loss=st.sampled_from(ALL_LOSSES),
)
def test_linear_head_outputs_respect_floor_and_sum_to_one(seed, k, n, m, gamma, loss):
    assume(gamma < 1 / k)
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, m))
    teacher = rng.dirichlet(np.ones(k), size=n)
    res = fit_reference(features, teacher, loss, "linear", gamma=gamma)
    probs = res.probs[0].numpy()
    assert (probs >= gamma).all(), probs.min() - gamma  # exactly, not up to a tolerance
    assert np.abs(probs.sum(axis=1) - 1).max() <= 4 * np.finfo(float).eps
    # The reported parameters produce the reported outputs (up to the rounding of one matrix product).
    W, b = res.params["W"][0].numpy(), res.params["b"][0].numpy()
    assert np.abs(LinearHead.predict(W, b, features) - probs).max() <= 1e-9
    assert res.objective.item() == pytest.approx(_mean_loss(loss, teacher, probs), abs=ROUNDING)
    # An interior-point solution is accurate to about the square root of its tolerance, and the certificate
    # is first order in that distance: ~1e-5 on some instances (e.g. n = 1) even at Clarabel tolerance 1e-11.
    assert 0 <= res.gap.item() <= 1e-4


# ---------------------------------------------------------------------------------------------------------
# 4. Teachers with exact zeros and ones under the reverse losses.
# ---------------------------------------------------------------------------------------------------------


def _instance_with_consistent_zeros(rng, n, m, k):
    """Each feature j may only use classes S_j; a sample's teacher lives on the union of its features' S_j
    (one-hot when that union is one class). Reverse KL is then finite on the class, with many exact zeros."""
    sets = [rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False) for _ in range(m)]
    sets[0] = np.array([0])  # at least one pure feature: one-hot teachers on its samples
    features = np.zeros((n, m))
    teacher = np.zeros((n, k))
    for i in range(n):
        support = rng.choice(m, size=int(rng.integers(1, 3)), replace=False)
        features[i, support] = rng.dirichlet(np.ones(support.size))
        classes = np.unique(np.concatenate([sets[j] for j in support]))
        teacher[i, classes] = rng.dirichlet(np.ones(classes.size))
    return features, teacher


@pytest.mark.parametrize("loss", ["reverse_kl", "reverse_ce"])
def test_reverse_losses_with_teacher_zeros_and_ones_are_finite_and_match_batched(loss):
    rng = np.random.default_rng(3)
    for k in (2, 3):
        features, teacher = _instance_with_consistent_zeros(rng, n=60, m=5, k=k)
        assert (teacher == 0).any() and (teacher == 1).any()
        ref = fit_reference(features, teacher, loss)
        obj_c, gap_c = ref.objective.item(), ref.gap.item()
        assert np.isfinite(obj_c) and gap_c <= 1e-6
        probs = ref.probs[0].numpy()
        assert (probs[teacher == 0] == 0).all()  # exact zeros where the teacher has them
        obj_b, gap_b, _ = _batched(features, teacher, loss)
        assert gap_b <= 1e-9
        assert obj_b - obj_c <= gap_b + ROUNDING and obj_c - obj_b <= gap_c + ROUNDING


def _forced_zero_instance():
    """Sample 0 pins class 1 of feature 0 (teacher (1, 0)); sample 1 uses only feature 0 but has teacher mass
    on class 1: its prediction is forced to (1, 0), finite loss log 2 at every feasible head."""
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    teacher = np.array([[1.0, 0.0], [0.5, 0.5], [0.3, 0.7], [0.6, 0.4]])
    return features, teacher


def _forced_zero_optimum(features, teacher):
    """A = [[1, a], [0, 1 - a]]: a one-dimensional problem, solved to ~1e-15 by bounded Brent."""
    phi = lambda a: _mean_loss("reverse_kl", teacher, features @ np.array([[1.0, a], [0.0, 1 - a]]).T)  # noqa: E731
    return minimize_scalar(phi, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).fun


@pytest.mark.parametrize("head", ["mixture", "linear"])
def test_reference_handles_predictions_forced_to_zero_where_teacher_is_positive(head):
    features, teacher = _forced_zero_instance()
    ref = fit_reference(features, teacher, "reverse_kl", head)
    assert np.isfinite(ref.gap.item()) and ref.gap.item() <= 1e-6
    if head == "mixture":  # for the linear head the same point is feasible, the class is larger
        optimum = _forced_zero_optimum(features, teacher)
        assert optimum - ROUNDING <= ref.objective.item() <= optimum + ref.gap.item() + 1e-10
    else:
        mix = fit_reference(features, teacher, "reverse_kl", "mixture")
        assert ref.objective.item() <= mix.objective.item() + ref.gap.item() + ROUNDING


def test_batched_solver_handles_predictions_forced_to_zero_where_teacher_is_positive():
    features, teacher = _forced_zero_instance()
    obj_b, gap_b, _ = _batched(features, teacher, "reverse_kl")
    assert gap_b <= 1e-9
    assert abs(obj_b - _forced_zero_optimum(features, teacher)) <= 1e-9


@pytest.mark.parametrize("head", ["mixture", "linear"])
def test_contradicting_teacher_zeros_on_a_shared_support_give_infinite_objective(head):
    # Two samples with the same features whose teachers exclude each other's class: every head predicts the
    # same distribution on both, which must be 0 on both classes.
    features = np.array([[0.3, 0.7], [0.3, 0.7], [1.0, 0.0]])
    teacher = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    ref = fit_reference(features, teacher, "reverse_kl", head)
    assert ref.objective.item() == np.inf and ref.gap.item() == np.inf
    if head == "mixture":
        obj_b, gap_b, _ = _batched(features, teacher, "reverse_kl")
        assert obj_b == np.inf and gap_b == np.inf
    # The forward direction has no such constraint: same instance, finite.
    assert np.isfinite(fit_reference(features, teacher, "forward_kl", head).objective.item())


# ---------------------------------------------------------------------------------------------------------
# 5. The certificate bounds the suboptimality of perturbed points.
# ---------------------------------------------------------------------------------------------------------


def _mixture_gap(features, teacher, loss, A):
    n = features.shape[0]
    probs = features @ A.T
    G = get_loss(loss).grad_student(teacher, probs).T @ features / n
    return _mean_loss(loss, teacher, probs), float(MixtureHead.frank_wolfe_gap(G, A))


# reverse_ce is linear in the student, so there the gap at a perturbed point *equals* the increase (plus the
# gap of the start point): the check is tight and fails for any under-reporting certificate. For the curved
# losses with an interior optimum the increase is second order in t while the gap is first order.
@pytest.mark.parametrize("loss", ["reverse_ce", "reverse_kl", "forward_kl", "squared"])
def test_frank_wolfe_gap_bounds_objective_increase_of_perturbed_mixture_head(loss):
    rng = np.random.default_rng(11)
    features, teacher = _random_instance(rng, n=50, m=4, k=3)
    ref = fit_reference(features, teacher, loss)
    A = ref.params["A"][0].numpy()
    obj, gap = _mixture_gap(features, teacher, loss, A)
    assert gap <= 1e-6  # near the optimum, so that the perturbations below are what raises the objective
    n = features.shape[0]
    G = get_loss(loss).grad_student(teacher, features @ A.T).T @ features / n
    worst = np.zeros_like(A)  # the vertex that increases the objective fastest: argmax of each column
    worst[G.argmax(axis=0), np.arange(A.shape[1])] = 1
    directions = [worst] + [rng.dirichlet(np.ones(3), size=A.shape[1]).T for _ in range(3)]
    for S in directions:
        for t in (1e-4, 1e-3, 1e-2, 1e-1, 0.5):
            A_t = (1 - t) * A + t * S  # stays column-stochastic
            obj_t, gap_t = _mixture_gap(features, teacher, loss, A_t)
            # gap_t >= obj_t - optimum >= obj_t - obj (the reference is itself only gap-optimal: optimum >= obj - gap).
            assert obj_t - obj <= gap_t + ROUNDING, (t, obj_t - obj, gap_t)


@pytest.mark.parametrize("loss", ["reverse_ce", "reverse_kl", "forward_kl", "squared"])
def test_linear_oracle_gap_bounds_objective_increase_of_perturbed_linear_head(loss):
    rng = np.random.default_rng(12)
    n, m, k, gamma = 40, 3, 3, 0.02
    features = rng.normal(size=(n, m))
    teacher = rng.dirichlet(np.ones(k), size=n)
    ref = fit_reference(features, teacher, loss, "linear", gamma=gamma)
    P = ref.probs[0].numpy()
    obj = ref.objective.item()
    # A far member of the class to move toward: the oracle's vertex for a random direction.
    for _ in range(3):
        S = linear_head_lmo(features, rng.normal(size=(n, k)), gamma)
        assert (S >= gamma - 1e-9).all() and np.allclose(S.sum(axis=1), 1)
        for t in (1e-3, 1e-2, 1e-1, 0.5):
            P_t = (1 - t) * P + t * S
            obj_t = _mean_loss(loss, teacher, P_t)
            G = get_loss(loss).grad_student(teacher, P_t) / n
            gap_t = float(np.sum(G * (P_t - linear_head_lmo(features, G, gamma))))
            assert obj_t - obj <= gap_t + 1e-9, (t, obj_t - obj, gap_t)


@pytest.mark.parametrize("head", ["mixture", "linear"])
@pytest.mark.parametrize("loss", ["reverse_ce", "reverse_kl", "squared"])
def test_slightly_infeasible_solver_output_is_mapped_into_the_class(monkeypatch, head, loss):
    """Interior-point output is off by ~1e-10 (negative entries, column/row sums 1 ± 1e-9), and such a point
    can score *below* the optimum. Simulate a worse one (noise 1e-7): the reference must still return a
    member of the class, whose objective is then >= the optimum, within its own certificate of it."""
    rng = np.random.default_rng(21)
    features, teacher = _random_instance(rng, n=30, m=3, k=3)
    gamma = 0.05 if head == "linear" else 0.0
    exact = fit_reference(features, teacher, loss, head, gamma=gamma)
    original = cp.Problem.solve

    def solve_then_perturb(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        for variable in self.variables():
            variable.save_value(variable.value + 1e-7 * rng.uniform(-1, 1, size=variable.shape))
        return value

    monkeypatch.setattr(cp.Problem, "solve", solve_then_perturb)
    res = fit_reference(features, teacher, loss, head, gamma=gamma)
    probs = res.probs[0].numpy()
    assert (probs >= gamma).all() and np.abs(probs.sum(axis=1) - 1).max() <= 4 * np.finfo(float).eps
    if head == "mixture":
        A = res.params["A"][0].numpy()
        assert (A >= 0).all() and np.abs(A.sum(axis=0) - 1).max() <= 4 * np.finfo(float).eps
    else:
        W, b = res.params["W"][0].numpy(), res.params["b"][0].numpy()
        assert np.abs(LinearHead.predict(W, b, features) - probs).max() <= 1e-9
    # A feasible point scores at least the optimum, which is at least exact.objective - exact.gap.
    assert res.objective.item() >= exact.objective.item() - exact.gap.item() - ROUNDING
    assert res.objective.item() <= exact.objective.item() + res.gap.item() + ROUNDING


# ---------------------------------------------------------------------------------------------------------
# 6. A non-optimal solver status is an error, never a result.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mixture", "linear"])
def test_iteration_limit_raises_solver_error(head):
    features, teacher = _random_instance(np.random.default_rng(5), n=30, m=3, k=2)
    with pytest.raises(SolverError, match="user_limit"):
        fit_reference(features, teacher, "reverse_kl", head, solver_options={"max_iter": 1})


@pytest.mark.parametrize("fake_status", [cp.OPTIMAL_INACCURATE, cp.USER_LIMIT, cp.INFEASIBLE])
def test_non_optimal_status_raises_solver_error_even_with_a_solution(monkeypatch, fake_status):
    original = cp.Problem.solve

    def solve_then_downgrade(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        self._status = fake_status  # the solution values stay in place: they must still not be used
        return value

    monkeypatch.setattr(cp.Problem, "solve", solve_then_downgrade)
    features, teacher = _random_instance(np.random.default_rng(6), n=20, m=3, k=3)
    with pytest.raises(SolverError, match=fake_status):
        fit_reference(features, teacher, "forward_kl")


def test_solver_exception_becomes_solver_error(monkeypatch):
    def fail(self, *args, **kwargs):
        raise cp.error.SolverError("Solver 'CLARABEL' failed.")

    monkeypatch.setattr(cp.Problem, "solve", fail)
    features, teacher = _random_instance(np.random.default_rng(6), n=20, m=3, k=2)
    with pytest.raises(SolverError, match="failed"):
        fit_reference(features, teacher, "squared")


# ---------------------------------------------------------------------------------------------------------
# The batch wrapper and the dispatcher's routes to it.
# ---------------------------------------------------------------------------------------------------------


def test_reference_batch_equals_one_student_at_a_time_with_shared_features():
    rng = np.random.default_rng(9)
    features = rng.dirichlet(np.ones(3), size=25)
    teachers = rng.dirichlet(np.ones(2), size=(3, 25))
    batch = fit_reference_batch(torch.as_tensor(features), torch.as_tensor(teachers), "reverse_kl", "mixture")
    assert batch.objective.shape == (3,) and batch.probs.shape == (3, 25, 2)
    assert batch.params["A"].shape == (3, 2, 3)
    assert batch.objective.dtype == torch.float64 and batch.certificate == "frank_wolfe"
    for b in range(3):
        single = fit_reference(features, teachers[b], "reverse_kl")
        assert batch.objective[b].item() == single.objective.item()
    # The dispatcher sends backend="cvxpy" here.
    via_fit = fit(features, teachers, loss="reverse_kl", head="linear", backend="cvxpy")
    assert via_fit.method == "cvxpy-CLARABEL" and via_fit.objective.shape == (3,)
    assert (via_fit.objective <= batch.objective + via_fit.gap + ROUNDING).all()
    via_backend = fit(features, teachers, loss="reverse_kl", head="mixture", backend="cvxpy")
    # fit() renormalises the teacher rows, so the instances differ by rounding only.
    tolerance = torch.maximum(via_backend.gap, batch.gap) + ROUNDING
    assert ((via_backend.objective - batch.objective).abs() <= tolerance).all()


def test_bad_gamma_for_linear_head_is_an_error():
    features, teacher = _random_instance(np.random.default_rng(1), n=10, m=2, k=3)
    with pytest.raises(ValueError, match="gamma"):
        fit_reference(features, teacher, "squared", "linear", gamma=0.5)


@pytest.mark.parametrize("head, loss, module, function", [
    ("softmax", "forward_kl", "w2s_theory.solvers.softmax", "fit_softmax_reference"),
    ("squared", "squared", "w2s_theory.solvers.squared", "fit_squared_reference"),
])
def test_reference_batch_delegates_softmax_and_squared_heads_student_by_student(head, loss, module, function):
    single_reference = getattr(pytest.importorskip(module), function)
    rng = np.random.default_rng(4)
    features = rng.normal(size=(2, 20, 2))
    teacher = rng.dirichlet(np.ones(2), size=(2, 20))
    batch = fit_reference_batch(torch.as_tensor(features), torch.as_tensor(teacher), loss, head)
    assert batch.objective.shape == (2,) and batch.objective.dtype == torch.float64
    for b in range(2):
        args = (features[b], teacher[b], loss) if head == "softmax" else (features[b], teacher[b])
        assert batch.objective[b].item() == single_reference(*args).objective.item()
