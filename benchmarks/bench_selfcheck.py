"""Cost of ``backend="auto"``'s per-specialisation self-check (issue 23): per new specialisation, and per call after.

Two numbers, targets from the issue (on a GPU):

- **cached per-call overhead** (target <= 10 us): ``resolve_call`` on an already decided call, i.e. building the
  call key and one dict lookup; the median of ``--calls`` calls timed in batches of 1000. Also the whole
  ``engine.run`` of a small call with ``backend="auto"`` against the decided backend passed explicitly,
  alternated, medians (the difference is what auto adds to a call).
- **per new specialisation** (target <= 100 ms): ``check_spec`` of one specialisation on the device, twice: *cold*
  (the first in the process: it compiles the kernel variants of the specialisation, which the user's call would
  compile anyway) and *warm* (the check alone: its problem through the candidate and through the reference on
  the CPU, the comparison, one device synchronisation).

    python benchmarks/bench_selfcheck.py                      # on a GPU: cuda and triton candidates
    python benchmarks/bench_selfcheck.py --device cpu --dry-run  # no GPU: the cpu kernels stand in (and Triton
                                                                 # through the interpreter when TRITON_INTERPRET=1)

Prints one row per (backend, specialisation) and a summary line with the worst warm check and the per-call
medians. Timings on a loaded machine are noisy; the script names the CPU and the device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from _common import cpu_name  # noqa: E402

from calibops import engine  # noqa: E402
from calibops.backends import registry as _registry  # noqa: E402
from calibops.backends import resolve as _resolve  # noqa: E402
from calibops.backends import selfcheck as _selfcheck  # noqa: E402
from calibops.options import Options  # noqa: E402

# (label, example_call keyword arguments, C, R): the default loss and the specialisations of issue 23's faults
SPECS = (
    ("default: marginal hard softmax int64 labels M=20 C=4", {}, 4, 1),
    ("uint8 labels", {"target_dtype": torch.uint8}, 4, 1),
    ("M=15", {"num_bins": 15}, 4, 1),
    ("M=100 (scatter)", {"num_bins": 100}, 4, 1),
    ("R=3 marginal", {}, 4, 3),
    ("hard sigmoid dense", {"activation": "sigmoid", "labels": False}, 4, 1),
    ("bool dense", {"labels": False, "target_dtype": torch.bool}, 4, 1),
    ("top-label dense", {"labels": False, "mode": "top_label"}, 4, 1),
    ("moments", {"moments": True}, 4, 1),
    ("C=40 chunked soft", {"soft": True}, 40, 1),
    ("float16 input", {"dtype": torch.float16}, 4, 1),
    (
        "bfloat16 input, ignore_index=255 uint8",
        {"dtype": torch.bfloat16, "target_dtype": torch.uint8, "ignore_index": 255},
        4,
        1,
    ),
)
DRY_SPECS = SPECS[:4]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_costs(backend: str, device: torch.device, specs) -> list[tuple[str, str, float, float, bool]]:
    """(label, specialisation, cold ms, warm ms, passed) per specialisation."""
    rows = []
    for label, kw, C, R in specs:
        spec = _selfcheck.spec_of(*_selfcheck.example_call(C, R=R, **kw))
        times = []
        res = None
        for _ in range(2):  # cold (compiles the specialisation's kernels), then warm (the check alone)
            _selfcheck._RESULTS.pop((str(_selfcheck.normalize_device(device)), backend, spec.dtype, spec), None)
            _sync(device)
            t0 = time.perf_counter()
            res = _selfcheck.check_spec(backend, device, spec, C, R, arch="bench")
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append((label, res.cases[0].name if res.cases else spec.describe(), times[0], times[1], res.ok))
        if not res.ok:
            print(f"  {backend} {label}: {res.describe()}", flush=True)
    return rows


def lookup_cost(device: torch.device, backend: str, calls: int) -> tuple:
    """(resolve_call median and best batch us, engine.run auto (median, best) us, explicit (median, best) us)."""
    call = _selfcheck.example_call(4)
    call = (call[0].to(device), call[1].to(device), call[2].to(device), *call[3:])
    key = _resolve.call_key(call)
    _resolve._AUTO_GPU[key] = backend  # decided (the check's cost is measured above)
    assert _resolve.resolve_call("auto", backend, call) == backend
    per = []
    batch = 1000
    for _ in range(max(calls // batch, 5)):
        t0 = time.perf_counter()
        for _ in range(batch):
            _resolve.resolve_call("auto", backend, call)
        per.append((time.perf_counter() - t0) / batch * 1e6)
    # the whole pipeline: a small call through engine.run, auto vs the backend named explicitly
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, 8, generator=g).to(device)
    y = torch.randint(0, 4, (2, 1, 16, 16, 8), generator=g).to(device)
    opts = {name: Options(to_onehot_y=True, softmax=True, validate=False, backend=name) for name in ("auto", backend)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _selfcheck.SelfCheckWarning)
        for name in opts:  # warm-up; auto decides this call's specialisation here if it had not
            engine.run(x, y, opts[name])
    run_t: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(30):
        for name in opts:  # alternated
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(20):
                engine.run(x, y, opts[name])
            _sync(device)
            run_t[name].append((time.perf_counter() - t0) / 20 * 1e6)
    med = statistics.median
    return med(per), min(per), (med(run_t["auto"]), min(run_t["auto"])), (med(run_t[backend]), min(run_t[backend]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="cuda,triton", help="candidates to time (unavailable ones are skipped)")
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--dry-run", action="store_true", help="CPU: the cpu kernels stand in, four specialisations")
    args = p.parse_args(argv)
    device = _selfcheck.normalize_device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if device.type == "cpu":  # no GPU: route CPU tensors through auto's GPU branch, the cpu kernels as candidate
        _resolve.SELF_CHECKED_DEVICES = ("cuda", "cpu")
        backends = ["cpu"] + [b for b in backends if b == "triton"]
        _resolve.GPU_CANDIDATES = tuple(backends)
    specs = DRY_SPECS if args.dry_run else SPECS
    where = _selfcheck.device_name(device) if device.type == "cuda" else "CPU tensors"
    print(
        f"self-check cost on {device} ({where}); host CPU {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    available = [b for b in backends if _registry.why_unavailable(b, device) is None]
    for b in backends:
        if b not in available:
            print(f"  {b}: skipped ({_registry.why_unavailable(b, device)})")
    if not available:
        print("nothing to time: no candidate backend is available on this device")
        return 1
    # first the per-call cost (cheap, printed at once, so a run stopped later still has it)
    lookup, lookup_best, run_auto, run_explicit = lookup_cost(device, available[0], args.calls)
    per_call = (
        f"cached per-call lookup (resolve_call) {lookup:.2f} us median, {lookup_best:.2f} us best batch of 1000 "
        f"(target <= 10 us); engine.run small call (2x4x16x16x8): auto {run_auto[0]:.1f} us median / "
        f"{run_auto[1]:.1f} us best vs {available[0]} named {run_explicit[0]:.1f} / {run_explicit[1]:.1f} us "
        "(30 alternations of 20 calls)"
    )
    print("PER CALL " + per_call, flush=True)
    rows, worst_warm, ok = [], 0.0, True
    print(f"  {'backend':<8} {'cold ms':>9} {'warm ms':>9}  result  specialisation")
    for b in available:
        for label, name, cold, warm, passed in spec_costs(
            b, device, specs if b != "triton" or device.type == "cuda" else specs[:1]
        ):
            rows.append((b, label, cold, warm, passed))
            worst_warm = max(worst_warm, warm)
            ok &= passed
            print(f"  {b:<8} {cold:9.1f} {warm:9.1f}  {'pass' if passed else 'FAIL':<6}  {label}: {name}", flush=True)
    print(
        f"SUMMARY self-check per new specialisation: worst warm {worst_warm:.1f} ms (target <= 100 ms on a GPU) "
        f"over {len(rows)} checks (cold = first in the process, compiling the kernels); " + per_call
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
