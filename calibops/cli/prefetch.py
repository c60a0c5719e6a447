"""Read the next cases in a background thread while the current one is computed (``calibops evaluate --prefetch``).

Reading a case is mostly decompression (``.npz`` through zlib, ``.nii.gz`` through gzip) and computing it is the
statistics kernels; both release the GIL, so one reader thread overlaps them. :class:`Prefetcher` keeps at most
``depth`` cases read ahead of the one the caller is working on (memory: ``depth + 1`` cases), reads them in order,
and hands each case's exception back to the caller at that case's turn, so errors surface in the same order as
without prefetching. ``depth=0`` reads each case in the calling thread when it is asked for.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")
R = TypeVar("R")


class _Result(Generic[R]):
    """The outcome of reading one item: its value, or the exception reading raised."""

    __slots__ = ("exc", "value")

    def __init__(self, value: R | None = None, exc: BaseException | None = None) -> None:
        self.value, self.exc = value, exc

    def get(self) -> R:
        """The value, or raise the reader's exception (in the caller's thread)."""
        if self.exc is not None:
            raise self.exc
        return self.value  # type: ignore[return-value]


class Prefetcher(Generic[T, R]):
    """Iterate over ``(item, result)`` for ``items`` in order, where ``result.get()`` returns ``read(item)`` or raises
    what it raised; up to ``depth`` items are read ahead in one daemon thread.

    Use as a context manager (or call :meth:`close`): leaving early stops the reader after the item it is reading.
    After a read raises, nothing further is read (the caller stops at that item).
    """

    def __init__(self, items: Sequence[T], read: Callable[[T], R], depth: int = 1) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an int >= 0 (cases read ahead), got {depth!r}")
        self.items = list(items)
        self.read = read
        self.depth = depth
        self._ready: deque[_Result[R]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        for item in self.items:
            with self._cond:
                # wait for a free slot: at most `depth` results waiting for the caller
                self._cond.wait_for(lambda: self._stop or len(self._ready) < self.depth)
                if self._stop:
                    return
            try:
                res: _Result[R] = _Result(value=self.read(item))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller at this item's turn
                res = _Result(exc=exc)
            with self._cond:
                self._ready.append(res)
                self._cond.notify_all()
            if res.exc is not None:
                return

    def __iter__(self) -> Iterator[tuple[T, _Result[R]]]:
        if self.depth == 0:
            for item in self.items:
                try:
                    res: _Result[R] = _Result(value=self.read(item))
                except Exception as exc:  # noqa: BLE001 - raised by res.get(), as with a reader thread
                    res = _Result(exc=exc)
                yield item, res
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="calibops-prefetch", daemon=True)
            self._thread.start()
        for item in self.items:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._ready))
                res = self._ready.popleft()
                self._cond.notify_all()  # a slot is free: the reader may start the next item
            yield item, res
            if res.exc is not None:
                return

    def close(self) -> None:
        """Stop reading ahead (the item being read is finished and dropped) and release what was read."""
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
