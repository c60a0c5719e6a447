"""GPU benchmark: mL1-ACE forward, backward and forward+backward from logits + integer labels.

Backends (each measured in the same run, on the same device): calibops ``triton``, calibops ``cuda`` (when the
CUDA extension is built), calibops ``reference`` and the plain-PyTorch ``torch-vectorised`` baseline of
benchmarks/_common.py. Times are ``triton.testing.do_bench`` medians (CUDA; calls slower than 50 ms, i.e. the
slow baselines, use the median of 3 synchronised calls to keep the run short) or ``median_time`` (``--device cpu``,
a dry run of the logic through the Triton interpreter). For every row: achieved GB/s on the bytes the kernel
contract says must move (``contract_bytes``: docs/kernel_contract.md, one read of input and target forward, one
more read and the gradient's write backward), the % of the card's peak HBM bandwidth, and the speed-up over
torch-vectorised. Every calibops backend's loss value is checked against torch-vectorised before it is timed.
Each row is appended to the CSV (and printed) the moment it is measured, so a run stopped by a time limit
keeps everything measured before (scripts/gpu_check.sh relies on it).

    python benchmarks/bench_gpu.py                    # the issue's shapes, hard + soft, writes
                                                      # benchmarks/results/gpu_<card>.csv
    python benchmarks/bench_gpu.py --device cpu --dry-run   # tiny shapes on CPU (interpreter): checks the script
    python benchmarks/bench_gpu.py --registers        # no GPU: compile every Triton kernel variant (marginal,
                                                      # top-label, R=3, moments; hard/soft; fwd/bwd; fp32/bf16)
                                                      # for sm_90, print registers / stack
    python benchmarks/bench_gpu.py --registers --shapes 2x4x224x224x144 --engine top_label --modes fwd --dtype bfloat16
    python benchmarks/bench_gpu.py --cuda-registers   # no GPU: nvcc --resource-usage of every CUDA kernel variant
    python benchmarks/bench_gpu.py --sweep-tiles fwd:512:4,fwd:1024:4,bwd:1024:8   # block-size settings

Engine rows (``variant`` column ``op:...``; after the loss rows of each shape): the forward op alone
(``calibops::binned_stats`` for cuda, ``calibops::triton_binned_stats`` for triton, the reference op) from logits
with softmax fused, for ``op:marginal`` (the v1 statistics), ``op:top_label`` (issue 10: must cost no more than the
marginal forward), ``op:raters3`` (R = 3 label maps, issue 10: at most 1.5x the single-rater forward) and
``op:moments`` (second moments at ``--num-bins``) and ``op:brier`` (second moments with one bin: the call
``calibops.functional.brier_score`` makes, issue 23); ``x_vs_marginal`` is the row's time over the same backend's
``op:marginal`` time.

Options: --shapes "2x4x224x224x144,..." --binning hard,soft --modes fwd,bwd,fwd+bwd --backends ...
--dtype float32|float16|bfloat16 --label-dtype int64|uint8|... --budget-s (stop timing slow backends when spent)
--engine marginal,top_label,raters3,moments,brier (or "" for none) --out PATH.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

ISSUE_SHAPES = [(2, 4, 224, 224, 144), (2, 16, 176, 176, 64), (8, 4, 128, 128, 128)]
DRY_SHAPES = [(2, 4, 6, 5, 4), (1, 17, 5, 4, 3), (2, 3, 4, 4, 4)]
BACKENDS = ("triton", "cuda", "reference", "torch-vectorised")
TARGET_PCT_PEAK = 60.0
SLOW_CALL_S = 0.05  # calls slower than this are timed as the median of 3 synchronised calls
TARGET_SPEEDUP = 20.0
# CSV columns of the timing rows, in order (the env_* columns follow)
ROW_COLUMNS = [
    "card",
    "shape",
    "C",
    "voxels",
    "binning",
    "variant",
    "backend",
    "mode",
    "dtype",
    "labels",
    "num_bins",
    "ms",
    "GB/s",
    "pct_peak",
    "contract_MB",
    "x_vs_torch",
    "x_vs_marginal",
    "loss_rel_diff_vs_torch",
    "status",
]
TILE_COLUMNS = [
    "card",
    "shape",
    "binning",
    "kernel",
    "tile",
    "num_warps",
    "ms",
    "GB/s",
    "pct_peak",
    "max_diff_vs_default",
    "status",
]


class RowSink:
    """A CSV file that gets each row the moment it is written (flushed), so a benchmark stopped by a time
    limit keeps every row measured before. The header is written at once."""

    def __init__(self, path: str, columns: list[str]) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._file = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="raise")
        self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# Peak HBM bandwidth (GB/s) by device-name fragment, used when the device properties do not give it.
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, few repetitions (checks the script)")
    ap.add_argument("--shapes", default=None, help='comma-separated BxCxD... e.g. "2x4x224x224x144"')
    ap.add_argument("--binning", default="hard,soft")
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--num-bins", type=int, default=20)
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="input dtype (default float32; --registers: float32 and bfloat16)",
    )
    ap.add_argument("--label-dtype", default="int64", choices=["int64", "int32", "uint8"])
    ap.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="after this many seconds only triton/cuda rows are still timed (slow baselines skipped)",
    )
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/gpu_<card>.csv)")
    ap.add_argument(
        "--registers",
        action="store_true",
        help="no GPU needed: compile the Triton kernels for --arch and print registers / stack per variant "
        "(--engine variants x --binning x fwd/bwd of --modes x --dtype, class counts of --shapes, --num-bins)",
    )
    ap.add_argument(
        "--cuda-registers",
        action="store_true",
        help="no GPU needed: compile csrc/cuda/binned_stats.cu for --arch with nvcc and print every kernel "
        "variant's registers / spills",
    )
    ap.add_argument(
        "--engine",
        default="marginal,top_label,raters3,moments,brier",
        help='forward-op rows per shape and binning: any of marginal,top_label,raters3,moments,brier ("" for none)',
    )
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --registers (default 90)")
    ap.add_argument(
        "--sweep-tiles",
        default=None,
        help='only time the Triton ops for block-size settings, e.g. "fwd:2048:4,fwd:4096:8,bwd:8192:8" '
        "(kernel:TILE_ELEMS:num_warps); writes gpu_<card>_tiles.csv",
    )
    return ap.parse_args(argv)


def card_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def peak_gbps(device) -> tuple[float | None, str]:
    """Peak memory bandwidth in GB/s and where it came from."""
    import torch

    if device.type != "cuda":
        return None, "n/a (cpu)"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties (2 x memory clock x bus width)"
    name = props.name
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value, f"table entry {key!r}"
    return None, "unknown card (no % of peak)"


def make_timer(device, dry_run: bool):
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        def timer(fn):
            fn()  # compile / allocate outside the measurement
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            once = time.perf_counter() - t0
            if once > SLOW_CALL_S:  # slow baselines: median of 3 synchronised calls keeps the run short
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)
            return do_bench(fn, warmup=10 if dry_run else 25, rep=20 if dry_run else 100, return_mode="median") / 1e3

        return timer
    from _common import median_time

    return lambda fn: median_time(
        fn, warmup=1, reps=3 if dry_run else 5, sync=None if device.type == "cpu" else torch.cuda.synchronize
    )


def loss_fn(backend: str, num_bins: int, soft: bool):
    """The loss from (logits, labels) for a backend: mean mL1-ACE, softmax + one-hot labels, empty classes ignored."""
    from _common import torch_vectorised_loss

    import calibops.functional as F

    if backend == "torch-vectorised":
        return lambda x, y: torch_vectorised_loss(x, y, num_bins=num_bins, soft=soft)
    binning = "soft" if soft else "hard"
    return lambda x, y: F.marginal_l1_ace(
        x, y, num_bins=num_bins, binning=binning, softmax=True, to_onehot_y=True, backend=backend
    )


def kernel_resources() -> list[str]:
    """Registers / spills of the compiled Triton kernels (best effort, triton-version dependent)."""
    lines = []
    try:
        import importlib

        kern_mod = importlib.import_module("calibops.backends.triton.kernels")

        kernels = (  # the forward's register and scatter paths are two specialisations (SCATTER) of one kernel
            ("fwd", kern_mod._stats_fwd_kernel),
            ("bwd", kern_mod._stats_bwd_kernel),
        )
        for kname, kern in kernels:
            caches = getattr(kern, "device_caches", None) or {}
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for ck in cache.values():
                    consts = getattr(getattr(ck, "src", None), "constants", {}) or {}
                    keep = {k: v for k, v in consts.items() if isinstance(k, str) and k.isupper()}
                    if not keep:
                        keep = {str(k): v for k, v in list(consts.items())[-10:]}
                    lines.append(
                        f"  {kname}: n_regs={getattr(ck, 'n_regs', '?')} n_spills={getattr(ck, 'n_spills', '?')} "
                        f"num_warps={getattr(getattr(ck, 'metadata', None), 'num_warps', '?')} {keep}"
                    )
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        lines.append(f"  (kernel resources unavailable: {type(exc).__name__}: {exc})")
    return lines


def register_report(args) -> int:
    """Compile the forward/backward kernels for sm_<arch> (no GPU needed) and print ptxas register use.

    Variants: every ``--engine`` variant (``marginal``: the v1 configuration, ``top_label``, ``raters3``,
    ``moments``) x ``--binning`` x kernel (``fwd`` / ``bwd`` from ``--modes``) x input dtype (``--dtype``, or
    float32 and bfloat16 when it is not given), for the class counts of ``--shapes`` (default C = 1, 2, 4, 8,
    16, 32, 40 on 2 x 224*224*144 voxels), ``--num-bins`` bins (above 64 the forward is the scatter kernel) and
    ``--label-dtype`` labels. Each variant is compiled with the specialisation Triton's JIT gives a real launch:
    the JIT's own binder (``create_function_from_signature``) and argument packing (``JITFunction._pack_args``)
    turn the launch arguments the op passes (contiguous tensors, the grid of ``launch_config`` on a 132-SM card)
    into the signature, the constexprs and the run-time divisibility hints (pointers 16-byte aligned, integers
    divisible by 16, integers equal to 1). Without those hints ptxas sees other code and under-reports registers
    (93 instead of 119 for the v1 soft bf16 forward at C = 2). Registers and stack bytes come from
    ``cuobjdump -res-usage`` on the cubin. Returns 1 when any variant fails to compile."""
    import importlib
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget

    tb = importlib.import_module("calibops.backends.triton.binned_stats")
    launch = importlib.import_module("calibops.backends.triton.launch")
    if tb.INTERPRETED:
        print("--registers needs TRITON_INTERPRET unset")
        return 2
    variants = [v.strip() for v in args.engine.split(",") if v.strip()] or ["marginal"]
    unknown = sorted(set(variants) - set(ENGINE_VARIANTS))
    if unknown:
        raise SystemExit(f"bench_gpu: unknown --engine variant(s) {unknown}; choose from {list(ENGINE_VARIANTS)}")
    if args.shapes:
        problems = []
        for s in args.shapes.split(","):
            dims = [int(v) for v in s.split("x")]
            problems.append((dims[0], dims[1], math.prod(dims[2:])))
    else:
        problems = [(2, C, 224 * 224 * 144) for C in (1, 2, 4, 8, 16, 32, 40)]
    binnings = [b.strip() for b in args.binning.split(",") if b.strip()]
    kernels = [k for k in ("fwd", "bwd") if any(k in m.split("+") for m in args.modes.split(","))]
    xdts = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    nvbin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(nvbin, "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump") or cuobjdump
    print(
        f"Triton {triton.__version__}, target sm_{args.arch}: registers / stack bytes per kernel variant "
        f"(the JIT's specialisation of the op's launch arguments; softmax, {args.label_dtype} labels, "
        f"M={args.num_bins}, 132 SMs)"
    )
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    saved_sms = launch._num_sms  # launch_config looks _num_sms up in calibops.backends.triton.launch
    launch._num_sms = lambda device: 132
    try:
        for B, C, N in problems:
            for variant, binning, xdt, kernel in itertools.product(variants, binnings, xdts, kernels):
                failures += _compile_one(
                    tb, launch, triton, target, cuobjdump, args, B, C, N, variant, binning, xdt, kernel
                )
    finally:
        launch._num_sms = saved_sms
    print(f"{'all variants compiled' if not failures else f'{failures} variant(s) failed to compile'}")
    return 1 if failures else 0


def jit_launch_args(tb, launch, B: int, C: int, N: int, M: int, variant: str, binning: str, xdt, ldt, kernel: str):
    """(kernel function, keyword launch arguments, num_warps, config) as the op launches the kernel for a
    [B, C, N] softmax + integer-labels problem with M bins and an ``ENGINE_VARIANTS`` variant: the op's own
    ``launch_config`` (the forward's scatter path chosen as the op does) and constexpr ``flags``; small CPU
    tensors stand in for the device buffers (only their dtype and 16-byte alignment matter to the
    specialisation, as for torch's CUDA allocations)."""
    import torch

    from calibops.contract import SCHEME_HARD, SCHEME_SOFT, TARGET_LABELS, OpCall

    mode, R, moments = ENGINE_VARIANTS[variant]
    scheme = SCHEME_SOFT if binning == "soft" else SCHEME_HARD
    backward = kernel == "bwd"
    cfg = launch.launch_config(
        B, C, N, M, torch.device("cuda"), backward=backward, mode=mode, raters=R, moments=moments
    )
    fn = tb._stats_bwd_kernel if backward else tb._stats_fwd_kernel
    dtypes = {
        "x_ptr": xdt,
        "gx_ptr": xdt,
        "t_ptr": ldt,
        "e_ptr": torch.float32,
        "part_ptr": torch.float64 if cfg["SCATTER"] else torch.float32,
        "cnt_ptr": torch.int64,
        "gc_ptr": torch.float32,
        "gp_ptr": torch.float32,
        "gy_ptr": torch.float32,
        "gp2_ptr": torch.float32,
        "gpy_ptr": torch.float32,
    }
    ints = {
        "C": C,
        "N": N,
        "P": cfg["P"],
        "tiles_per_prog": cfg["tiles_per_prog"],
        "ignore_index": 0,
        "has_ignore": 0,
        "right": 0,
    }
    call = OpCall(None, None, None, M, scheme, 1, TARGET_LABELS, mode, moments, None, False)  # the scalars flags reads
    consts = launch.flags(cfg, call, R, backward=backward)
    num_warps = consts.pop("num_warps")
    kwargs = {}
    for name in fn.arg_names:
        if name in dtypes:
            kwargs[name] = torch.empty(64, dtype=dtypes[name])
        elif name in ints:
            kwargs[name] = ints[name]
        elif name in consts:
            kwargs[name] = consts[name]
        else:
            raise KeyError(f"bench_gpu --registers does not know the argument {name!r} of {fn.__name__}; add it")
    return fn, kwargs, num_warps, cfg


def _compile_one(tb, launch, triton, target, cuobjdump, args, B, C, N, variant, binning, xdt, kernel) -> int:
    import subprocess
    import tempfile

    import torch
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[xdt]
    label = f"{kernel} C={C:<3d} {variant:<9s} {binning:<4s} {short:<4s}"
    try:
        fn, kwargs, num_warps, cfg = jit_launch_args(
            tb,
            launch,
            B,
            C,
            N,
            ENGINE_NUM_BINS.get(variant, args.num_bins),
            variant,
            binning,
            getattr(torch, xdt),
            getattr(torch, args.label_dtype),
            kernel,
        )
        label += " scatter" if cfg["SCATTER"] and kernel != "bwd" else ""
        label += f" C_BLOCK={cfg['C_BLOCK']:<3d} K_BLOCK={kwargs.get('K_BLOCK', '-')!s:<3s}"
        label += f" BLOCK_N={cfg['BLOCK_N']:<5d} warps={num_warps}"
        t0 = time.perf_counter()
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(**kwargs, num_warps=num_warps)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, {"num_warps": num_warps}, bound_args, specialization, options
        )
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
        reg = re.search(r"REG:(\d+)", res.stdout)
        stack = re.search(r"STACK:(\d+)", res.stdout)
        hinted = ",".join(fn.arg_names[path[0]] for path, value in sorted(attrs.items()) if value)
        print(
            f"  {label}: registers={reg.group(1) if reg else '?'} stack={stack.group(1) if stack else '?'} "
            f"compile={time.perf_counter() - t0:.1f}s hints[{hinted}]",
            flush=True,
        )
        return 0
    except Exception as exc:  # noqa: BLE001
        print(f"  {label}: COMPILE FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        return 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.registers:
        os.environ.pop("TRITON_INTERPRET", None)
        return register_report(args)
    if args.cuda_registers:
        return cuda_register_report(args.arch)
    args.dtype = args.dtype or "float32"
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    from _common import contract_bytes, environment, print_table

    import calibops

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --device cpu --dry-run to check the script)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = DRY_SHAPES if args.dry_run else ISSUE_SHAPES
    binnings = [b.strip() for b in args.binning.split(",") if b.strip()]
    engine = [v.strip() for v in args.engine.split(",") if v.strip()]
    unknown = sorted(set(engine) - set(ENGINE_VARIANTS))
    if unknown:
        raise SystemExit(f"bench_gpu: unknown --engine variant(s) {unknown}; choose from {list(ENGINE_VARIANTS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    dtype = getattr(torch, args.dtype)
    label_dtype = getattr(torch, args.label_dtype)
    timer = make_timer(device, args.dry_run)

    env = environment()
    card = card_name(device)
    peak, peak_src = peak_gbps(device)
    print("calibops GPU benchmark: mL1-ACE from logits + labels (softmax, one-hot in-kernel), mean reduction")
    for k, v in env.items():
        print(f"  {k}: {v}")
    print(f"  device: {card}; peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'} [{peak_src}]")
    avail = calibops.available_backends()
    backends = []
    # torch-vectorised first: its loss and times are what every other row is compared with
    for b in sorted(wanted, key=lambda name: name != "torch-vectorised"):
        if b == "torch-vectorised":
            backends.append(b)
            continue
        why = calibops.backends.registry.why_unavailable(b, device) if b in avail else f"unknown backend {b!r}"
        if why is None:
            backends.append(b)
        else:
            print(f"  backend {b}: not measured ({why})")
    print(
        f"  backends: {', '.join(backends)}; modes: {', '.join(modes)}; binning: {', '.join(binnings)}; "
        f"input {args.dtype}, labels {args.label_dtype}, M={args.num_bins}; validate=True (default API path)"
    )
    print()

    if args.sweep_tiles:
        return sweep_tiles(args, device, shapes, binnings, dtype, label_dtype, timer, card, peak, env)

    out = args.out
    if out is None:
        if args.dry_run:
            out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gpu_dryrun_{card_slug(card)}.csv")
        else:
            out = os.path.join(HERE, "results", f"gpu_{card_slug(card)}.csv")
    # every row goes to the CSV the moment it is measured: a run stopped by a time limit keeps its rows
    sink = RowSink(out, ROW_COLUMNS + [f"env_{k}" for k in env])
    print(f"  rows are appended to {out} as they are measured")
    print()
    rows = []

    def emit(row, base_time):
        row.update({f"env_{k}": v for k, v in env.items()})
        base = base_time.get(row.get("mode"))
        if base and row.get("status") == "ok" and row["backend"] != "torch-vectorised":
            row["x_vs_torch"] = round(base / (row["ms"] / 1e3), 2)
        rows.append(row)
        sink.write(row)
        print(
            f"  {row['shape']:<18} {row['binning']:<4} {row['variant']:<12} {row['mode']:<7} {row['backend']:<16} "
            + (f"{row['ms']:>10.3f} ms {row['GB/s']:>8} GB/s" if row.get("status") == "ok" else row["status"])
            + (f"  {row['x_vs_torch']}x torch" if row.get("x_vs_torch") else ""),
            flush=True,
        )

    t_start = time.perf_counter()
    for shape in shapes:
        B, C = shape[:2]
        g = torch.Generator(device="cpu").manual_seed(0)
        try:
            x = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype)
            y = torch.randint(0, C, (B, *shape[2:]), generator=g).to(device=device, dtype=label_dtype)
        except Exception as exc:  # noqa: BLE001
            print(f"shape {shape}: could not allocate inputs ({type(exc).__name__}: {exc})")
            continue
        for binning in binnings:
            soft = binning == "soft"
            base_time = {}
            base_loss = None
            for backend in backends:
                fn = loss_fn(backend, args.num_bins, soft)
                slow = backend in ("reference", "torch-vectorised")
                common = {
                    "card": card,
                    "shape": "x".join(map(str, shape)),
                    "C": C,
                    "voxels": math.prod(shape[2:]),
                    "binning": binning,
                    "variant": "loss",
                    "backend": backend,
                    "dtype": args.dtype,
                    "labels": args.label_dtype,
                    "num_bins": args.num_bins,
                }
                if slow and backend != "torch-vectorised" and time.perf_counter() - t_start > args.budget_s:
                    for mode in modes:
                        emit({**common, "mode": mode, "status": "skipped (time budget spent)"}, base_time)
                    continue
                # correctness against torch-vectorised (same formula), before timing
                check = ""
                try:
                    with torch.no_grad():
                        value = float(fn(x, y))
                    if backend == "torch-vectorised":
                        base_loss = value
                    elif base_loss is not None:
                        rel = abs(value - base_loss) / max(abs(base_loss), 1e-12)
                        check = f"{rel:.1e}"
                except Exception as exc:  # noqa: BLE001
                    msg = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    for mode in modes:
                        emit({**common, "mode": mode, "status": msg}, base_time)
                    continue
                for mode in modes:
                    row = {**common, "mode": mode, "loss_rel_diff_vs_torch": check}
                    try:
                        xg = x.detach().clone().requires_grad_(mode != "fwd")
                        if mode == "fwd":

                            def run(xg=xg, fn=fn, y=y):
                                with torch.no_grad():
                                    return fn(xg, y)
                        elif mode == "bwd":
                            loss = fn(xg, y)

                            def run(loss=loss, xg=xg):
                                xg.grad = None
                                loss.backward(retain_graph=True)
                        else:

                            def run(xg=xg, fn=fn, y=y):
                                xg.grad = None
                                fn(xg, y).backward()

                        seconds = timer(run)
                        nbytes = contract_bytes(x, y, mode)
                        gbps = nbytes / seconds / 1e9
                        row.update(
                            {
                                "ms": round(seconds * 1e3, 4),
                                "GB/s": round(gbps, 1),
                                "pct_peak": round(100 * gbps / peak, 1) if peak else "",
                                "contract_MB": round(nbytes / 1e6, 1),
                                "status": "ok",
                            }
                        )
                        if backend == "torch-vectorised":
                            base_time[mode] = seconds
                    except Exception as exc:  # noqa: BLE001
                        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        if os.environ.get("BENCH_TRACEBACK"):
                            traceback.print_exc()
                    finally:
                        xg = loss = run = None  # noqa: F841 - free the graph before the next measurement
                    emit(row, base_time)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if engine:
                engine_rows(engine, backends, x, y, shape, binning, args, timer, peak, card, emit, t_start)
        x = y = None  # free before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sink.close()

    print()
    cols = [
        "shape",
        "binning",
        "variant",
        "mode",
        "backend",
        "ms",
        "GB/s",
        "pct_peak",
        "x_vs_torch",
        "x_vs_marginal",
        "loss_rel_diff_vs_torch",
        "status",
    ]
    print_table(rows, cols)
    print()
    print("Triton kernels compiled in this run:")
    for line in kernel_resources():
        print(line)
    print()
    print(f"wrote {out} ({len(rows)} rows) in {time.perf_counter() - t_start:.0f} s")
    return summary(rows, peak, shapes)


def sweep_tiles(args, device, shapes, binnings, dtype, label_dtype, timer, card, peak, env) -> int:
    """Time the Triton forward / backward ops alone for several (TILE_ELEMS, num_warps) settings."""
    import importlib

    import torch
    from _common import contract_bytes, print_table

    from calibops.reference import bin_centres, bin_edges

    importlib.import_module("calibops.backends.triton.binned_stats")  # registers calibops::triton_binned_stats
    settings = []
    for item in args.sweep_tiles.split(","):
        kernel, tile, warps = item.strip().split(":")
        if kernel not in ("fwd", "bwd"):
            raise ValueError(f"--sweep-tiles: kernel must be fwd or bwd, got {kernel!r}")
        settings.append((kernel, int(tile), int(warps)))
    csv_path = args.out or os.path.join(
        os.environ.get("TMPDIR", "/tmp") if args.dry_run else os.path.join(HERE, "results"),
        f"gpu_{card_slug(card)}_tiles.csv",
    )
    sink = RowSink(csv_path, TILE_COLUMNS + [f"env_{k}" for k in env])
    rows = []
    M = args.num_bins
    for shape in shapes:
        B, C = shape[:2]
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(shape, generator=g) * 2).to(device=device, dtype=dtype).reshape(B, C, -1)
        y = torch.randint(0, C, (B, *shape[2:]), generator=g).to(device=device, dtype=label_dtype).reshape(B, 1, -1)
        fwd_op, bwd_op = torch.ops.calibops.triton_binned_stats, torch.ops.calibops.triton_binned_stats_backward
        for binning in binnings:
            soft = binning == "soft"
            e = (bin_centres if soft else bin_edges)(M, device)
            opts = (e, M, int(soft), 1, 0, 0, False, None, False)  # softmax, labels, marginal, no moments
            ref = fwd_op(x, y, *opts)
            grads = [torch.randn(s.shape, generator=g).to(device) for s in ref[:5]]
            ref_grad = bwd_op(*grads, x, y, *opts)
            for kernel, tile, warps in settings:
                names = (f"CALIBOPS_TRITON_TILE_{kernel.upper()}", f"CALIBOPS_TRITON_WARPS_{kernel.upper()}")
                row = {
                    "card": card,
                    "shape": "x".join(map(str, shape)),
                    "binning": binning,
                    "kernel": kernel,
                    "tile": tile,
                    "num_warps": warps,
                }
                os.environ[names[0]], os.environ[names[1]] = str(tile), str(warps)
                try:
                    if kernel == "fwd":

                        def run(x=x, y=y, opts=opts, fwd_op=fwd_op):
                            return fwd_op(x, y, *opts)

                        out = run()
                        diff = max(float(((a - b).abs() / (b.abs() + 1)).max()) for a, b in zip(out[:3], ref[:3]))
                        nbytes = contract_bytes(x, y, "fwd")
                    else:

                        def run(x=x, y=y, opts=opts, grads=grads, bwd_op=bwd_op):
                            return bwd_op(*grads, x, y, *opts)

                        diff = float((run().float() - ref_grad.float()).abs().max())
                        nbytes = contract_bytes(x, y, "bwd")
                    seconds = timer(run)
                    gbps = nbytes / seconds / 1e9
                    row.update(
                        {
                            "ms": round(seconds * 1e3, 4),
                            "GB/s": round(gbps, 1),
                            "pct_peak": round(100 * gbps / peak, 1) if peak else "",
                            "max_diff_vs_default": f"{diff:.1e}",
                            "status": "ok",
                        }
                    )
                except Exception as exc:  # noqa: BLE001
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                finally:
                    for name in names:
                        os.environ.pop(name, None)
                row.update({f"env_{k}": v for k, v in env.items()})
                rows.append(row)
                sink.write(row)
                print(
                    f"  {row['shape']:<18} {binning:<4} {kernel} tile={tile:<5} warps={warps:<2} "
                    f"{row.get('ms', '')} ms {row['status']}",
                    flush=True,
                )
        x = y = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sink.close()
    print_table(rows, TILE_COLUMNS[1:])
    print()
    for line in kernel_resources():
        print(line)
    print(f"wrote {csv_path} ({len(rows)} rows)")
    return 1 if any(str(r["status"]).startswith("error") for r in rows) else 0


# Forward-op variants of the engine rows: (mode, raters R, moments).
ENGINE_VARIANTS = {
    "marginal": (0, 1, False),
    "top_label": (1, 1, False),
    "raters3": (0, 3, False),
    "moments": (0, 1, True),
    "brier": (0, 1, True),
}
# Variants with their own bin count (else --num-bins): brier_score's one-bin call.
ENGINE_NUM_BINS = {"brier": 1}


def engine_op(backend: str):
    """The forward op with the kernel-contract signature for a calibops backend (None: not an op backend)."""
    import torch

    from calibops.reference import binned_stats_prepared

    if backend == "cuda":
        return torch.ops.calibops.binned_stats
    if backend == "triton":
        return torch.ops.calibops.triton_binned_stats
    if backend == "reference":
        return binned_stats_prepared
    return None


def engine_rows(engine, backends, x, y, shape, binning, args, timer, peak, card, emit, t_start) -> None:
    """Time the forward op alone per engine variant (module docstring) on the shape's logits and labels."""
    import torch
    from _common import contract_bytes

    from calibops.reference import scheme_edges

    B, C = shape[:2]
    scheme = 1 if binning == "soft" else 0
    xf = x.reshape(B, C, -1)
    g = torch.Generator(device="cpu").manual_seed(1)
    targets = {1: y.reshape(B, 1, -1)}
    if any(ENGINE_VARIANTS[v][1] == 3 for v in engine):  # two more raters: the first map with 10% relabelled
        extra = []
        for _ in range(2):
            other = y.reshape(B, 1, -1).clone()
            flip = (torch.rand(other.shape, generator=g) < 0.1).to(other.device)
            other[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g).to(other.device, other.dtype)
            extra.append(other)
        targets[3] = torch.cat([targets[1], *extra], 1).contiguous()
    for backend in backends:
        op = engine_op(backend)
        if op is None:
            continue
        if backend == "reference" and time.perf_counter() - t_start > args.budget_s:
            continue
        base = None
        for variant in engine:
            mode, R, moments = ENGINE_VARIANTS[variant]
            M = ENGINE_NUM_BINS.get(variant, args.num_bins)
            edges = scheme_edges(M, scheme, x.device)
            t = targets[R]
            row = {
                "card": card,
                "shape": "x".join(map(str, shape)),
                "C": C,
                "voxels": math.prod(shape[2:]),
                "binning": binning,
                "variant": f"op:{variant}",
                "backend": backend,
                "mode": "fwd",
                "dtype": args.dtype,
                "labels": f"{args.label_dtype} R={R}",
                "num_bins": M,
            }
            try:

                def run(op=op, t=t, mode=mode, moments=moments, edges=edges, M=M):
                    with torch.no_grad():
                        return op(xf, t, edges, M, scheme, 1, 0, mode, moments, None, False)

                seconds = timer(run)
                nbytes = contract_bytes(xf, t, "fwd")
                gbps = nbytes / seconds / 1e9
                row.update(
                    {
                        "ms": round(seconds * 1e3, 4),
                        "GB/s": round(gbps, 1),
                        "pct_peak": round(100 * gbps / peak, 1) if peak else "",
                        "contract_MB": round(nbytes / 1e6, 1),
                        "status": "ok",
                    }
                )
                if variant == "marginal":
                    base = seconds
                elif base:
                    row["x_vs_marginal"] = round(seconds / base, 3)
            except Exception as exc:  # noqa: BLE001
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            emit(row, {})
        if x.device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_register_report(arch: int) -> int:
    """Compile csrc/cuda/binned_stats.cu for sm_<arch> with setup.py's nvcc flags (no GPU needed) and print
    ptxas's registers / stack / spill bytes of every kernel variant (Variant<input kind, mode, multi-rater,
    moments>: input kind 0 float32, 1 float16, 2 bfloat16; mode 0 marginal, 1 top-label)."""
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("--cuda-registers needs nvcc on PATH")
        return 2
    src = os.path.join(os.path.dirname(HERE), "csrc", "cuda", "binned_stats.cu")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "k.o"), "-O3", "-std=c++20", "--use_fast_math"]
        cmd += ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        cmd += ["-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "--resource-usage"]
        cmd += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-4000:])
        return 1
    filt = shutil.which("c++filt")
    print(f"CUDA kernels, sm_{arch}: registers / stack / spill bytes (Variant<input kind, mode, multi-rater, moments>)")
    current = None
    spill = (0, 0, 0)
    failures = 0
    for line in (res.stdout + res.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            if filt:
                name = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip()
            kind = "forward" if "forward" in name else "backward" if "backward" in name else "reduce"
            var = re.search(r"Variant<(\d+), (\d+), (\w+), (\w+)>", name) or re.search(
                r"VariantILi(\d)ELi(\d)ELb(\d)ELb(\d)", name
            )
            current = f"{kind:<8} " + (("<" + ", ".join(var.groups()) + ">") if var else "")
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = tuple(int(v) for v in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            failures += spill[1] > 0 or spill[2] > 0
            print(
                f"  {current:<34} registers={m.group(1):>3} stack={spill[0]} spill_stores={spill[1]} "
                f"spill_loads={spill[2]}"
            )
            current = None
    return 1 if failures else 0


def summary(rows, peak, shapes) -> int:
    """Print the GPU targets (docs/performance.md) for the fused backends; return 1 if a measurement failed."""
    print()
    print(
        f"SUMMARY (GPU targets: fwd+bwd >= {TARGET_PCT_PEAK:.0f}% of peak HBM bandwidth and "
        f">= {TARGET_SPEEDUP:.0f}x torch-vectorised)"
    )
    failed = [r for r in rows if str(r.get("status", "")).startswith("error")]
    for r in rows:
        if r.get("mode") != "fwd+bwd" or r.get("backend") not in ("triton", "cuda") or r.get("status") != "ok":
            continue
        pct = r.get("pct_peak")
        spd = r.get("x_vs_torch")
        ok_bw = isinstance(pct, float) and pct >= TARGET_PCT_PEAK
        ok_sp = isinstance(spd, float) and spd >= TARGET_SPEEDUP
        diff = r.get("loss_rel_diff_vs_torch", "")
        print(
            f"  {r['backend']:<7} {r['shape']:<18} {r['binning']:<5} {r['ms']:>9.3f} ms  "
            f"{pct if pct != '' else '?':>6}% peak [{'PASS' if ok_bw else 'MISS'}]  "
            f"{spd if spd is not None else '?':>7}x torch [{'PASS' if ok_sp else 'MISS'}]  loss diff {diff}"
        )
    if failed:
        print(f"  {len(failed)} measurement(s) failed: see status column")
    bad_loss = [
        r
        for r in rows
        if r.get("loss_rel_diff_vs_torch") not in (None, "") and float(r["loss_rel_diff_vs_torch"]) > 1e-4
    ]
    if bad_loss:
        print(f"  WARNING: {len(bad_loss)} row(s) whose loss differs from torch-vectorised by > 1e-4 relative")
    return 1 if failed or bad_loss else 0


if __name__ == "__main__":
    sys.exit(main())
