"""The output directory of ``calibops evaluate``: checked before any case is read, replaced as a whole at the end.

- :func:`check_output_dir` runs before the first case is read: ``--out`` must not be (or lie inside) an input
  folder (the next run would read the outputs as cases), must not hold an input folder, must hold nothing but a
  previous run's outputs (it is replaced as a whole), and a temporary directory must be creatable next to it.
- :func:`replace_output_dir` writes every output into a fresh temporary directory next to ``--out`` and renames
  it into place at the end: a previous run's files never survive next to new ones, and a failure (or Ctrl-C)
  leaves ``--out`` as it was.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["OUTPUT_NAMES", "OutputDirError", "check_output_dir", "replace_output_dir"]

OUTPUT_NAMES = (
    "per_image.csv",
    "summary.csv",
    "summary.json",
    "groups.csv",
    "dataset_histogram.png",
    "dataset_histogram.pdf",
    "dataset_histogram.npz",
    "groups_reliability_*.png",
)
"""The files ``calibops evaluate`` writes (shell patterns): an existing ``--out`` may hold only these."""


class OutputDirError(Exception):
    """A problem with ``--out``, reported as one line; ``status`` is the exit status (2 usage, 1 not writable)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _is_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_NAMES)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _not_writable(out: str, exc: OSError) -> OutputDirError:
    return OutputDirError(f"cannot write the outputs into --out {out!r}: {exc}; choose a writable directory", 1)


def _foreign(out: str, real: Path) -> None:
    """Refuse an existing ``--out`` holding anything but a previous run's outputs (it is replaced as a whole)."""
    try:
        entries = sorted(os.listdir(real))
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    foreign = [e for e in entries if not _is_output(e) or not (real / e).is_file() or (real / e).is_symlink()]
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:5])
        shown += f", ... ({len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise OutputDirError(
            f"--out {out!r} holds {shown}, which calibops evaluate did not write: the outputs replace --out as a "
            "whole; choose a new or empty directory (or a previous output directory)",
            2,
        )


def check_output_dir(out: str | os.PathLike, inputs: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """Check ``--out`` before any case is read; ``inputs``: ``(option, folder)`` pairs (``--pred``, ``--label``).

    Raises :class:`OutputDirError`: exit status 2 for a directory that cannot be used (an existing file, inside or
    holding an input folder or the current directory, holding files calibops did not write), 1 when nothing can be
    written next to it.
    """
    shown = os.fspath(out)
    real = Path(os.path.realpath(out))
    if real.exists() and not real.is_dir():
        raise OutputDirError(f"--out {shown!r} names an existing file; pass a new or existing directory", 2)
    for opt, folder in inputs:
        f = Path(os.path.realpath(folder))
        if _inside(real, f):
            raise OutputDirError(
                f"--out {shown!r} is inside {opt} {os.fspath(folder)!r}: the next run would read the outputs as "
                "cases; write them outside the input folders",
                2,
            )
        if _inside(f, real):
            raise OutputDirError(
                f"--out {shown!r} holds {opt} {os.fspath(folder)!r}: the outputs replace --out as a whole; choose a "
                "directory outside the input folders",
                2,
            )
    if _inside(Path(os.path.realpath(os.getcwd())), real):
        raise OutputDirError(
            f"--out {shown!r} is the current directory or holds it: the outputs replace --out as a whole; name a "
            "new directory such as --out results",
            2,
        )
    if real.is_dir():
        _foreign(shown, real)
        if not os.access(real, os.W_OK | os.X_OK):
            raise _not_writable(shown, PermissionError(13, "Permission denied", os.fspath(real)))
    ancestor = real.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(f"--out {shown!r}: {os.fspath(ancestor)!r} is a file, not a directory; pick another", 2)
    try:  # the temporary directory the outputs are written into must be creatable there
        os.rmdir(tempfile.mkdtemp(prefix=".calibops-check-", dir=ancestor))
    except OSError as exc:
        raise _not_writable(shown, exc) from exc


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def replace_output_dir(out: str | os.PathLike, write: Callable[[Path], None]) -> list[Path]:
    """Run ``write(tmp)`` on a fresh directory next to ``out``, then rename it to ``out`` (a previous ``out``, which
    holds only a previous run's outputs, is moved aside first and deleted after). Returns the written files as
    ``out / name``. On any failure or interrupt the temporary directory (and any parent made for it) is removed
    and ``out`` is left as it was; an ``OSError`` becomes :class:`OutputDirError` (status 1)."""
    shown = os.fspath(out)
    real = Path(os.path.realpath(out))
    made: list[Path] = []
    p = real.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    tmp: Path | None = None
    done = False
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        existed = real.is_dir()
        mode = real.stat().st_mode & 0o7777 if existed else _umask_mode()
        tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.calibops-", dir=real.parent))
        write(tmp)
        os.chmod(tmp, mode)
        names = sorted(os.listdir(tmp))
        if existed:
            _foreign(shown, real)  # still only a previous run's outputs
            old = Path(tempfile.mkdtemp(prefix=f".{real.name}.calibops-old-", dir=real.parent))
            try:
                os.rename(real, old / "previous")
            except BaseException:
                old.rmdir()
                raise
            try:
                os.rename(tmp, real)
            except BaseException:
                os.rename(old / "previous", real)  # put the previous outputs back
                old.rmdir()
                raise
            done = True
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, real)
            done = True
        return [Path(out) / n for n in names]
    except OSError as exc:
        raise _not_writable(shown, exc) from exc
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for d in made:  # parents made for the outputs, deepest first
                try:
                    d.rmdir()
                except OSError:
                    break
