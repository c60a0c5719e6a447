"""A tiny end-to-end run of the CUDA backend for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_case.py

Every launch path of csrc/cuda runs at least once on small tensors: forward (statistics + reduction) and
backward, hard and soft binning, activations none/softmax/sigmoid, float32/float16/bfloat16 inputs, every label
dtype (with out-of-range labels and an ignore_index) and every dense target dtype, sizes that end mid-tile and
mid-block, more classes than threads, many bins (smaller histogram groups), grads read from global memory, and
the autograd path through ``calibops.functional``. Cheap sanity checks (hard counts add up to the kept voxels,
gradients finite) make it fail loudly too. Exits 0 with "sanitize_case: ok" on success; needs a CUDA device and
calibops._C built with the CUDA kernels (exits 2 otherwise). The kernel variant (marginal / top-label, R = 1 / 3
label maps, moments off / on) rotates over the cases, so every variant's kernels run too.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: no CUDA device", file=sys.stderr)
        return 2
    import calibops.functional as F
    from calibops.backends import extension as _ops
    from calibops.reference import bin_centres, bin_edges

    if not _ops.has_cuda_kernels():
        print(f"sanitize_case: calibops._C has no CUDA kernels ({_ops.EXTENSION_ERROR})", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    ops = torch.ops.calibops
    label_dtypes = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
    dense_dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8]
    runs = 0

    def run(B, C, N, M, dtype, tdtype, labels, soft, act, ignore_index=None):
        nonlocal runs
        # the kernel variant rotates with the run counter: every (mode, raters, moments) runs across the cases
        mode, moments = runs % 2, (runs // 2) % 2 == 1
        R = 3 if labels and (runs // 4) % 2 else 1
        x = (torch.randn(B, C, N, generator=g) * 3).to(dtype)
        if act == 0:
            x = torch.softmax(x.float(), 1).to(dtype)
        if labels:
            lab = torch.randint(-2, C + 2, (B, R, N), generator=g)
            if ignore_index is not None:
                lab[torch.rand(B, R, N, generator=g) < 0.2] = ignore_index
            t = (lab % 256 if tdtype == torch.uint8 else lab).to(tdtype)
        else:
            t = torch.rand(B, C, N, generator=g)
            t = (t < 0.5).to(tdtype) if tdtype in (torch.bool, torch.uint8) else t.to(tdtype)
        x, t = x.to(dev), t.to(dev)
        edges = (bin_centres(M) if soft else bin_edges(M)).to(dev)
        opts = (edges, M, int(soft), act, 0 if labels else 1, mode, moments, ignore_index if labels else None, False)
        stats = ops.binned_stats(x, t, *opts)
        cnt = stats[0]
        grads = [torch.randn(tuple(v.shape), generator=g).to(dev) for v in stats[:5]]
        grad = ops.binned_stats_backward(*grads, x, t, *opts)
        torch.cuda.synchronize()
        tl = t.long().cpu()
        ok = (tl >= 0) & (tl < C) & (tl != (ignore_index if ignore_index is not None else -(10**9)))
        kept = B * N if not labels else int(ok.all(1).sum())  # a voxel is used when every rater's label is valid
        total = float(cnt.sum()) / (C if mode == 0 else 1)
        if abs(total - kept) > 1e-3 * max(kept, 1):
            raise AssertionError(f"counts add up to {total}, expected {kept} (B{B} C{C} N{N} M{M} soft={soft})")
        if not torch.isfinite(grad.float()).all():
            raise AssertionError(f"non-finite gradient (B{B} C{C} N{N} M{M} soft={soft} act={act})")
        runs += 1

    for soft in (False, True):
        for act in (0, 1, 2):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for td in label_dtypes:
                    run(2, 3, 1100, 10, dtype, td, True, soft, act, ignore_index=1 if td == torch.uint8 else -1)
                for td in dense_dtypes:
                    run(1, 4, 777, 7, dtype, td, False, soft, act)
        # shapes that take the other plan branches
        run(1, 4, 16384 + 3, 20, torch.float32, torch.int64, True, soft, 1)  # two blocks per image
        run(1, 300, 70, 10, torch.float32, torch.int32, True, soft, 1)  # C > threads, grads in global memory
        run(2, 4, 600, 200, torch.float16, torch.int64, True, soft, 1)  # many bins: smaller groups
        run(3, 1, 1, 1, torch.float32, torch.int64, True, soft, 2)  # one voxel, one class, one bin
        run(2, 2, 0, 5, torch.float32, torch.int64, True, soft, 1)  # no voxel

    # the autograd path through the public API
    logits = torch.randn(2, 4, 9, 11, 13, generator=g).to(dev).requires_grad_(True)
    labels = torch.randint(0, 4, (2, 1, 9, 11, 13), generator=g).to(dev)
    for binning in ("hard", "soft"):
        loss = F.marginal_l1_ace(logits, labels, binning=binning, softmax=True, to_onehot_y=True, backend="cuda")
        loss.backward()
    torch.cuda.synchronize()
    if not torch.isfinite(logits.grad).all():
        raise AssertionError("non-finite gradient through calibops.functional")
    print(f"sanitize_case: ok ({runs} kernel-op cases + functional hard/soft)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
