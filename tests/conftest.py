"""Test-session settings.

``make test`` runs two pytest-xdist workers on the 2-core CI machine; torch's default of one OpenMP thread per
core would then oversubscribe the cores, and busy-waiting OpenMP threads make small tensor operations up to
100x slower. One thread per worker keeps the suite fast and its run time predictable.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("W2S_TEST_THREADS", "1")))
