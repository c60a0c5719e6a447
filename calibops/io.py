"""Reading probability maps and label maps from disk (NIfTI via nibabel, NumPy ``.npy`` / ``.npz``).

Layouts (what ``calibops evaluate`` expects, overridable with ``channel_dim``):

- NumPy probability maps: channel first, ``(C, *spatial)`` (nnU-Net's ``.npz`` with key
  ``probabilities`` follows this).
- NIfTI probability maps: channel last, ``(*spatial, C)`` (the 4th NIfTI dimension).
- Label maps: integer ``(*spatial)``; a trailing (NIfTI) or leading (NumPy) singleton channel is dropped.

nibabel is an optional dependency (extra ``io``): it is imported only when a NIfTI file is read.

A file that cannot be read (missing, unreadable, empty, truncated, corrupt, not the format its suffix says)
raises :class:`FileReadError` (a ``ValueError``) naming the file, the cause and the fix, never the reader's
own exception.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "SUFFIXES",
    "FileReadError",
    "case_name",
    "is_nifti",
    "list_cases",
    "load_array",
    "load_label",
    "load_probabilities",
    "match_cases",
]

#: File suffixes ``calibops evaluate`` reads, longest first so ``.nii.gz`` wins over ``.gz``.
SUFFIXES = (".nii.gz", ".nii", ".npy", ".npz")

#: Keys tried, in order, in an ``.npz`` holding several arrays when no key is given.
NPZ_KEYS = ("probabilities", "softmax", "probs", "label", "seg", "arr_0")

_NPY_MAGIC = b"\x93NUMPY"
_FIX = {
    ".npy": "re-write it with numpy.save",
    ".npz": "re-write it with numpy.savez / numpy.savez_compressed",
    ".nii": "re-export it as NIfTI (e.g. with nibabel.save)",
    ".nii.gz": "re-export it as gzip-compressed NIfTI (e.g. with nibabel.save)",
}


class FileReadError(ValueError):
    """A prediction or label file that cannot be read; the message names the file, the cause and the fix."""


class _NpzKeyError(ValueError):
    """An ``.npz`` that reads fine but lacks the array asked for (or holds several)."""


def _import_nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading NIfTI files needs nibabel, an optional dependency of calibops: "
            "pip install 'calibops[io]' (or pip install nibabel)"
        ) from exc
    return nibabel


def _suffix(path: str | os.PathLike) -> str | None:
    name = os.fspath(path).lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    return None


def is_nifti(path: str | os.PathLike) -> bool:
    """True for ``.nii`` / ``.nii.gz`` files."""
    return _suffix(path) in (".nii", ".nii.gz")


def case_name(path: str | os.PathLike) -> str:
    """The file name without its (known) suffix: how prediction and label files are matched."""
    name = os.path.basename(os.fspath(path))
    s = _suffix(name)
    if s is None:
        raise ValueError(f"unsupported file {name!r}: expected one of {', '.join(SUFFIXES)}")
    return name[: -len(s)]


def list_cases(directory: str | os.PathLike) -> dict[str, Path]:
    """Map case name -> file for every supported file directly in ``directory``.

    Raises ``FileNotFoundError`` if the directory does not exist, ``ValueError`` if it holds no supported
    file or two files with the same case name (e.g. ``a.npy`` and ``a.nii.gz``).
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"directory not found: {os.fspath(directory)!r}")
    cases: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if not p.is_file() or _suffix(p) is None:
            continue
        name = case_name(p)
        if name in cases:
            raise ValueError(
                f"two files for case {name!r} in {os.fspath(d)!r}: {cases[name].name}, {p.name}; keep one of them"
            )
        cases[name] = p
    if not cases:
        raise ValueError(f"no {'/'.join(SUFFIXES)} files in {os.fspath(d)!r}: point to the directory that holds them")
    return cases


def match_cases(pred_dir: str | os.PathLike, label_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """Pair prediction and label files by case name: ``[(name, pred_path, label_path), ...]`` sorted.

    Every prediction must have a label and every label a prediction; otherwise ``ValueError`` lists the
    unmatched names (no partial evaluation).
    """
    preds = list_cases(pred_dir)
    labels = list_cases(label_dir)
    no_label = sorted(set(preds) - set(labels))
    no_pred = sorted(set(labels) - set(preds))
    if no_label or no_pred:
        parts = []
        if no_label:
            parts.append(f"{len(no_label)} prediction(s) without a label: {_short(no_label)}")
        if no_pred:
            parts.append(f"{len(no_pred)} label(s) without a prediction: {_short(no_pred)}")
        raise ValueError("prediction and label files do not pair up by name; " + "; ".join(parts))
    return [(name, preds[name], labels[name]) for name in sorted(preds)]


def _short(names: Iterable[str], k: int = 5) -> str:
    names = list(names)
    head = ", ".join(repr(n) for n in names[:k])
    return head + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def load_array(path: str | os.PathLike, npz_key: str | None = None) -> np.ndarray:
    """Read one array from ``.nii``/``.nii.gz`` (nibabel, data as stored), ``.npy`` or ``.npz``.

    Raises :class:`FileReadError` for a file that cannot be read as its suffix says, ``ValueError`` for an
    ``.npz`` without the requested array, ``ImportError`` when nibabel is missing for a NIfTI file.
    """
    s = _suffix(path)
    p = os.fspath(path)
    if s is None:
        raise ValueError(f"unsupported file {p!r}: expected one of {', '.join(SUFFIXES)}")
    if s in (".nii", ".nii.gz"):
        nib = _import_nibabel()
    try:
        if os.path.getsize(p) == 0:
            raise FileReadError(f"cannot read {p!r}: the file is empty; {_FIX[s]}")
        if s in (".nii", ".nii.gz"):
            img = nib.load(p)
            # asanyarray(dataobj) keeps the stored dtype (integer labels stay integer) unless scaled
            return np.asanyarray(img.dataobj)
        if s == ".npy":
            with open(p, "rb") as f:
                if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                    raise FileReadError(f"cannot read {p!r}: not a NumPy .npy file (no .npy header); {_FIX[s]}")
            return np.load(p, allow_pickle=False)
        if not zipfile.is_zipfile(p):
            raise FileReadError(f"cannot read {p!r}: not a NumPy .npz (zip) archive, or a truncated one; {_FIX[s]}")
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if npz_key is not None:
                if npz_key not in keys:
                    raise _NpzKeyError(f"{p!r} has no array {npz_key!r} (it has {keys}); pick one with --npz-key")
                return z[npz_key]
            if len(keys) == 1:
                return z[keys[0]]
            for k in NPZ_KEYS:
                if k in keys:
                    return z[k]
            raise _NpzKeyError(f"{p!r} holds several arrays {keys}; say which one with npz_key / --npz-key")
    except (FileReadError, _NpzKeyError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message naming the file
        raise FileReadError(f"cannot read {p!r}: {_cause(exc)}; {_FIX[s]}") from exc


def _cause(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied (make the file readable)"
    if isinstance(exc, FileNotFoundError):
        return "the file does not exist"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    if isinstance(exc, (EOFError, zipfile.BadZipFile)):
        return f"the file is truncated or corrupt ({type(exc).__name__}: {exc})"
    return f"the file is corrupt, truncated or not in the format its name says ({type(exc).__name__}: {exc})"


def _channel_dim(path: str | os.PathLike, channel_dim: int | None) -> int:
    if channel_dim is not None:
        return channel_dim
    return -1 if is_nifti(path) else 0


def load_probabilities(
    path: str | os.PathLike, channel_dim: int | None = None, npz_key: str | None = None
) -> np.ndarray:
    """A probability map as float32 ``(C, *spatial)``.

    ``channel_dim`` defaults to -1 for NIfTI and 0 for NumPy files (see the module docstring).
    """
    a = load_array(path, npz_key)
    if a.ndim < 2:
        raise ValueError(
            f"probability map {os.fspath(path)!r} has shape {a.shape}: need a channel axis and spatial axes, "
            "(C, *spatial) for NumPy or (*spatial, C) for NIfTI"
        )
    cd = _channel_dim(path, channel_dim)
    if not -a.ndim <= cd < a.ndim:
        raise ValueError(
            f"channel_dim {cd} is out of range for {os.fspath(path)!r} with shape {a.shape}: pass --channel-dim "
            f"between {-a.ndim} and {a.ndim - 1}"
        )
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(
            f"probability map {os.fspath(path)!r} has dtype {a.dtype}: save the probabilities as a float array"
        )
    return np.ascontiguousarray(np.moveaxis(a, cd, 0), dtype=np.float32)


def load_label(path: str | os.PathLike, spatial_ndim: int | None = None, npz_key: str | None = None) -> np.ndarray:
    """An integer label map as int64 ``(*spatial)``.

    A singleton channel (trailing for NIfTI, leading for NumPy) is dropped when ``spatial_ndim`` says the
    array has one dimension too many. Float label files must hold whole numbers.
    """
    a = load_array(path, npz_key)
    if spatial_ndim is not None and a.ndim == spatial_ndim + 1:
        if is_nifti(path) and a.shape[-1] == 1:
            a = a[..., 0]
        elif a.shape[0] == 1:
            a = a[0]
        elif a.shape[-1] == 1:
            a = a[..., 0]
    if np.issubdtype(a.dtype, np.bool_):
        a = a.astype(np.int64)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"label map {os.fspath(path)!r} holds non-integer values: save integer class indices")
    elif not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"label map {os.fspath(path)!r} has dtype {a.dtype}: save integer class indices")
    return np.ascontiguousarray(a, dtype=np.int64)
