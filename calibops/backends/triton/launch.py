"""Launch configuration of the Triton kernels: block sizes, grid, constexpr flags, interpreter arguments.

Block-size heuristic (documented, no autotuning so runs are reproducible and the interpreter stays fast). The
numbers come from compiling the v1 kernels for sm_90 (ptxas register counts, no GPU needed); the v2 kernels
compile the marginal, single-rater, moments-off configurations to the same code:

- ``C_BLOCK = next_pow2(C)`` up to ``MAX_C_BLOCK = 32``: up to 32 classes live in one register tile.
- Forward: tiles of ``C_BLOCK x BLOCK_N`` = 1024 elements (C_BLOCK <= 8) or 512 (16-32 classes), 4 warps:
  8 or 4 elements per thread, 56-152 registers and no spills for C <= 32 (bigger tiles reached 255
  registers and spilled). The per-bin loop is a runtime loop (an unrolled one spilled and compiled 30x
  slower). Programs: ~``PROGRAMS_PER_SM = 32`` per SM over the grid, each >= 4 and <= 256 tiles (the upper
  bound limits the sequential float32 accumulation length). Top-label uses the same probability tile and a
  one-row histogram (``K_BLOCK = 1``), so it never needs more registers than the marginal kernel (123 vs 136
  at C = 4, hard). Marginal with several raters or moments halves the tile (at C = 4, 1024-element tiles took
  211-221 registers with R = 3 and 179-184 with moments; 512: 96-125); top-label keeps it (R = 3 and moments:
  128).
- Scatter forward (M > 64): ``BLOCK_N = prev_pow2(sqrt(SCATTER_PAIRS / K_BLOCK))`` clamped to [8, 32]
  (2048 pairs: 32-152 registers for C <= 40 with Triton 3.6, no spills; 4096 pairs took 161-168 at 16
  classes and 64 lanes for one class ~250), 4 warps; partial rows accumulate in float64, so tiles per
  program need no upper bound.
- Backward: 1024-element tiles, 8 warps (4 elements per thread, 45-80 registers), one tile per program.
- ``BLOCK_N`` is clamped to [16, 1024] (and, under the interpreter only, to next_pow2(N)).

The environment variables ``CALIBOPS_TRITON_TILE_FWD`` / ``CALIBOPS_TRITON_TILE_BWD`` (powers of two >= 16)
and ``CALIBOPS_TRITON_WARPS_FWD`` / ``CALIBOPS_TRITON_WARPS_BWD`` override the heuristic for experiments, and
``CALIBOPS_TRITON_MAX_REGISTER_BINS`` (0-1024) moves the switch to the scatter kernel (0: always scatter).
Results do not depend on them beyond float32 summation order.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ...contract import MODE_MARGINAL, TARGET_LABELS, OpCall
from .schemes import ONE_BIN

__all__ = [
    "MAX_BLOCK_N",
    "MAX_C_BLOCK",
    "MAX_REGISTER_BINS",
    "MAX_TILES_PER_PROG",
    "MIN_TILES_PER_PROG",
    "PROGRAMS_PER_SM",
    "SCATTER_MAX_N",
    "SCATTER_PAIRS",
    "flags",
    "interpreter_scalars",
    "launch_config",
]

MAX_C_BLOCK = 32
MAX_TILES_PER_PROG = 256
MIN_TILES_PER_PROG = 4
PROGRAMS_PER_SM = 32
MAX_BLOCK_N = 1024  # the forward's packed (count, sum_y) tile sums rely on BLOCK_N <= 1024 < _PACK
MAX_REGISTER_BINS = 64  # num_bins above this use the scatter kernel (cost independent of num_bins)
SCATTER_PAIRS = 2048  # scatter kernel: K_BLOCK * BLOCK_N**2 all-pairs comparisons per tile (<= 152 registers)
SCATTER_MAX_N = 32  # scatter kernel: widest tile (64 lanes for one class took ~250 registers on sm_90)


def _env_pow2(name: str, default: int, minimum: int = 16) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {raw!r}")
    return value


def _max_register_bins() -> int:
    raw = os.environ.get("CALIBOPS_TRITON_MAX_REGISTER_BINS", "").strip()
    if not raw:
        return MAX_REGISTER_BINS
    value = int(raw)
    if not 0 <= value <= 1024:
        raise ValueError(f"CALIBOPS_TRITON_MAX_REGISTER_BINS must be an integer in [0, 1024], got {raw!r}")
    return value


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: few programs keep the Python-level overhead low


def _scatter_block_n(k_block: int) -> int:
    """Scatter kernel tile width: the largest power of two with k_block * width**2 <= SCATTER_PAIRS, clamped to
    [8, SCATTER_MAX_N]."""
    width = 1 << (math.isqrt(max(SCATTER_PAIRS // k_block, 1)).bit_length() - 1)
    return max(8, min(width, SCATTER_MAX_N))


def launch_config(
    B: int,
    C: int,
    N: int,
    num_bins: int,
    device: torch.device,
    backward: bool = False,
    mode: int = MODE_MARGINAL,
    raters: int = 1,
    moments: bool = False,
) -> dict:
    """Block sizes and grid for a ``[B, C, N]`` problem (see the module docstring for the heuristic).

    ``SCATTER`` (forward only) selects the forward kernel's scatter path (``num_bins > MAX_REGISTER_BINS``);
    ``M_PAD`` is the register histogram width of its other path. ``num_cc`` class chunks of ``C_BLOCK`` classes;
    ``GRID_CC`` programs per (image, voxel range) in the forward grid (``num_cc`` marginal, 1 top-label, whose
    program loops over the chunks); ``K_BLOCK`` statistic rows per forward program. Several raters or moments
    add histogram planes: the register kernel's tile is then halved (module docstring)."""
    c_block = min(triton.next_power_of_2(max(C, 1)), MAX_C_BLOCK)
    marginal = mode == MODE_MARGINAL
    k_block = c_block if marginal else 1
    scatter = not backward and num_bins > _max_register_bins()
    if backward:
        tile, num_warps = 1024, 8  # 4 elements per thread: 45-80 registers (sm_90, C <= 32, hard/soft)
    elif c_block <= 8:
        tile, num_warps = 1024, 4  # 8 elements per thread: ~80-95 registers
    else:
        tile, num_warps = 512, 4  # 4 elements per thread: ~70-110 registers for 16-32 classes
    if not backward and marginal and (raters > 1 or moments):
        tile //= 2  # more planes per row (R rater targets, moments): 1024-element tiles took 179-221 registers
    if scatter:
        block_n = _scatter_block_n(k_block)
        num_warps = _env_pow2("CALIBOPS_TRITON_WARPS_FWD", 4, 1)
    else:
        tile = _env_pow2("CALIBOPS_TRITON_TILE_BWD" if backward else "CALIBOPS_TRITON_TILE_FWD", tile)
        num_warps = _env_pow2("CALIBOPS_TRITON_WARPS_BWD" if backward else "CALIBOPS_TRITON_WARPS_FWD", num_warps, 1)
        block_n = max(16, min(tile // c_block, MAX_BLOCK_N))
    if device.type != "cuda":  # interpreter: no point in simulating lanes past the end of a tiny volume
        block_n = max(8 if scatter else 16, min(block_n, triton.next_power_of_2(max(N, 1))))
    num_cc = triton.cdiv(C, c_block)
    grid_cc = num_cc if marginal else 1
    tiles = triton.cdiv(N, block_n)
    if backward:
        # one tile per program unless the grid would get huge (then a few consecutive tiles each)
        progs = max(1, min(tiles, (1 << 24) // max(B, 1)))
    else:
        # many programs (several waves at 4-6 resident per SM keep the tail short), each >= MIN_TILES_PER_PROG
        # tiles so the [S, B*P, K, M] partials stay small next to the input, and (register kernel) <=
        # MAX_TILES_PER_PROG tiles; the scatter kernel accumulates in float64 and needs no such bound, but keeps
        # P * M <= N so its partial rows stay within about the input's size
        target = PROGRAMS_PER_SM * _num_sms(device)
        progs = max(1, min(triton.cdiv(tiles, MIN_TILES_PER_PROG), triton.cdiv(target, max(B * grid_cc, 1))))
        if scatter:
            progs = max(1, min(progs, N // num_bins))
        else:
            progs = max(progs, triton.cdiv(tiles, MAX_TILES_PER_PROG))
    tiles_per_prog = triton.cdiv(tiles, progs)
    progs = triton.cdiv(tiles, tiles_per_prog)
    return {
        "C_BLOCK": c_block,
        "K_BLOCK": k_block,
        "BLOCK_N": block_n,
        "num_warps": num_warps,
        "P": progs,
        "tiles_per_prog": tiles_per_prog,
        "num_cc": num_cc,
        "GRID_CC": grid_cc,
        "M_PAD": triton.next_power_of_2(num_bins),
        "SCATTER": scatter,
    }


def flags(cfg: dict, call: OpCall, raters: int, backward: bool = False) -> dict:
    """The kernels' constexpr arguments (and ``num_warps``) for the op call ``call`` with ``raters`` label maps;
    see calibops/backends/triton/kernels.py."""
    labels = call.target_kind == TARGET_LABELS
    one_bin = call.scheme in ONE_BIN
    out = {
        "NUM_BINS": call.num_bins,
        "C_BLOCK": cfg["C_BLOCK"],
        "BLOCK_N": cfg["BLOCK_N"],
        "SCHEME": int(call.scheme),
        "ONE_BIN": one_bin,
        "ACTIVATION": int(call.activation),
        "LABELS": labels,
        "SINGLE_CHUNK": cfg["num_cc"] == 1,
        "MODE": int(call.mode),
        "MOMENTS": bool(call.moments),
        "NUM_RATERS": int(raters),
        "R_PAD": triton.next_power_of_2(int(raters)),
        "num_warps": cfg["num_warps"],
    }
    if not backward:
        out["K_BLOCK"] = cfg["K_BLOCK"]
        out["PACKED"] = one_bin and labels and raters == 1
        out["M_PAD"] = cfg["M_PAD"]
        out["SCATTER"] = cfg["SCATTER"]
    return out


def interpreter_scalars(interpreted: bool, *values: int) -> tuple:
    """The kernels' integer arguments: unchanged when compiled; under the interpreter, 0-d scalar tensors.

    Triton <= 3.6's interpreter wraps an int argument in a one-element array and ``range(C)`` calls ``int()``
    on it, which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); a 0-d
    value works with every numpy. Same dtype rule as the interpreter's own conversion (int32 when it fits)."""
    if not interpreted:
        return values
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    out = []
    for v in values:
        v = int(v)
        dt, np_dt = (tl.int32, np.int32) if -(2**31) <= v < 2**31 else (tl.int64, np.int64)
        out.append(tl.core.tensor(TensorHandle(np.array(v, dtype=np_dt), dt), dt))
    return tuple(out)
