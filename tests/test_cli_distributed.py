"""``calibops evaluate`` under torchrun: 2 gloo ranks give what one process gives, and a failure on one rank ends all.

The two-rank runs start real processes (``python -m torch.distributed.run`` or, once, the environment torchrun
sets, by hand), each under a timeout, on small NIfTI / NumPy data sets written here; the one-process runs are
``evaluate_main`` in this process. Compared: ``per_image.csv`` byte for byte (every case is computed by the same
kernels, whose per-image results do not depend on the thread count), ``dataset_histogram.npz`` exactly (integer
counts), ``summary.json`` / ``groups.csv`` numbers to 1e-6 (the pooled float64 sums are added in another order).
The sharding, the prefetch reader and the environment parsing are checked in-process.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from calibops.cli.distributed import Session, case_bytes, default_prefetch, shard_by_size
from calibops.cli.evaluate import evaluate_main
from calibops.cli.prefetch import Prefetcher

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

ROOT = Path(__file__).resolve().parents[1]
C = 4
TIMEOUT_S = 240  # a loaded 2-core machine starts three torch processes; a hang would last forever
SIZES = [(14, 12, 9), (6, 7, 5), (11, 9, 8), (5, 5, 4), (9, 13, 6), (8, 6, 7)]


def _case(rng, shape):
    z = 2 * rng.normal(size=(C, *shape))
    p = (np.exp(z) / np.exp(z).sum(0, keepdims=True)).astype(np.float32)
    return p, rng.integers(0, C, shape).astype(np.int16)


def _write(root: Path, numpy_preds: bool, raters: int = 1, seed: int = 0, n: int = len(SIZES)):
    rng = np.random.default_rng(seed)
    pred = root / "pred"
    labels = [root / f"rater{k}" for k in range(raters)]
    for d in (pred, *labels):
        d.mkdir(parents=True)
    for i, shape in enumerate(SIZES[:n]):
        name = f"case{i:02d}"
        p, lab = _case(rng, shape)
        if numpy_preds:  # nnU-Net: (C, z, y, x) against a NIfTI (x, y, z) label
            np.savez_compressed(pred / f"{name}.npz", probabilities=np.ascontiguousarray(p.transpose(0, 3, 2, 1)))
        else:
            nib.save(nib.Nifti1Image(np.moveaxis(p, 0, -1), np.eye(4)), pred / f"{name}.nii.gz")
        for k, d in enumerate(labels):
            other = lab.copy()
            other[rng.random(shape) < 0.15 * k] = k % C  # raters disagree a little
            nib.save(nib.Nifti1Image(other, np.eye(4)), d / f"{name}.nii.gz")
    return pred, labels


def _args(pred: Path, labels: list[Path], out: Path, *extra: str) -> list[str]:
    return ["--pred", str(pred), *(a for d in labels for a in ("--label", str(d))), "--out", str(out), *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, "-m", "calibops", "evaluate", *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=_env()
    )
    return proc, time.monotonic() - t0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(args: list[str], world: int = 2) -> list[tuple[int | None, str, str]]:
    """The environment torchrun sets, by hand (no elastic agent: rank 0 hosts the store)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-m", "calibops", "evaluate", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _one_process(args: list[str], capsys) -> None:
    assert evaluate_main(args) == 0, capsys.readouterr().err
    capsys.readouterr()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _close(a, b, where: str) -> None:
    """Equal structure; ints and strings equal; floats within 1e-6 (NaN == NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7, nan_ok=True), where
    else:
        assert a == b, where


def _same_outputs(one: Path, two: Path, groups: bool = False, world: int = 2) -> dict:
    assert (one / "per_image.csv").read_bytes() == (two / "per_image.csv").read_bytes()
    with np.load(one / "dataset_histogram.npz") as a, np.load(two / "dataset_histogram.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["world_size"] == 1 and s2["world_size"] == world
    assert s1["ranks"][0]["cases"] == [f"case{i:02d}" for i in range(s1["cases"])]
    run = ("world_size", "ranks", "wall_time_s", "prefetch")  # prefetch: its default depends on the cores per rank
    _close({k: v for k, v in s1.items() if k not in run}, {k: v for k, v in s2.items() if k not in run}, "summary")
    if groups:
        g1, g2 = _csv(one / "groups.csv"), _csv(two / "groups.csv")
        _close(
            [{k: float(v) if k not in ("group", "class_name") else v for k, v in r.items()} for r in g1],
            [{k: float(v) if k not in ("group", "class_name") else v for k, v in r.items()} for r in g2],
            "groups",
        )
    return s2


def _shards(pred: Path, labels: list[Path]) -> list[list[str]]:
    names = sorted(p.name.split(".")[0] for p in pred.iterdir())
    sizes = [case_bytes(next(pred.glob(n + ".*")), [d / f"{n}.nii.gz" for d in labels]) for n in names]
    return [[names[i] for i in s] for s in shard_by_size(sizes, 2)]


def test_torchrun_two_ranks_equal_one_process(tmp_path, capsys):
    pred, labels = _write(tmp_path, numpy_preds=True)
    extra = ["--no-figures", "--dice", "--num-bins", "12", "--no-progress"]
    _one_process(_args(pred, labels, tmp_path / "one", *extra), capsys)
    proc, _ = _torchrun(_args(pred, labels, tmp_path / "two", *extra))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote ") == 1 and "on 2 ranks" in proc.stdout  # rank 0 alone reports
    s2 = _same_outputs(tmp_path / "one", tmp_path / "two")
    # each rank evaluated its share, balanced by file size, and nothing twice
    assert [r["cases"] for r in s2["ranks"]] == _shards(pred, labels)
    assert all(r["cases"] for r in s2["ranks"]) and s2["wall_time_s"] > 0


def test_failure_on_one_rank_ends_every_rank(tmp_path):
    pred, labels = _write(tmp_path, numpy_preds=True)
    for victim in sorted(p.name for p in pred.iterdir()):  # a case that rank 1 owns once it is truncated
        bad = pred / victim
        data = bad.read_bytes()
        bad.write_bytes(data[:200])
        if bad.name.split(".")[0] in _shards(pred, labels)[1]:
            break
        bad.write_bytes(data)
    owner = 1
    proc, seconds = _torchrun(_args(pred, labels, tmp_path / "out", "--no-figures"))
    assert proc.returncode == 1
    ours = [line for line in proc.stderr.splitlines() if line.startswith("calibops evaluate: error: ")]
    assert len(ours) == 1, proc.stderr  # rank 0 reports, once
    assert str(bad) in ours[0] and f"[rank {owner} of 2]" in ours[0], ours[0]
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written
    assert seconds < TIMEOUT_S


def test_groups_and_raters_two_ranks_equal_one_process(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pred, labels = _write(tmp_path, numpy_preds=False, raters=3, seed=1)
    groups = tmp_path / "groups.csv"
    groups.write_text("case,group\n" + "".join(f"case{i:02d},{'AB'[i % 2]}\n" for i in range(len(SIZES))))
    extra = ["--groups", str(groups), "--bootstrap-samples", "200", "--no-progress"]
    _one_process(_args(pred, labels, tmp_path / "one", *extra, "--no-figures"), capsys)
    results = _by_hand(_args(pred, labels, tmp_path / "two", *extra))  # figures: plot_groups after the merge
    assert [r[0] for r in results] == [0, 0], results
    assert results[1][1] == results[1][2] == ""  # rank 1 prints nothing
    _same_outputs(tmp_path / "one", tmp_path / "two", groups=True)
    assert {"volume_crps", "consensus_dice"} <= set(_csv(tmp_path / "two" / "per_image.csv")[0])
    pngs = sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    classes = [f"class_{c}" for c in (1, 2, 3)]  # the default class names "class 1", ... made file-name safe
    want = ["dataset_histogram.png", *(f"groups_reliability_{c}.png" for c in classes)]
    want += ["reliability_all_classes.png", *(f"reliability_{c}.png" for c in classes)]
    assert pngs == sorted(want)
    assert sorted(p.stem for p in (tmp_path / "two").glob("*.pdf")) == sorted(n[:-4] for n in want)


def test_more_ranks_than_cases(tmp_path, capsys):
    pred, labels = _write(tmp_path, numpy_preds=True, n=2)
    extra = ["--no-figures", "--no-progress", "--mode", "top_label"]
    _one_process(_args(pred, labels, tmp_path / "one", *extra), capsys)
    results = _by_hand(_args(pred, labels, tmp_path / "three", *extra), world=3)
    assert [r[0] for r in results] == [0, 0, 0], results
    s3 = _same_outputs(tmp_path / "one", tmp_path / "three", world=3)
    assert [r["cases"] for r in s3["ranks"]] == [["case00"], ["case01"], []]  # rank 2 has none, and still joins


# ------------------------------------------------------------------------------------------------ in-process
def test_prefetch_gives_the_same_outputs(tmp_path, capsys):
    pred, labels = _write(tmp_path, numpy_preds=True)
    for depth in ("0", "2"):
        _one_process(_args(pred, labels, tmp_path / depth, "--no-figures", "--prefetch", depth), capsys)
    s = _same_outputs_plain(tmp_path / "0", tmp_path / "2")
    assert s["prefetch"] == 2


def _same_outputs_plain(a: Path, b: Path) -> dict:
    assert (a / "per_image.csv").read_bytes() == (b / "per_image.csv").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["summary"] == sb["summary"]  # the same order of every sum: bitwise
    return sb


def test_shard_by_size_is_balanced_and_deterministic():
    sizes = [50, 10, 10, 40, 30, 20, 5, 5]
    shards = shard_by_size(sizes, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(sizes)))
    assert shards == shard_by_size(list(sizes), 3)
    loads = [sum(sizes[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes) and max(loads) <= 4 / 3 * (sum(sizes) / 3) + max(sizes)
    # 50 -> r0, 40 -> r1, 30 -> r2, 20 -> r2, 10 -> r1, 10 -> r0, 5 -> r1, 5 -> r2 (least loaded, lower rank on ties)
    assert shards == [[0, 2], [1, 3, 6], [4, 5, 7]] and loads == [60, 55, 55]
    assert shard_by_size([7, 7, 7], 2) == [[0, 2], [1]]  # ties: lower index first, lower rank first
    assert shard_by_size([3], 4) == [[0], [], [], []]
    with pytest.raises(ValueError, match="world_size"):
        shard_by_size([1], 0)


def test_prefetcher_reads_ahead_in_order_and_raises_at_the_turn():
    lock = threading.Lock()
    state = {"reading": 0, "taken": 0, "ahead": 0}

    def read(i):
        with lock:
            state["ahead"] = max(state["ahead"], i - state["taken"])
        if i == 4:
            raise ValueError("case 4 is corrupt")
        time.sleep(0.01)
        return i * 10

    got = []
    with Prefetcher(list(range(7)), read, depth=2) as pre, pytest.raises(ValueError, match="case 4"):
        for i, res in pre:
            got.append(res.get())
            with lock:
                state["taken"] = i + 1
    assert got == [0, 10, 20, 30]  # in order, the error at its own turn, nothing after it
    assert state["ahead"] <= 2  # at most `depth` cases read ahead of the one being used

    seen = []
    with Prefetcher([1, 2, 3], lambda i: seen.append(i) or i, depth=0) as pre:
        assert [r.get() for _, r in pre] == [1, 2, 3] and seen == [1, 2, 3]
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([1], read, depth=-1)


def test_default_prefetch_needs_a_spare_core_per_process():
    assert default_prefetch({}, cores=2) == 1  # one process, two cores: the reader has one
    assert default_prefetch({"LOCAL_WORLD_SIZE": "2"}, cores=2) == 0  # torchrun, one core per rank: it would compete
    assert default_prefetch({"LOCAL_WORLD_SIZE": "8"}, cores=64) == 1
    assert default_prefetch({}, cores=1) == 0


def test_session_from_environment():
    assert not Session.from_env({}).distributed
    assert Session.from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}).problem is None
    s = Session.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (s.rank, s.world_size, s.local_rank, s.problem, s.writer) == (3, 4, 1, None, False)
    assert "MASTER_ADDR" in Session.from_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}).problem
    assert "integers" in Session.from_env({"WORLD_SIZE": "two"}).problem
    assert "RANK < WORLD_SIZE" in Session.from_env({"WORLD_SIZE": "2", "RANK": "2"}).problem


def test_bad_environment_and_options_are_usage_errors(tmp_path, capsys, monkeypatch):
    pred, labels = _write(tmp_path, numpy_preds=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert evaluate_main(_args(pred, labels, tmp_path / "o", "--no-figures")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR" in err[0] and "torchrun" in err[0], err
    monkeypatch.delenv("WORLD_SIZE")
    assert evaluate_main(_args(pred, labels, tmp_path / "o", "--prefetch", "-1")) == 2
    assert "--prefetch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class _Store:
    """The few calls Session makes on torch.distributed's key-value store, in a dict."""

    def __init__(self) -> None:
        self.kv: dict[str, object] = {}

    def add(self, key: str, n: int) -> int:
        self.kv[key] = int(self.kv.get(key, 0)) + n
        return int(self.kv[key])


def test_together_gives_every_rank_the_error_of_the_first_failing_case():
    from calibops.cli.evaluate import EvaluationError, UsageError

    s = Session(rank=0, world_size=2)
    s.store = _Store()
    others: list[dict] = []
    s._gather = lambda mine: [mine, *others]  # rank 1's status as the all-gather would bring it

    # rank 1 failed at case 2; rank 0 fails later (case 5): every rank reports rank 1's error
    others[:] = [{"rank": 1, "error": (1, "case 'b': cannot read 'b.npz'"), "payload": {"at": 2}}]
    s.store.kv["stopped/1"] = 1  # rank 1 has stopped
    with pytest.raises(EvaluationError, match=r"^case 'b': cannot read 'b.npz' \[rank 1 of 2\]$"):
        with s.together(wait=True) as step:
            step["payload"]["at"] = 5
            raise ValueError("case 'e': bad labels")
    assert s.store.kv["errors"] == 1  # the flag that stops the other ranks after their current case
    assert s.stopped()

    # nothing failed here, but on rank 1: the same error here; a usage error keeps its exit status 2
    others[:] = [{"rank": 1, "error": (2, "--num-bins must be between 1 and 2**24"), "payload": {}}]
    with pytest.raises(UsageError, match=r"\[rank 1 of 2\]"):
        with s.together():
            pass
    # no error anywhere: every rank's payload
    others[:] = [{"rank": 1, "error": None, "payload": {"C": 4}}]
    with s.together({"C": 4}) as step:
        pass
    assert step["all"] == [{"C": 4}, {"C": 4}]
