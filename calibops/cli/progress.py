"""The package's one progress display (used by ``calibops evaluate`` and ``calibops demo``).

:class:`Progress` is a bar over a known number of units on stderr. It uses ``tqdm`` when that is installed
(the optional extras ``io`` and ``test`` pull it in) and otherwise a dependency-free fallback that redraws
one line in place on a terminal and, when stderr is a file or a pipe, writes a line at every tenth of the
work (so logs stay short). :func:`track` wraps an iterable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["Progress", "track"]

T = TypeVar("T")

_BAR_WIDTH = 24


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """A progress bar over ``total`` units: ``update(n, **postfix)`` after each unit, ``close()`` at the end.

    Args:
        total: number of units of work (>= 0).
        desc: label shown before the bar.
        unit: name of one unit (``"case"``, ``"step"``).
        enabled: ``False`` shows nothing (every method is then a no-op).
        file: stream to write to (default ``sys.stderr``).
        use_tqdm: ``None`` (default) uses tqdm if it is installed; ``False`` forces the built-in fallback;
            ``True`` requires tqdm.

    Also a context manager (``with Progress(...) as bar:``) that closes the bar on exit.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        unit: str = "it",
        enabled: bool = True,
        file: TextIO | None = None,
        use_tqdm: bool | None = None,
    ) -> None:
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ValueError(f"total must be a non-negative int, got {total!r}")
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, bool(enabled)
        self.file = sys.stderr if file is None else file
        self.done = 0
        self._postfix = ""
        self._start = time.perf_counter()
        self._last_tenth = -1
        self._closed = False
        self._tqdm: Any = None
        if not self.enabled:
            return
        if use_tqdm is None:
            use_tqdm = _tqdm_available()
        if use_tqdm:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
        else:
            self._tty = bool(getattr(self.file, "isatty", lambda: False)())

    def update(self, n: int = 1, **postfix: float | str) -> None:
        """Mark ``n`` more units done; ``postfix`` values (e.g. ``loss=0.42``) are shown after the bar."""
        if not self.enabled or self._closed:
            return
        self.done += n
        if postfix:
            self._postfix = "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items()
            )
        if self._tqdm is not None:
            if postfix:
                self._tqdm.set_postfix(postfix, refresh=False)
            self._tqdm.update(n)
            return
        tenth = int(10 * self.done / self.total) if self.total else 10
        if not self._tty and tenth == self._last_tenth and self.done < self.total:
            return  # to a file or pipe: one line per tenth of the work
        self._last_tenth = tenth
        self.file.write(("\r" + self._line()) if self._tty else (self._line() + "\n"))
        self.file.flush()

    def set_description(self, desc: str) -> None:
        """Change the label shown before the bar (e.g. the phase of the work)."""
        self.desc = desc
        if self._tqdm is not None:
            self._tqdm.set_description(desc, refresh=False)

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print ``text`` (default to ``sys.stdout``) without garbling the bar: it is redrawn below the text."""
        out = sys.stdout if file is None else file
        if self._tqdm is not None and not self._closed:
            self._tqdm.write(text, file=out)
            return
        live = self.enabled and not self._closed and self._tty
        if live:  # clear the in-place line first
            self.file.write("\r" + " " * len(self._line()) + "\r")
            self.file.flush()
        out.write(text + "\n")
        out.flush()
        if live and self.done:
            self.file.write(self._line())
            self.file.flush()

    def _line(self) -> str:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(round(_BAR_WIDTH * frac))
        elapsed = time.perf_counter() - self._start
        left = f", {elapsed / self.done * (self.total - self.done):.0f}s left" if 0 < self.done < self.total else ""
        width = len(str(self.total))
        label = f"{self.desc}: " if self.desc else ""
        post = f"  {self._postfix}" if self._postfix else ""
        return (
            f"{label}|{'#' * filled}{'.' * (_BAR_WIDTH - filled)}| {self.done:>{width}}/{self.total} {self.unit}"
            f"{post}  [{elapsed:.0f}s{left}]"
        )

    def close(self) -> None:
        """Finish the bar (ends the in-place line on a terminal). Safe to call twice."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty:
            self.file.write("\n")
            self.file.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    items: Iterable[T],
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    total: int | None = None,
    file: TextIO | None = None,
    use_tqdm: bool | None = None,
) -> Iterator[T]:
    """Yield the elements of ``items`` while showing a :class:`Progress` bar over them.

    ``total`` defaults to ``len(items)``; pass it for an iterable without a length.
    """
    if total is None:
        if not hasattr(items, "__len__"):
            raise TypeError("track: items has no len(); pass total=")
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc=desc, unit=unit, enabled=enabled, file=file, use_tqdm=use_tqdm) as bar:
        for item in items:
            yield item
            bar.update()
