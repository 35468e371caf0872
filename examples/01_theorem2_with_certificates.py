"""Example 1: fit reverse- and forward-KL students on a synthetic world and read Theorem 2 off them.

A weak-to-strong setting in a few lines: a synthetic world (frozen random representations, a realizable
truth F* = A* h_s), a weak teacher fitted on split A, its soft labels on split B, and strong students (the
mixture head on h_s) fitted to those labels. Theorem 2 of Yao et al. 2025 (docs/theory.md) says that a
reverse-KL student of a convex head beats its teacher by at least their disagreement:

    gain = E KL(F*||F_w) - E KL(F*||F_sw)  >=  misfit = E KL(F_sw||F_w).

The solver returns each student with a certified gap g (an upper bound on objective - optimum), and the
theorem then implies slack = gain - misfit >= -g for the computed student. The forward-KL student has no
such guarantee. Run: python examples/01_theorem2_with_certificates.py  (a few seconds on a laptop CPU).
"""

from w2s_theory.divergences import kl
from w2s_theory.pipeline import RunSpec, prepare_world
from w2s_theory.solvers import fit
from w2s_theory.synthetic import WorldConfig
from w2s_theory.theorems import forward_kl_pythagorean, theorem2_reverse_kl

# A realizable world with 3 classes; the weak teacher reads an early layer of the same network.
spec = RunSpec(world=WorldConfig(k=3, strong_dim=32, weak_dim=4), seed=0, n_weak=500, n_train=500, n_test=500)
world = prepare_world(spec)  # samples on splits A/B/C, the weak teacher, the strong ceiling
features, teacher, truth = world.strong_train, world.teacher_train, world.truth_train
print(f"split B: n = {features.shape[0]} samples, m = {features.shape[1]} strong features, k = {truth.shape[1]}")

teacher_error = kl(truth, teacher).mean()  # E KL(F*||F_w)
for loss, theorem in (("reverse_kl", theorem2_reverse_kl), ("forward_kl", forward_kl_pythagorean)):
    students = fit(features, teacher, loss=loss, head="mixture")  # a batch of one student, certified
    student = students.probs[0].numpy()
    gain = teacher_error - kl(truth, student).mean()
    misfit = float(students.objective[0])  # the trained objective: KL in the trained direction
    result = theorem(truth, teacher, student, students.gap[0].item())
    print(f"{loss}: {result.statement}")
    print(f"  gain {gain:.6f}  misfit {misfit:.6f}  slack {result.slack.item():+.2e}  "
          f"certificate {result.certificate.item():.1e} ({students.certificate})  -> {result.verdict.item()}")
