"""One small array layer so that every formula is written once and runs on numpy or torch (CPU or CUDA).

A function receives arrays, asks :func:`ops` for the matching namespace and calls only the operations listed
here. numpy in -> numpy out; torch in -> torch out (same device, same dtype).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import scipy.special as sps
import torch


def is_torch(*arrays) -> bool:
    return any(isinstance(a, torch.Tensor) for a in arrays)


def _np_sum(x, axis=None, keepdims=False):
    return np.sum(x, axis=axis, keepdims=keepdims)


def _t_sum(x, axis=None, keepdims=False):
    if axis is None:
        return x.sum()
    return x.sum(dim=axis, keepdim=keepdims)


def _t_max(x, axis=None, keepdims=False):
    if axis is None:
        return x.max()
    return x.amax(dim=axis, keepdim=keepdims)


def _t_min(x, axis=None, keepdims=False):
    if axis is None:
        return x.min()
    return x.amin(dim=axis, keepdim=keepdims)


NUMPY = SimpleNamespace(
    name="numpy",
    xlogy=sps.xlogy,
    log=np.log,
    exp=np.exp,
    sqrt=np.sqrt,
    abs=np.abs,
    where=np.where,
    sum=_np_sum,
    max=lambda x, axis=None, keepdims=False: np.max(x, axis=axis, keepdims=keepdims),
    min=lambda x, axis=None, keepdims=False: np.min(x, axis=axis, keepdims=keepdims),
    stack=lambda xs, axis=-1: np.stack(xs, axis=axis),
    isnan=np.isnan,
    logsumexp=lambda x, axis=-1: sps.logsumexp(x, axis=axis),
    log_softmax=lambda x, axis=-1: sps.log_softmax(x, axis=axis),
    inf=np.inf,
)

TORCH = SimpleNamespace(
    name="torch",
    xlogy=torch.special.xlogy,
    log=torch.log,
    exp=torch.exp,
    sqrt=torch.sqrt,
    abs=torch.abs,
    where=torch.where,
    sum=_t_sum,
    max=_t_max,
    min=_t_min,
    stack=lambda xs, axis=-1: torch.stack(xs, dim=axis),
    isnan=torch.isnan,
    logsumexp=lambda x, axis=-1: torch.logsumexp(x, dim=axis),
    log_softmax=lambda x, axis=-1: torch.log_softmax(x, dim=axis),
    inf=float("inf"),
)


def ops(*arrays) -> SimpleNamespace:
    """The namespace (numpy or torch) that matches the inputs; torch wins if any input is a tensor."""
    return TORCH if is_torch(*arrays) else NUMPY


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``"auto"`` -> cuda when available, else cpu. An unavailable cuda is an error, not a fallback."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return dev


def proc_kib_entry(path: str, key: str) -> int | None:
    """The ``key:`` entry of a /proc file given in kiB (``/proc/meminfo``, ``/proc/self/status``), in bytes;
    ``None`` where the file or the entry is unavailable (other systems)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
