"""``calibops evaluate`` under ``torchrun``: one process per rank, each evaluating its share of the cases.

    torchrun --nproc-per-node 2 -m calibops evaluate --pred P --label L --out O
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m calibops evaluate ... --device cuda

How a run goes (:class:`Session`):

1. The ``torch.distributed`` environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``) is read; with ``WORLD_SIZE`` > 1 the process group is initialised: gloo on
   the CPU, nccl with ``--device cuda`` (one GPU per process: ``cuda:LOCAL_RANK``), with ``--dist-timeout`` on
   every collective.
2. Every rank lists the cases (the ranks must see the same files: checked) and :func:`shard_by_size` splits them,
   balanced by file size: the same deterministic split on every rank, nothing is sent.
3. Each rank reads and evaluates only its own cases, without waiting for the others. After each case it adds one
   to a counter in the process group's key-value store (rank 0's progress bar shows the total over all ranks) and
   looks whether any rank has failed; a failing rank raises a flag there, so every rank stops after the case it
   is computing.
4. When every rank has stopped, one all-gather collects each rank's status: an error on any rank becomes the
   same error on every rank (the one line, naming the file and the rank; exit status 1, or 2 for a usage error),
   so no rank hangs and nothing is written. Otherwise the sums are all-reduced once (float64) and the per-image
   records gathered, ordered by case name as in one process, and the process group is closed.
5. Rank 0 alone computes the summary and writes the outputs; the other ranks wait for its exit status (through
   the store) and exit with it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Session", "add_arguments", "case_bytes", "default_prefetch", "fingerprint", "shard_by_size"]

#: Variables ``torchrun`` sets for every worker that a run needs (``LOCAL_RANK`` defaults to ``RANK``).
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_POLL_S = 0.2  # seconds between looks at the store while waiting (every rank polls)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``calibops evaluate`` for devices, reading ahead and ``torchrun`` runs."""
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the statistics are computed; cuda: one GPU per process, cuda:LOCAL_RANK under torchrun "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="cases read ahead in a background thread while the current one is computed; 0 reads in turn "
        "(memory: N + 1 cases). Default: 1 when each process has two or more CPU cores, else 0 (the reader would "
        "only compete with the computing thread)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: the time limit of the collectives between ranks (they start only once every rank "
        "has finished its cases, so it never limits the evaluation itself) (default: %(default)s)",
    )


def default_prefetch(environ: dict[str, str] | None = None, cores: int | None = None) -> int:
    """``--prefetch`` when not given: 1 when each process of this node has at least two CPU cores (the reader then
    has a core to itself), else 0. On a 2-core machine with 2 ranks reading ahead made each rank 10-30% slower
    (docs/performance.md)."""
    env = os.environ if environ is None else environ
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        per_node = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        per_node = 1
    return 1 if cores // per_node >= 2 else 0


def case_bytes(pred_path: str | os.PathLike, label_paths: Sequence[str | os.PathLike]) -> int:
    """The size on disk of a case (prediction and every label file); 0 for a file that cannot be stat'ed (it
    fails when it is read, on the rank that owns it)."""
    total = 0
    for p in (pred_path, *label_paths):
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def shard_by_size(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Split items (indices into ``sizes``) across ``world_size`` ranks, balanced by size: the largest first,
    each to the rank with the least so far (ties: the lower rank; equal sizes: the lower index first). The
    result is deterministic; each rank's indices are returned sorted. The largest load is at most 4/3 of the
    best possible split (the greedy longest-first bound)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shards[r].append(i)
        loads[r] += int(sizes[i])
    return [sorted(s) for s in shards]


def _error_types() -> tuple[type[BaseException], type[BaseException], tuple[type[BaseException], ...]]:
    from .errors import EvaluationError, UsageError

    return UsageError, EvaluationError, (EvaluationError, ValueError, TypeError, OSError, ImportError, RuntimeError)


def describe(exc: BaseException) -> tuple[int, str]:
    """``(exit status, one-line message)`` of an exception, as ``calibops evaluate`` reports it."""
    usage, _, known = _error_types()
    line = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, usage):
        return 2, line
    if isinstance(exc, known):
        return 1, line
    return 1, (
        f"unexpected {type(exc).__name__}: {line} (a bug: please report it; CALIBOPS_DEBUG=1 shows the traceback)"
    )


def _debug() -> bool:
    return os.environ.get("CALIBOPS_DEBUG", "0") not in ("", "0")


class Session:
    """One process of an evaluation: rank ``rank`` of ``world_size`` (1 and 0 for a plain run).

    A plain run (no ``torchrun`` environment, or ``WORLD_SIZE=1``) goes through the same calls, which then do
    nothing but run the local code: :meth:`together` re-raises a local error as it is.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, problem: str | None = None) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.problem = problem  # a bad torchrun environment, reported as a usage error by start()
        self.device: Any = None
        self.store: Any = None
        self._control: Any = None  # the group of the status all-gathers (gloo, also under nccl)
        self._started = False
        self._waits = 0
        self._done = 0
        self.timeout_s = 300.0

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Session:
        """The session ``torchrun`` describes in the environment (a plain run without ``WORLD_SIZE``)."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            return cls(problem=f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {_env_text(env)}")
        if world < 1 or not 0 <= rank < world or local < 0:
            return cls(problem=f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got {_env_text(env)}")
        if world == 1:
            return cls(local_rank=local)
        missing = [k for k in ENV_VARS if k not in env]
        if missing:
            return cls(
                rank=rank,
                world_size=world,
                local_rank=local,
                problem=f"WORLD_SIZE={world} is set but {', '.join(missing)} not: start the ranks with torchrun",
            )
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """This process writes the outputs and shows progress (rank 0)."""
        return self.rank == 0

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Ranks other than 0 print nothing (rank 0 reports for all); ``CALIBOPS_DEBUG=1`` keeps their output."""
        if self.writer or _debug():
            yield
            return
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield

    def start(self, args: argparse.Namespace) -> None:
        """Pick the device and, with several ranks, initialise the process group (gloo, or nccl for cuda)."""
        import torch

        from .errors import UsageError

        if self.problem is not None:
            raise UsageError(f"torch.distributed environment: {self.problem}")
        prefetch = getattr(args, "prefetch", None)
        if prefetch is None:
            prefetch = default_prefetch()
            if hasattr(args, "prefetch"):
                args.prefetch = prefetch
        dist_timeout = getattr(args, "dist_timeout", 300.0)
        if prefetch < 0:
            raise UsageError(f"--prefetch must be >= 0 (cases read ahead), got {prefetch}")
        if not (dist_timeout > 0 and dist_timeout < float("inf")):
            raise UsageError(f"--dist-timeout must be a positive number of seconds, got {dist_timeout}")
        if getattr(args, "device", "cpu") == "cuda":
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise UsageError(
                    f"--device cuda: LOCAL_RANK {self.local_rank} but {n} GPU(s) visible on this node: start at most "
                    f"{n} processes per node (torchrun --nproc-per-node {n}), one per GPU"
                )
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_available():
            raise UsageError("torchrun started several ranks but this torch has no torch.distributed")
        if dist.is_initialized():
            raise UsageError("torch.distributed is already initialised in this process; run calibops on its own")
        self.timeout_s = float(dist_timeout)
        timeout = datetime.timedelta(seconds=dist_timeout)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        kw: dict[str, Any] = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, init_method="env://", rank=self.rank, world_size=self.world_size, timeout=timeout, **kw
        )
        self._started = True
        self._control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        from torch.distributed import distributed_c10d

        # keys of this run (a restarted torchrun job starts new ones)
        prefix = f"calibops/evaluate/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = dist.PrefixStore(prefix, distributed_c10d._get_default_store())

    # ------------------------------------------------------------ collectives
    def _gather(self, payload: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, payload, group=self._control)
        return out

    @contextlib.contextmanager
    def together(
        self, payload: dict[str, Any] | None = None, wait: bool = False, on_poll: Callable[[int], None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Run a block on every rank and fail collectively: if it raises on any rank, every rank raises the same
        one-line error (that of the failing case first in ``payload["at"]`` order, else the lowest rank).

        Yields a dict: the block may fill in this rank's ``payload`` (picklable); after the block it holds
        ``"all"``, every rank's payload. ``wait=True`` (the case loop): a failure raises the store's flag at once,
        and the ranks meet only after each has stopped (:meth:`stopped` tells the others to stop), polling the
        store meanwhile (``on_poll(cases done over all ranks)`` on every poll), so no collective waits for the
        evaluation. A plain run re-raises the local exception itself.
        """
        step: dict[str, Any] = {"payload": dict(payload or {})}
        if not self.distributed:
            yield step
            step["all"] = [step["payload"]]
            return
        error: tuple[int, str] | None = None
        try:
            yield step
        except BaseException as exc:  # noqa: BLE001 - every rank learns of it below
            if isinstance(exc, KeyboardInterrupt) or (_debug() and describe(exc)[1].startswith("unexpected")):
                raise
            error = describe(exc)
            if wait:
                self.store.add("errors", 1)
        if wait:
            self._waits += 1
            key = f"stopped/{self._waits}"  # one counter per waiting block
            self.store.add(key, 1)
            while self.store.add(key, 0) < self.world_size:
                if on_poll is not None:
                    on_poll(self.done(0))
                time.sleep(_POLL_S)
            if on_poll is not None:
                on_poll(self.done(0))
        statuses = self._gather({"rank": self.rank, "error": error, "payload": step["payload"]})
        step["all"] = [s["payload"] for s in statuses]
        failed = [s for s in statuses if s["error"] is not None]
        if failed:
            first = min(failed, key=lambda s: (s["payload"].get("at", float("inf")), s["rank"]))
            code, line = first["error"]
            self.fail(code, f"{line} [rank {first['rank']} of {self.world_size}]")

    def fail(self, code: int, line: str) -> None:
        """Raise the error every rank reports: exit status ``code`` (2: usage, else 1) with this line."""
        usage, evaluation, _ = _error_types()
        raise (usage if code == 2 else evaluation)(line)

    def stopped(self) -> bool:
        """Whether any rank has failed (then every rank stops after its current case); False in a plain run."""
        return self.distributed and self.store.add("errors", 0) > 0

    def done(self, n: int = 1) -> int:
        """Count ``n`` more cases done by this rank; returns the cases done over all ranks."""
        if not self.distributed:
            self._done += n
            return self._done
        return int(self.store.add("done", n))

    def merge(self, metric: Any, order: dict[str, int]) -> Any:
        """Sum ``metric`` over the ranks (one float64 all-reduce) and gather its per-image records; rank 0 gets a
        process-local metric holding the sums and every record ordered by ``order[case]`` (the order of a plain
        run), the other ranks None. Closes the process group (the store stays). A plain run returns ``metric``."""
        if not self.distributed:
            return metric
        import torch.distributed as dist

        state = {k: v.detach().cpu() for k, v in metric._synced().items()}
        recs = metric.records(gather=True)
        dist.destroy_process_group()
        self._started = False
        if not self.writer:
            return None
        for r in recs:
            r.pop("rank", None)
        # a stable sort: the class order within each case stays as written
        recs.sort(key=lambda r: order[r["image"]])
        # a process-local copy (no process group): the same configuration, the summed state, every record
        sd = metric.state_dict()
        sd.update(state)
        sd["records"] = recs
        local = type(metric).from_config(metric.config)
        local.load_state_dict(sd)
        return local

    def end(self, code: int) -> int:
        """The exit status of every rank: rank 0 publishes its own once it has written the outputs or printed the
        error, and keeps the store up until every rank has read it; the other ranks wait for it and exit with it
        (after a collective failure, with their own, the same). Closes the process group if still open."""
        if self._started:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._started = False
        if not self.distributed or self.store is None:
            return code
        if self.writer:
            self.store.set("exit", str(code))
            # without torchrun's agent rank 0 hosts the store: keep it up until every rank has read the status
            deadline = time.monotonic() + self.timeout_s
            with contextlib.suppress(Exception):
                while self.store.add("exit_read", 0) < self.world_size - 1 and time.monotonic() < deadline:
                    time.sleep(_POLL_S)
            return code
        # wait for rank 0's status, also after a collective failure (the same error there): a rank that exits
        # first makes torchrun stop the others, which must not happen before rank 0 has printed the error
        deadline = None if code == 0 else time.monotonic() + self.timeout_s
        try:
            while not self.store.check(["exit"]):
                if deadline is not None and time.monotonic() > deadline:
                    return code
                time.sleep(_POLL_S)
            status = int(self.store.get("exit").decode())
            self.store.add("exit_read", 1)
            return status if code == 0 else code
        except Exception:  # noqa: BLE001 - rank 0 (and the store) gone: it did not report success
            return code or 1


def fingerprint(cases: Sequence[tuple[str, Path, Sequence[Path]]], sizes: Sequence[int]) -> str:
    """A digest of the case list and file sizes: every rank must see the same files."""
    h = hashlib.sha256()
    for (name, pred, labels), size in zip(cases, sizes):
        h.update(f"{name}\0{pred}\0{'|'.join(map(str, labels))}\0{size}\n".encode())
    return h.hexdigest()


def _env_text(env: Any) -> str:
    return ", ".join(f"{k}={env.get(k)!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
