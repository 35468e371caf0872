"""Test-session settings (threads, and the hypothesis profile of CI).

``make test`` runs two pytest-xdist workers on the 2-core CI machine; torch's default of one OpenMP thread per
core would then oversubscribe the cores, and busy-waiting OpenMP threads make small tensor operations up to
100x slower. One thread per worker keeps the suite fast and its run time predictable.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("W2S_TEST_THREADS", "1")))

# CI (CI=true) draws hypothesis examples from a fixed seed, so that a submission's verdict does not depend on the
# examples a run happened to draw; a local run keeps exploring new ones (and found the instance of
# tests/test_linear_solver.py::test_constant_class_certificate_reaches_the_target_with_a_tiny_teacher_mean).
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
