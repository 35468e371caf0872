"""Reading user arrays and writing results without ever leaving a half-written file behind."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .validation import InputError

__all__ = ["load_array", "check_output_paths", "ARRAY_FORMATS", "atomic_write", "save_npz", "save_json", "json_safe", "format_table"]


#: File suffixes :func:`load_array` reads, and how.
ARRAY_FORMATS = {".npy": "numpy", ".npz": "numpy archive", ".pt": "torch", ".pth": "torch",
                 ".parquet": "table", ".pq": "table", ".csv": "table"}


def load_array(path: str | os.PathLike, name: str) -> np.ndarray:
    """Load a user array as float64; every error is one line naming the argument (``name``, e.g. ``--features``).

    Formats, by suffix:

    * ``.npy``: the array;
    * ``.npz`` (named arrays) and ``.pt``/``.pth`` (a tensor, or a dict of named tensors, loaded with
      ``torch.load(weights_only=True)``, so no code in the file is run): the array named by ``FILE:NAME``
      when given, else the only array, else the array named after the argument (``--weak-features`` ->
      ``weak_features``; ``--labels`` -> ``labels``); otherwise an error lists the names;
    * ``.parquet``/``.pq``/``.csv``: every column, which must all be numeric (a table of n rows and m columns
      is an ``(n, m)`` array). A CSV whose first line is all numbers has no header row.

    Complex, non-numeric, object or empty-named data are errors, never silently converted.
    """
    p, key = _split_key(Path(path))
    if not p.exists():
        raise InputError(f"{name}: file not found: {p}")
    if p.is_dir():
        raise InputError(f"{name}: {p} is a folder; give a file ({', '.join(ARRAY_FORMATS)})")
    suffix = p.suffix.lower()
    fmt = ARRAY_FORMATS.get(suffix, "numpy")  # unknown suffix: try numpy's own formats
    try:
        if fmt == "table":
            data = _load_table(p, name, suffix)
        elif fmt == "torch":
            data = _pick(_load_torch(p, name), p, key, name)
        else:
            data = np.load(p, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    data = _pick({k: data[k] for k in data.keys()}, p, key, name)
            elif key is not None:
                raise InputError(f"{name}: {p} holds one array; drop ':{key}'")
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{name}: {p} is too large to load into memory") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is bad input
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"{name}: cannot read {p} as {_describe(fmt)} ({type(exc).__name__}: {detail})") from None
    data = np.asarray(data)
    if np.iscomplexobj(data):
        raise InputError(f"{name}: {p} holds complex values ({data.dtype}); give real numbers (the imaginary part "
                         "is never dropped silently)")
    if not np.issubdtype(data.dtype, np.number) and data.dtype != bool:
        raise InputError(f"{name}: {p} holds {data.dtype} values, expected numbers")
    return np.asarray(data, dtype=np.float64)


def _describe(fmt: str) -> str:
    return {"numpy": "a numpy array (.npy or .npz)", "numpy archive": "a numpy archive (.npz)",
            "torch": "torch tensors (.pt, loaded with weights_only=True)",
            "table": "a numeric table"}.get(fmt, fmt)


def _split_key(p: Path) -> tuple[Path, str | None]:
    """``FILE.npz:NAME`` -> (FILE.npz, NAME), when FILE.npz exists and the whole string is not a file."""
    text = str(p)
    if not p.exists() and ":" in text:
        head, _, key = text.rpartition(":")
        if head and key and Path(head).exists():
            return Path(head), key
    return p, None


def _argument_keys(name: str) -> list[str]:
    flag = name.lstrip("-").replace("-", "_")
    return [flag, flag.split("_")[0]]


def _pick(arrays, p: Path, key: str | None, name: str):
    """One array out of a named collection (see :func:`load_array` for the rule)."""
    if not isinstance(arrays, dict):
        if key is not None:
            raise InputError(f"{name}: {p} holds one array; drop ':{key}'")
        return arrays
    keys = [str(k) for k in arrays]
    if key is not None:
        if key not in arrays:
            raise InputError(f"{name}: {p} has no array named {key!r}; it holds: {', '.join(keys) or 'none'}")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for candidate in _argument_keys(name):
        if candidate in arrays:
            return arrays[candidate]
    raise InputError(f"{name}: {p} holds {len(keys)} arrays ({', '.join(keys) or 'none'}); pick one as "
                     f"{p}:NAME")


def _load_torch(p: Path, name: str):
    import torch

    obj = torch.load(p, map_location="cpu", weights_only=True)

    def to_array(value, where):
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                return value.detach().numpy()
            return value.detach().to(torch.float64 if value.is_floating_point() else value.dtype).numpy()
        if isinstance(value, np.ndarray):
            return value
        raise InputError(f"{name}: {where} holds a {type(value).__name__}, expected tensors")

    if isinstance(obj, dict):
        return {str(k): to_array(v, f"{p}[{k!r}]") for k, v in obj.items()}
    return to_array(obj, str(p))


def _load_table(p: Path, name: str, suffix: str) -> np.ndarray:
    import pandas as pd

    if suffix == ".csv":
        frame = pd.read_csv(p)
        if len(frame.columns) and all(_is_number(c) for c in frame.columns):
            frame = pd.read_csv(p, header=None)  # the first line is data, not a header
    else:
        frame = pd.read_parquet(p)
    if frame.shape[1] == 0:
        raise InputError(f"{name}: {p} has no columns")
    for column in frame.columns:
        dtype = frame[column].dtype
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            raise InputError(f"{name}: column {column!r} of {p} is not numeric ({dtype}); keep only numeric "
                             "columns")
    return frame.to_numpy()


def _is_number(text) -> bool:
    try:
        float(str(text))
        return True
    except ValueError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_paths(outputs: dict, inputs: dict | None = None, *, folder: bool = False) -> None:
    """Refuse, before anything is computed, output paths that would destroy an input or cannot be written.

    ``outputs`` and ``inputs`` map an argument name (``--out``) to a path (``None`` entries are skipped).
    An output is refused (:class:`InputError`) when it resolves to an input or to another output (the same
    real path: symlinks and hard links included), when it is an existing folder (a file is expected;
    ``folder=True``: an existing file, a folder is expected), or when its parent cannot hold it: a path
    under a regular file, or a folder without write permission.
    """
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
    seen: dict[str, Path] = {}
    for out_name, out in outputs.items():
        if out is None:
            continue
        out = Path(out)
        for in_name, inp in inputs.items():
            if _same_file(out, inp):
                raise InputError(f"{out_name} {out} is the same file as {in_name} {inp}; refusing to overwrite "
                                 "an input: choose another output path")
        for other_name, other in seen.items():
            if _same_file(out, other):
                raise InputError(f"{out_name} and {other_name} are the same file ({out}); give two paths")
        seen[out_name] = out
        if folder:
            if out.exists() and not out.is_dir():
                raise InputError(f"{out_name} {out} is a file, not a folder")
        elif out.is_dir():
            raise InputError(f"{out_name} {out} is a folder; give a file path")
        ancestor = out.parent if not folder else out
        while not ancestor.exists():
            if ancestor.parent == ancestor:
                break
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise InputError(f"{out_name} {out}: {ancestor} is a file, not a folder; choose another path")
        if ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
            raise InputError(f"{out_name} {out}: no permission to write in {ancestor}")


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


def format_table(rows: list[dict], columns: list[tuple[str, str]], *, max_width: int | None = None,
                 shrink: str | None = None) -> str:
    """A plain-text table: ``columns`` is a list of (key, header).

    With ``max_width``, the column ``shrink`` (a key) is narrowed until every line fits, its long values
    shortened in the middle (``softmax_re..._violation``) so that both ends stay readable.
    """
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    if max_width is not None and shrink is not None:
        i = [key for key, _ in columns].index(shrink)
        excess = sum(widths) + 2 * (len(widths) - 1) - max_width
        if excess > 0:
            widths[i] = max(len(cells[0][i]), 8, widths[i] - excess)
            for r in cells[1:]:
                r[i] = _shorten(r[i], widths[i])
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters in the middle (``..`` marks the cut)."""
    if len(text) <= width:
        return text
    head = (width - 2 + 1) // 2
    tail = width - 2 - head
    return text[:head] + ".." + (text[-tail:] if tail else "")


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
