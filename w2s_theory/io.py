"""Reading user arrays and writing results without ever leaving a half-written file behind."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .validation import InputError

__all__ = ["load_array", "atomic_write", "save_npz", "save_json", "json_safe", "format_table"]


def load_array(path: str | os.PathLike, name: str) -> np.ndarray:
    """Load a ``.npy`` (or the single array of a ``.npz``) as float64; errors name the argument."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{name}: file not found: {p}")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = list(data.keys())
            if len(keys) != 1:
                raise InputError(f"{name}: {p} holds {len(keys)} arrays ({', '.join(keys)}); give a .npy file")
            data = data[keys[0]]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{name}: cannot read {p} as a numpy array ({type(exc).__name__}: {exc})") from None
    if not np.issubdtype(data.dtype, np.number) and data.dtype != bool:
        raise InputError(f"{name}: {p} holds {data.dtype} values, expected numbers")
    return np.asarray(data, dtype=np.float64)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path`` and rename it into place, so an
    existing ``path`` is replaced whole or not at all."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        # mkstemp creates 0600 files; give the result the permissions an ordinary open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz(path, **arrays) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def json_safe(obj):
    """Numbers, arrays and nested containers -> JSON-serialisable (NaN/inf become strings 'nan'/'inf')."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def save_json(path, obj) -> None:
    text = json.dumps(json_safe(obj), indent=2)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` is a list of (key, header)."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)
