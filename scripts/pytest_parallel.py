"""Run a pytest selection as several pytest processes at once (used by scripts/gpu_check.sh).

    python scripts/pytest_parallel.py -j 4 --log-dir LOGS --name tests_quick -- -m "not slow" tests/test_x.py

On a GPU machine most of the GPU tests' time is Triton compiling kernel variants, one at a time per process and
on one CPU core; spreading the tests over a few processes compiles several variants at once (the Triton cache
is safe to share). The selection is collected once (``--collect-only``); its test ids are dealt round-robin to
the workers (neighbouring parameter sets of one test, which usually compile different variants, land in
different workers). Each worker's output goes to ``LOGS/<name>_w<k>.log``; a line is printed as each worker
finishes, then every worker's summary (a failing worker's whole log). Exit status: 0 when every worker passed,
pytest's 5 when nothing was selected, else the first worker's non-zero status; 124 when stopped by SIGTERM (a
time limit), after printing how far each worker got. pytest options of the project (``addopts``) are ignored
(``-o addopts=``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

PYTEST = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider"]


def collect(args: list[str]) -> list[str]:
    """The test ids pytest selects for ``args`` (options and paths), in collection order."""
    res = subprocess.run([*PYTEST, "--collect-only", "-q", *args], capture_output=True, text=True)
    ids = [line.strip() for line in res.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if res.returncode not in (0, 5):
        sys.stdout.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(res.returncode)
    return ids


def deal(ids: list[str], workers: int) -> list[list[str]]:
    """Round-robin split of ``ids`` into at most ``workers`` non-empty shares."""
    shares = [ids[k::workers] for k in range(workers)]
    return [s for s in shares if s]


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _progress(path: str) -> str:
    """Pass / fail marks printed so far by a -q worker (its progress lines)."""
    text = _tail(path, 10_000)
    marks = sum(text.count(c) for c in ".FEsx") if text else 0
    return f"{marks} test marks so far, {text.count('F') + text.count('E')} F/E"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=4, help="number of pytest processes (default 4)")
    ap.add_argument("--log-dir", default=".", help="folder for the workers' logs")
    ap.add_argument("--name", default="pytest", help="prefix of the workers' log names")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- then pytest options and paths")
    opts = ap.parse_args(argv)
    args = opts.pytest_args[1:] if opts.pytest_args[:1] == ["--"] else opts.pytest_args
    if opts.jobs < 1:
        ap.error("--jobs must be >= 1")
    ids = collect(args)
    if not ids:
        print(f"{opts.name}: no tests selected by {' '.join(args)}")
        return 5
    # options that select (-m, -k) were applied by the collection; the rest (e.g. -x, -ra) go to every worker
    passthrough, skip_next = [], False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a in ("-m", "-k"):
            skip_next = True
            continue
        if a.startswith("-") and not a.startswith(("-m=", "-k=")):
            passthrough.append(a)
    shares = deal(ids, opts.jobs)
    os.makedirs(opts.log_dir, exist_ok=True)
    print(f"{opts.name}: {len(ids)} tests in {len(shares)} processes", flush=True)
    procs = []
    for k, share in enumerate(shares):
        log = os.path.join(opts.log_dir, f"{opts.name}_w{k}.log")
        f = open(log, "w")  # noqa: SIM115 - closed below
        p = subprocess.Popen([*PYTEST, "-q", "-ra", *passthrough, *share], stdout=f, stderr=subprocess.STDOUT)
        procs.append((k, p, f, log, len(share)))

    def stopped(signum, frame):  # a time limit: say how far every worker got, then stop them
        for k, p, _f, log, n in procs:
            state = "running" if p.poll() is None else f"exit {p.returncode}"
            print(f"{opts.name} worker {k} ({n} tests, {state}): {_progress(log)}; log {os.path.basename(log)}")
            if p.poll() is None:
                p.kill()
        sys.stdout.flush()
        os._exit(124)

    signal.signal(signal.SIGTERM, stopped)
    t0 = time.perf_counter()
    pending = list(procs)
    while pending:
        for item in list(pending):
            k, p, f, log, n = item
            if p.poll() is not None:
                pending.remove(item)
                f.close()
                last = _tail(log, 1).strip()
                print(
                    f"{opts.name} worker {k} ({n} tests) exit {p.returncode} after {time.perf_counter() - t0:.0f}s: "
                    f"{last}",
                    flush=True,
                )
        time.sleep(0.2)
    rc = 0
    for k, p, _, log, _ in procs:
        # a failing worker's whole log (the failures' tracebacks), else its last lines
        full = p.returncode not in (0, 5)
        print(f"\n----- {opts.name} worker {k}: {os.path.basename(log)} ({'all' if full else 'last lines'}) -----")
        print(_tail(log, 100_000 if full else 15), end="")
        if p.returncode and not rc:
            rc = p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
