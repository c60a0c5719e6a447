"""scripts/gpu_check.sh without a GPU: ``--dry-run`` runs the same steps, in the same order, under the same time
budget and archiving, on CPU (tiny test selections, Triton through the interpreter, the benchmark and the tile
sweep with ``--device cpu --dry-run``). The GPU machine gives the script one or two tries, so what can be
checked here is checked here: the step order (benchmark right after the quick tests), what comes back in $OUT
(at most 8 files, plain names, one archive of all logs), the benchmark CSV written row by row, the memcheck
environment, and that the budget stops a step that overruns and skips the steps that no longer fit while the
benchmark keeps its time.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ORDER = [
    "env",
    "build",
    "tests_quick",
    "bench",
    "selfcheck",
    "memcheck_cuda",
    "memcheck_triton",
    "tests_slow",
    "tests_rest",
    "tiles",
]
OUTPUTS = {
    "gpu_check_logs.tar.gz",
    "gpu_bench.csv",
    "gpu_bench_monai.csv",
    "gpu_tiles.csv",
    "verified.diff",
    "summary.txt",
}
PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
ROW = re.compile(r"^(\d+)\s+(\S+)\s+(.+?)\s+(\d+)\s+(\d\d_\S+\.log)$")
HEADER = re.compile(r"=== (\d+) (\S+) \(timeout (\d+)s: (-?\d+)s left, (\d+)s kept for later steps\) ===")
SKIPPED = re.compile(r"=== (\d+) (\S+): SKIPPED, (-?\d+)s left in the budget and (\d+)s kept for later steps")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None or shutil.which("tar") is None,
    reason="gpu_check.sh needs bash, tar and coreutils timeout",
)


def run_dry(out: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env_extra)
    for name in ("GPU_CHECK_BUDGET_S", "GPU_CHECK_STALL", "TRITON_INTERPRET"):
        if name not in env_extra:
            env.pop(name, None)
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    return res, time.monotonic() - t0


def steps(summary: str) -> list[tuple[str, str, int, str]]:
    """(name, result, seconds, log) per row of the step table."""
    rows = [ROW.match(line.strip()) for line in summary.splitlines()]
    return [(m.group(2), m.group(3).strip(), int(m.group(4)), m.group(5)) for m in rows if m]


def archive_texts(out: Path) -> dict[str, str]:
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        return {
            Path(m.name).name: tar.extractfile(m).read().decode(errors="replace")  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def check_outputs(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8, names
    assert all(PLAIN_NAME.match(n) for n in names), names
    assert all((out / n).is_file() for n in names), names


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    verified = ROOT / "calibops" / "_verified.py"
    before = verified.read_text() if verified.exists() else None
    res, seconds = run_dry(out)
    after = verified.read_text() if verified.exists() else None
    return out, res, seconds, before, after


def test_dry_run_passes_every_step_in_order(dry):
    out, res, seconds, _, _ = dry
    table = (out / "summary.txt").read_text()
    found = steps(table)
    assert [name for name, *_ in found] == ORDER, table
    from calibops.backends import extension as _ops

    # the dry run's build step checks that the kernels are registered (CPU ones here): without the compiled
    # extension it must fail, and the run with it
    want = {name: "ok" for name in ORDER}
    if not _ops.extension_loaded():
        want["build"] = "FAILED (exit 1)"
    assert {name: result for name, result, _, _ in found} == want, table + res.stdout[-4000:]
    assert res.returncode == (0 if _ops.extension_loaded() else 1), res.stdout[-4000:] + res.stderr[-2000:]
    # the step table is printed after every step (a run stopped from outside still shows where it was)
    assert res.stdout.count("#   step ") >= len(ORDER), res.stdout[-2000:]
    assert seconds < 480


def test_dry_run_outputs_are_few_plain_files_and_one_archive(dry):
    out, _, _, before, after = dry
    check_outputs(out)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    texts = archive_texts(out)
    for k, name in enumerate(ORDER, start=1):
        log = f"{k:02d}_{name}.log"
        assert log in texts, sorted(texts)
        assert HEADER.search(texts[log]), texts[log][:300]
    assert "summary.txt" in texts and steps(texts["summary.txt"])
    assert any(n.startswith("tests_quick_w") for n in texts), sorted(texts)  # the parallel workers' logs
    # the memcheck steps run with the caching allocator off (small overruns inside pooled blocks are invisible)
    for name in ("06_memcheck_cuda.log", "07_memcheck_triton.log"):
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in texts[name], texts[name]
    # a dry run records nothing: no verified architecture added, an empty diff
    assert before == after
    assert (out / "verified.diff").read_text() == ""


def test_dry_run_benchmark_csv_rows(dry):
    out, res, _, _, _ = dry
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    with open(out / "gpu_bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    assert header[: len(bench_gpu.ROW_COLUMNS)] == bench_gpu.ROW_COLUMNS
    assert all(h.startswith("env_") for h in header[len(bench_gpu.ROW_COLUMNS) :])
    measured = {(r["shape"], r["binning"], r["backend"]) for r in rows if r["status"] == "ok"}
    for shape in ("1x3x4x4x4", "1x5x3x3x3"):
        for binning in ("hard", "soft"):
            assert (shape, binning, "triton") in measured and (shape, binning, "torch-vectorised") in measured
    assert all(r["mode"] == "fwd+bwd" for r in rows)
    # the triton loss agrees with torch-vectorised (checked before timing)
    assert all(float(r["loss_rel_diff_vs_torch"]) < 1e-5 for r in rows if r["backend"] == "triton")
    with open(out / "gpu_tiles.csv", newline="") as f:
        tiles = list(csv.DictReader(f))
    assert {(r["kernel"], r["status"]) for r in tiles} == {("fwd", "ok"), ("bwd", "ok")}


def test_bench_rows_reach_the_csv_before_the_run_ends(tmp_path):
    # RowSink flushes every row: a reader sees the rows written so far while the file is still open
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    path = tmp_path / "rows.csv"
    sink = bench_gpu.RowSink(str(path), ["a", "b"])
    sink.write({"a": 1, "b": 2})
    with open(path) as f:
        assert f.read().splitlines() == ["a,b", "1,2"]
    with pytest.raises(ValueError):
        sink.write({"a": 1, "c": 3})  # a column the header does not have is an error, not silently dropped
    sink.close()


def test_budget_stops_an_overrunning_step_and_skips_what_no_longer_fits(tmp_path):
    # a 40 s budget (every cap and reserve scaled by 40/480) and a build step that hangs
    budget = 40
    res, seconds = run_dry(tmp_path, GPU_CHECK_BUDGET_S=str(budget), GPU_CHECK_STALL="build")
    table = (tmp_path / "summary.txt").read_text()
    found = steps(table)
    assert [name for name, *_ in found] == ORDER, table
    result = {name: r for name, r, _, _ in found}
    assert result["build"].startswith("TIMEOUT"), table
    assert res.returncode == 1  # a stopped step is a failure of the run
    texts = archive_texts(tmp_path)
    for name, r, secs, log in found:
        text = texts[log]
        if r.startswith("SKIPPED"):
            m = SKIPPED.search(text)
            assert m, text
            left, kept = int(m.group(3)), int(m.group(4))
            assert left - kept < 2, text  # skipped only when less than the minimum step time was left
        else:
            m = HEADER.search(text)
            assert m, text
            limit, left, kept = int(m.group(3)), int(m.group(4)), int(m.group(5))
            assert limit <= left - kept, text  # the time kept for later steps is not given to this one
            assert secs <= limit + 6, (name, secs, limit)  # stopped at its limit (+ the 5 s kill grace)
    assert any(r == "SKIPPED (time budget)" for r in result.values()), table
    # the benchmark kept its time although the build overran
    assert not result["bench"].startswith("SKIPPED"), table
    assert seconds <= budget + 20, (seconds, table)
    check_outputs(tmp_path)
