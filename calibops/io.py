"""Reading probability maps and label maps from disk (NIfTI via nibabel, NumPy ``.npy`` / ``.npz``).

Layouts (what ``calibops evaluate`` expects, overridable with ``channel_dim``):

- NumPy probability maps: channel first, ``(C, *spatial)`` (nnU-Net's ``.npz`` with key
  ``probabilities`` follows this).
- NIfTI probability maps: channel last, ``(*spatial, C)`` (the 4th NIfTI dimension).
- Label maps: integer ``(*spatial)``; a trailing (NIfTI) or leading (NumPy) singleton channel is dropped.
- MetaImage / NRRD (``.mha``, ``.nrrd``) through SimpleITK (optional, extra ``sitk``), returned in the same
  axis order as nibabel gives for NIfTI, (x, y, z[, C]) (SimpleITK's own arrays are (z, y, x[, C])), and with
  a RAS affine like nibabel's, so files of both readers compare directly.
- nnU-Net output folders hold ``case.npz`` (key ``probabilities``, (C, z, y, x): SimpleITK's axis order,
  reversed against a NIfTI label read by nibabel) next to ``case.nii.gz`` (the segmentation): the
  ``.npz`` is the prediction, the image file next to it gives its geometry (:func:`sibling_image`).
- MONAI ``SaveImage`` writes ``case/case_<postfix>.nii.gz`` (one folder per case): :func:`list_cases`
  looks one folder level down when ``directory`` holds no file, and ``suffix`` strips the postfix.

nibabel (extra ``io``) and SimpleITK (extra ``sitk``) are optional: imported only when such a file is read.

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

from ._optional import require

__all__ = [
    "SUFFIXES",
    "FileReadError",
    "case_name",
    "load_affine",
    "sibling_image",
    "spacing",
    "is_nifti",
    "list_cases",
    "load_array",
    "load_label",
    "load_probabilities",
    "match_cases",
]

#: File suffixes ``calibops evaluate`` reads, longest first so ``.nii.gz`` wins over ``.gz``.
SUFFIXES = (".nii.gz", ".nii", ".npy", ".npz", ".mha", ".nrrd")

#: Suffixes of arrays without geometry (NumPy), and of images with an affine (NIfTI, MetaImage, NRRD).
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
SITK_SUFFIXES = (".mha", ".nrrd")

#: Keys tried, in order, in an ``.npz`` holding several arrays when no key is given.
NPZ_KEYS = ("probabilities", "softmax", "probs", "label", "seg", "arr_0")

_NPY_MAGIC = b"\x93NUMPY"
_FIX = {
    ".npy": "re-write it with numpy.save",
    ".npz": "re-write it with numpy.savez / numpy.savez_compressed",
    ".nii": "re-export it as NIfTI (e.g. with nibabel.save)",
    ".nii.gz": "re-export it as gzip-compressed NIfTI (e.g. with nibabel.save)",
    ".mha": "re-export it as MetaImage (e.g. with SimpleITK.WriteImage)",
    ".nrrd": "re-export it as NRRD (e.g. with SimpleITK.WriteImage)",
}


class FileReadError(ValueError):
    """A prediction or label file that cannot be read; the message names the file, the cause and the fix."""


class _NpzKeyError(ValueError):
    """An ``.npz`` that reads fine but lacks the array asked for (or holds several)."""


def _import_nibabel():
    return require("nibabel", extra="io", what="reading NIfTI files")


def _import_sitk():
    return require("SimpleITK", extra="sitk", what="reading .mha/.nrrd files")


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


def _check_link(p: Path) -> None:
    """A supported file name that is a symbolic link to nothing: say so (it is neither a case nor absent)."""
    if _suffix(p) is not None and p.is_symlink() and not p.exists():
        raise ValueError(
            f"{os.fspath(p)!r} is a symbolic link to {os.fspath(p.readlink())!r}, which does not exist (a dangling "
            "link); point it at the file, or remove it"
        )


def _case_files(d: Path) -> list[Path]:
    entries = sorted(d.iterdir())
    for p in entries:
        _check_link(p)
    files = [p for p in entries if p.is_file() and _suffix(p) is not None]
    if files:
        return files
    # MONAI SaveImage (separate_folder=True): one folder per case, the file inside
    out = []
    for sub in entries:
        if sub.is_dir():
            for p in sorted(sub.iterdir()):
                _check_link(p)
                if p.is_file() and _suffix(p):
                    out.append(p)
    return out


def _strip(name: str, suffix: str | None) -> str | None:
    """The case name of file ``name`` with ``suffix`` (a full ending like ``.npz`` / ``_seg.nii.gz``, or a
    postfix before the extension like ``_seg``) removed; None when the file does not carry the suffix."""
    s = _suffix(name)
    if s is None:
        return None
    if suffix is None:
        return name[: -len(s)]
    if _suffix(suffix) is not None or suffix.lower() in SUFFIXES:
        return name[: -len(suffix)] if name.lower().endswith(suffix.lower()) and len(name) > len(suffix) else None
    stem = name[: -len(s)]
    return stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else None


def list_cases(directory: str | os.PathLike, suffix: str | None = None) -> dict[str, Path]:
    """Map case name -> file for every supported file in ``directory`` (or, if it holds none, in its
    sub-folders: MONAI SaveImage's layout).

    ``suffix`` keeps only files ending with it and strips it from the case name: a full ending
    (``".npz"``, ``"_seg.nii.gz"``) or a postfix before the extension (``"_seg"``). Without it, a case with
    both a NumPy file and an image file of the same name (nnU-Net: ``case.npz`` probabilities next to
    ``case.nii.gz`` segmentation) takes the NumPy file. Raises ``FileNotFoundError`` if the directory does
    not exist, ``ValueError`` if it holds no matching file or two candidates for one case.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"directory not found: {os.fspath(directory)!r}")
    found: dict[str, list[Path]] = {}
    for p in _case_files(d):
        name = _strip(p.name, suffix)
        if name is not None:
            found.setdefault(name, []).append(p)
    cases: dict[str, Path] = {}
    for name, paths in found.items():
        if len(paths) > 1 and suffix is None:
            arrays = [p for p in paths if _suffix(p) in ARRAY_SUFFIXES]
            if len(arrays) == 1 and len(paths) == 2:  # nnU-Net: probabilities + segmentation
                paths = arrays
        if len(paths) > 1:
            raise ValueError(
                f"two files for case {name!r} in {os.fspath(d)!r}: {', '.join(p.name for p in paths)}; keep one "
                "of them, or pick the predictions with --pred-suffix (e.g. --pred-suffix .npz)"
            )
        cases[name] = paths[0]
    if not cases:
        what = f"files ending with {suffix!r}" if suffix else f"{'/'.join(SUFFIXES)} files"
        raise ValueError(f"no {what} in {os.fspath(d)!r}: point to the directory that holds them")
    return dict(sorted(cases.items()))


def sibling_image(path: str | os.PathLike) -> Path | None:
    """The image file (NIfTI / MetaImage / NRRD) with the same case name next to a NumPy file, if any
    (nnU-Net writes ``case.nii.gz`` next to ``case.npz``): its geometry is the prediction's."""
    p = Path(path)
    s = _suffix(p)
    if s not in ARRAY_SUFFIXES:
        return None
    stem = p.name[: -len(s)]
    for ext in IMAGE_SUFFIXES:
        q = p.with_name(stem + ext)
        if q.is_file():
            return q
    return None


def load_affine(path: str | os.PathLike) -> np.ndarray | None:
    """The 4x4 voxel-to-world (RAS, mm) affine of an image file (None for NumPy files).

    NIfTI: nibabel's ``img.affine``; MetaImage / NRRD: SimpleITK's direction, spacing and origin converted
    from LPS to RAS. Raises :class:`FileReadError` for a file that cannot be read.
    """
    s = _suffix(path)
    p = os.fspath(path)
    if s in ARRAY_SUFFIXES or s is None:
        return None
    try:
        if s in SITK_SUFFIXES:
            sitk = _import_sitk()
            reader = sitk.ImageFileReader()
            reader.SetFileName(p)
            reader.ReadImageInformation()
            dim = reader.GetDimension()
            direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)
            a = np.eye(4)
            a[:dim, :dim] = direction @ np.diag(reader.GetSpacing())
            a[:dim, 3] = reader.GetOrigin()
            return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a  # LPS -> RAS
        nib = _import_nibabel()
        return np.asarray(nib.load(p).affine, dtype=np.float64)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - one message naming the file
        raise FileReadError(f"cannot read the header of {p!r}: {_cause(exc)}; {_FIX[s]}") from exc


def spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) of each axis: the column norms of the affine's 3x3 part."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def match_cases(
    pred_dir: str | os.PathLike, label_dir: str | os.PathLike, pred_suffix: str | None = None
) -> list[tuple[str, Path, Path]]:
    """Pair prediction and label files by case name: ``[(name, pred_path, label_path), ...]`` sorted.

    Every prediction must have a label and every label a prediction; otherwise ``ValueError`` lists the
    unmatched names (no partial evaluation). ``pred_suffix``: see :func:`list_cases`.
    """
    preds = list_cases(pred_dir, pred_suffix)
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
    if s in SITK_SUFFIXES:
        sitk = _import_sitk()
    try:
        if os.path.getsize(p) == 0:
            raise FileReadError(f"cannot read {p!r}: the file is empty; {_FIX[s]}")
        if s in (".nii", ".nii.gz"):
            img = nib.load(p)
            # asanyarray(dataobj) keeps the stored dtype (integer labels stay integer) unless scaled
            return np.asanyarray(img.dataobj)
        if s in SITK_SUFFIXES:
            img = sitk.ReadImage(p)
            a = sitk.GetArrayFromImage(img)  # (z, y, x[, C])
            nd = img.GetDimension()
            order = list(range(nd))[::-1] + list(range(nd, a.ndim))
            return np.ascontiguousarray(np.transpose(a, order))  # (x, y, z[, C]) as nibabel
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
    return 0 if _suffix(path) in ARRAY_SUFFIXES else -1


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
    a = np.moveaxis(a, cd, 0)
    if _suffix(path) in IMAGE_SUFFIXES and a.ndim > 4:
        # NIfTI keeps the channel in dimension 5 (x, y, z, t, c): MONAI's writer leaves a singleton t
        keep = [0, *range(1, 4), *(k for k in range(4, a.ndim) if a.shape[k] != 1)]
        a = a.reshape([a.shape[k] for k in keep])
    return np.ascontiguousarray(a, dtype=np.float32)


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
