"""The four field checks can fail: each is run once with the ingredient its claim needs removed."""

import numpy as np

import paper_checks.posterior_mean_identity as posterior
from w2s_theory.checks import discover, run_check


def _check(name):
    return next(c for c in discover() if c.name == name)


def test_posterior_mean_identity_fails_for_the_arithmetic_mean(monkeypatch):
    monkeypatch.setattr(posterior, "posterior_mean", lambda Y: Y.mean(1))
    row = run_check(_check("posterior_mean_identity"), quick=True)
    assert row["verdict"] == "violated" and not row["met"]


def test_posterior_mean_identity_holds_for_the_geometric_mean():
    row = run_check(_check("posterior_mean_identity"), quick=True)
    assert row["met"] and row["details"]["one_teacher_closed_form_max_error"] < 1e-12


def test_bregman_general_needs_its_swapped_counterexamples(monkeypatch):
    import paper_checks.bregman_general as module

    real = module._swapped_counterexample

    def no_violation(generator, rng, batch):
        r = real(generator, rng, batch)
        r.verdict = np.where(r.verdict == "violated", "inconclusive", r.verdict)
        return r

    monkeypatch.setattr(module, "_swapped_counterexample", no_violation)
    row = run_check(_check("bregman_general"), quick=True)
    assert not row["met"]
