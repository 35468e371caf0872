"""Input checks that turn bad input into one clear error (``InputError``) naming the argument and the fix."""

from __future__ import annotations

import numpy as np
import torch

from ._backend import to_numpy

__all__ = ["InputError", "check_distributions", "check_finite", "check_batch_shapes", "check_device",
           "check_positive", "SIMPLEX_ATOL"]

#: Rows that should be distributions may be off by this much (float32 exports, rounding); they are then
#: renormalised exactly, so the math downstream sees rows that sum to 1.
SIMPLEX_ATOL = 1e-6


class InputError(ValueError):
    """Bad user input. The message is one line: what is wrong, with which argument, and how to fix it."""


def _on_device(array) -> bool:
    """Whether ``array`` is a real floating-point torch tensor, whose checks then run where it lives (on a GPU, a
    copy of the whole input to the host would cost more than the solve); only a failed check, which needs the
    first bad index for its message, looks at the entries again on the host."""
    return isinstance(array, torch.Tensor) and array.is_floating_point()


def check_finite(name: str, array) -> None:
    # A finite sum proves every entry finite (a NaN or an infinity makes any sum NaN or infinite), without the
    # temporaries of torch.isfinite (a float copy of the input); a sum that overflows goes to the exact check.
    if _on_device(array) and bool(torch.isfinite(array.sum())):
        return
    a = to_numpy(array)
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name}: expected numbers, got dtype {a.dtype}")
    bad = ~np.isfinite(a)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name}: {int(bad.sum())} entries are NaN or infinite (first at index {where}); "
                         "remove or impute them")


def check_distributions(name: str, array, *, atol: float = SIMPLEX_ATOL):
    """Check that the last axis holds probability distributions and return them renormalised exactly.

    Raises :class:`InputError` for NaN/inf, negative entries or rows that do not sum to 1 within ``atol``.
    Works for numpy and torch; returns the same type.
    """
    check_finite(name, array)
    if (_on_device(array) and array.ndim >= 1 and array.shape[-1] >= 1 and array.numel() and not bool(array.amin() < 0)
            and not bool(((array.sum(dim=-1) - 1).abs() > atol).any())):
        return array / array.sum(dim=-1, keepdim=True)
    a = to_numpy(array)
    if a.ndim < 1 or a.shape[-1] < 1:
        raise InputError(f"{name}: expected a last axis of classes, got shape {a.shape}")
    neg = a < 0
    if neg.any():
        where = tuple(int(i) for i in np.argwhere(neg)[0])
        raise InputError(f"{name}: {int(neg.sum())} negative probabilities (first at index {where}, value "
                         f"{a[where]:.3g}); probabilities must be >= 0")
    sums = a.sum(axis=-1)
    off = np.abs(sums - 1) > atol
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        raise InputError(f"{name}: {int(off.sum())} rows do not sum to 1 (first at row {where}, sum "
                         f"{sums[where]:.6g}); pass probabilities, not logits or scores, along the last axis")
    if isinstance(array, torch.Tensor):
        return array / array.sum(dim=-1, keepdim=True)
    return a / sums[..., None]


def check_batch_shapes(features_name: str, features, teacher_name: str, teacher) -> tuple[int, int, int, int]:
    """Features ``(n, m)`` or ``(B, n, m)`` and teacher ``(n, k)`` or ``(B, n, k)``; returns ``(B, n, m, k)``.

    A shared ``(n, m)`` feature matrix with a batched teacher is allowed (many teachers on one
    representation); the reverse is not.
    """
    fs, ts = tuple(features.shape), tuple(teacher.shape)
    if len(fs) not in (2, 3):
        raise InputError(f"{features_name}: expected shape (n, m) or (B, n, m), got {fs}")
    if len(ts) not in (2, 3):
        raise InputError(f"{teacher_name}: expected shape (n, k) or (B, n, k), got {ts}")
    if len(fs) == 3 and len(ts) == 2:
        raise InputError(f"{teacher_name}: features are batched {fs} but the teacher is not {ts}; "
                         "give one teacher per student, shape (B, n, k)")
    if fs[-2] != ts[-2]:
        raise InputError(f"{features_name} has {fs[-2]} rows but {teacher_name} has {ts[-2]}; "
                         "they must describe the same samples")
    if len(fs) == 3 and fs[0] != ts[0]:
        raise InputError(f"{features_name} has batch size {fs[0]} but {teacher_name} has {ts[0]}")
    if fs[-2] < 1 or fs[-1] < 1 or ts[-1] < 1 or (len(ts) == 3 and ts[0] < 1):
        raise InputError(f"empty input: {features_name} {fs}, {teacher_name} {ts}; every axis needs at least "
                         "one entry (a batch of B = 0 students has nothing to fit)")
    B = ts[0] if len(ts) == 3 else 1
    return B, fs[-2], fs[-1], ts[-1]


def check_device(device, name: str = "--device") -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``auto``/``None`` as a torch device; anything else, or CUDA asked for where
    there is none, is an :class:`InputError` (checked before any work starts)."""
    from ._backend import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise InputError(f"{name}: {str(exc).splitlines()[0]}") from None
    except RuntimeError:  # torch's "Expected one of cpu, cuda, ... device type"
        raise InputError(f"{name}: unknown device {device!r}; use cpu, cuda or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{name}: {device!r} is not supported; use cpu, cuda or auto")
    return dev


def check_positive(name: str, value) -> float:
    """A finite number > 0 (a tolerance, a penalty), else :class:`InputError`."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value <= 0:
        raise InputError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)
