"""Per-tile device code shared by the Triton kernels: loads, activations, targets and the contract's entries.

A tile is ``BLOCK_N`` consecutive voxels of one image. Every function here is ``@triton.jit`` and works on
float32 registers whatever the input dtype (docs/kernel_contract.md, "Entries, probabilities, targets"):

- :func:`voxels`: the label maps of the tile, read once (``R`` raters), which voxels are used, bad labels;
- :func:`probs` / :func:`normaliser`: p from the input (softmax over C, online over class chunks when C does
  not fit one register tile; sigmoid; identity);
- :func:`marginal_targets` / :func:`top_label` / :func:`top_targets`: the marginal rows ``k = c`` and the
  top-label row (confidence ``q = max_c p``, predicted class ``a``, lowest index on ties);
- :func:`entries`: all of the above for the forward kernels: ``(q, y, ybar, valid, nbad, nnf)``.

Targets of several raters are ``[K, R_PAD, BLOCK_N]`` tiles (one 0/1 plane per rater, padding raters 0);
with one rater (or a dense target) ``[K, BLOCK_N]``, so the single-rater kernels are today's.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "entries",
    "is_finite",
    "load_x",
    "marginal_targets",
    "normaliser",
    "probs",
    "rater",
    "top_label",
    "top_targets",
    "voxels",
]


@triton.jit
def is_finite(p):
    """True where the float32 p is neither NaN nor +-inf, from its exponent bits (never folded by fast math)."""
    return (p.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def load_x(x_img, c, n, cmask, nmask, N):
    """Input tile [C_BLOCK, BLOCK_N] as float32 (0 outside the masks)."""
    offs = c[:, None].to(tl.int64) * N + n[None, :]
    return tl.load(x_img + offs, mask=cmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def normaliser(
    x_img,
    n,
    nmask,
    C,
    N,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """``(mx, den)`` for :func:`probs`: with softmax over several class chunks, the per-voxel max and
    sum(exp(x - max)) over all C classes, online over the chunks ([BLOCK_N] each); otherwise unused zeros (one
    chunk normalises itself)."""
    mx = tl.zeros([BLOCK_N], tl.float32)
    den = mx
    if ACTIVATION == 1 and not SINGLE_CHUNK:
        mx, den = _softmax_norm(x_img, n, nmask, C, N, C_BLOCK, BLOCK_N)
    return mx, den


@triton.jit
def _softmax_norm(x_img, n, nmask, C, N, C_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-voxel max and sum(exp(x - max)) over all C classes, online over class chunks ([BLOCK_N] each)."""
    mx = tl.full([BLOCK_N], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, C_BLOCK):
        c = c0 + tl.arange(0, C_BLOCK)
        cmask = c < C
        x = load_x(x_img, c, n, cmask, nmask, N)
        x = tl.where(cmask[:, None], x, float("-inf"))
        new_mx = tl.maximum(mx, tl.max(x, axis=0))
        # shift by 0 while every logit so far is -inf (a chunk of -inf logits must not make the sum NaN);
        # a +inf or NaN logit still makes it NaN, so every p of that voxel is NaN (the non-finite rule)
        shift = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        den = den * tl.exp(mx - shift) + tl.sum(tl.exp(x - shift[None, :]), axis=0)
        mx = new_mx
    return mx, den


@triton.jit
def probs(x, cmask, mx, den, ACTIVATION: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """p from the float32 tile x: identity (0), softmax over dim 0 (1), sigmoid (2).

    With SINGLE_CHUNK the softmax normaliser is computed from the tile itself (mx, den unused)."""
    if ACTIVATION == 1:
        xs = tl.where(cmask[:, None], x, float("-inf"))
        if SINGLE_CHUNK:
            e = tl.exp(xs - tl.max(xs, axis=0)[None, :])
            p = e / tl.sum(e, axis=0)[None, :]
        else:
            p = tl.exp(xs - mx[None, :]) / den[None, :]
    elif ACTIVATION == 2:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = x
    return p


@triton.jit
def voxels(
    t_ptr,
    b64,
    n,
    nmask,
    C,
    N,
    ignore_index,
    has_ignore,
    LABELS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """The tile's labels, read once: ``(lab, keep, nbad)``.

    ``lab``: int64 labels, ``[BLOCK_N]`` (one rater) or ``[R_PAD, BLOCK_N]`` (several; dense targets: unused).
    ``keep`` [BLOCK_N]: the voxel is used (every rater's label in [0, C) and not ``ignore_index``). ``nbad``
    [BLOCK_N] int32: label entries outside [0, C) that are not ``ignore_index``, over all raters."""
    if LABELS:
        if NUM_RATERS == 1:
            lab = tl.load(t_ptr + b64 * N + n, mask=nmask, other=0).to(tl.int64)
            in_range = (lab >= 0) & (lab < C)
            # (a runtime flag broadcast as a tensor: scalar-bool & tensor-bool masks break the interpreter)
            ignored = (lab == ignore_index) & ((tl.zeros_like(lab) + has_ignore) != 0)
            keep = nmask & in_range & (~ignored)
            nbad = (nmask & (~in_range) & (~ignored)).to(tl.int32)
        else:
            r = tl.arange(0, R_PAD)
            present = (r < NUM_RATERS)[:, None] & nmask[None, :]
            offs = (b64 * NUM_RATERS + r[:, None].to(tl.int64)) * N + n[None, :]
            lab = tl.load(t_ptr + offs, mask=present, other=0).to(tl.int64)
            in_range = (lab >= 0) & (lab < C)
            ignored = (lab == ignore_index) & ((tl.zeros_like(lab) + has_ignore) != 0)
            fine = (in_range & (~ignored)) | (~present)  # padding raters never veto a voxel
            keep = nmask & (tl.min(fine.to(tl.int32), axis=0) > 0)
            nbad = tl.sum((present & (~in_range) & (~ignored)).to(tl.int32), axis=0)
    else:
        lab = n
        keep = nmask
        nbad = (nmask & (n != n)).to(tl.int32)
    return lab, keep, nbad


@triton.jit
def rater(y, r: tl.constexpr, R_PAD: tl.constexpr):
    """Rater ``r``'s plane ``[K, BLOCK_N]`` of a several-rater target tile ``[K, R_PAD, BLOCK_N]`` (exact)."""
    return tl.sum(tl.where((tl.arange(0, R_PAD) == r)[None, :, None], y, 0.0), axis=1)


@triton.jit
def marginal_targets(
    t_ptr,
    lab,
    b64,
    c,
    cmask,
    n,
    nmask,
    C,
    N,
    LABELS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """Targets of the marginal entries (rows k = c): ``(y, ybar)``.

    ``y``: ``[C_BLOCK, BLOCK_N]`` (one rater: ``[lab == c]``; dense: the target) or ``[C_BLOCK, R_PAD, BLOCK_N]``
    (several raters); ``ybar`` ``[C_BLOCK, BLOCK_N]``: the rater mean (``y`` itself with one rater)."""
    if LABELS:
        if NUM_RATERS == 1:
            y = (lab[None, :] == c[:, None].to(tl.int64)).to(tl.float32)
            ybar = y
        else:
            present = (tl.arange(0, R_PAD) < NUM_RATERS)[None, :, None]
            y = ((lab[None, :, :] == c[:, None, None].to(tl.int64)) & present).to(tl.float32)
            ybar = tl.sum(y, axis=1) / NUM_RATERS
    else:
        offs = (b64 * C + c[:, None].to(tl.int64)) * N + n[None, :]
        y = tl.load(t_ptr + offs, mask=cmask[:, None] & nmask[None, :], other=0).to(tl.float32)
        ybar = y
    return y, ybar


@triton.jit
def top_label(
    x_img,
    n,
    nmask,
    mx,
    den,
    C,
    N,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """Per voxel [BLOCK_N]: ``(q, a, nf)``: the confidence ``max_c p`` over the finite p, the predicted class
    (the lowest index among equal float32 maxima, in [0, C)) and the number of non-finite p of the voxel.

    Classes are scanned chunk by chunk; a later chunk replaces the running maximum only when strictly larger,
    so ties go to the lowest index as with ``torch.argmax``. ``mx, den``: the softmax normaliser over all
    classes (:func:`normaliser`) unless SINGLE_CHUNK."""
    q = tl.full([BLOCK_N], float("-inf"), tl.float32)
    a = tl.zeros([BLOCK_N], tl.int32)
    nf = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, C_BLOCK):
        c = c0 + tl.arange(0, C_BLOCK)
        cmask = c < C
        p = probs(load_x(x_img, c, n, cmask, nmask, N), cmask, mx, den, ACTIVATION, SINGLE_CHUNK)
        finite = is_finite(p)
        nf += tl.sum((cmask[:, None] & (~finite)).to(tl.int32), axis=0)
        pf = tl.where(cmask[:, None] & finite, p, float("-inf"))
        qc = tl.max(pf, axis=0)
        ac = tl.min(tl.where(pf == qc[None, :], c[:, None], 2**30), axis=0)
        take = qc > q
        a = tl.where(take, ac, a)
        q = tl.where(take, qc, q)
    return q, a, nf


@triton.jit
def top_targets(
    t_ptr,
    lab,
    b64,
    a,
    n,
    nmask,
    C,
    N,
    LABELS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """Targets of the top-label row: ``(y, ybar)`` with ``y_r = [lab_r == a]`` (labels) or ``target[b, a, i]``
    (dense); shapes ``[1, BLOCK_N]`` or ``[1, R_PAD, BLOCK_N]`` (several raters) and ``[1, BLOCK_N]``."""
    if LABELS:
        if NUM_RATERS == 1:
            y = (lab == a.to(tl.int64)).to(tl.float32)[None, :]
            ybar = y
        else:
            present = (tl.arange(0, R_PAD) < NUM_RATERS)[:, None]
            y = ((lab == a[None, :].to(tl.int64)) & present).to(tl.float32)[None, :, :]
            ybar = tl.sum(y, axis=1) / NUM_RATERS
    else:
        offs = (b64 * C + a.to(tl.int64)) * N + n
        y = tl.load(t_ptr + offs, mask=nmask, other=0).to(tl.float32)[None, :]
        ybar = y
    return y, ybar


@triton.jit
def entries(
    x_img,
    t_ptr,
    b64,
    cc,
    n,
    nmask,
    C,
    N,
    ignore_index,
    has_ignore,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    MODE: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """The forward's entries of one tile: ``(q, y, ybar, valid, nbad, nnf)``.

    Marginal (MODE 0): rows ``k = c`` of class chunk ``cc``, ``[C_BLOCK, BLOCK_N]``; top-label (MODE 1): one
    row ``[1, BLOCK_N]`` over all classes. ``valid``: the entry enters the statistics (row and voxel in range,
    voxel used, p finite; top-label: every p of the voxel finite); ``q`` is 0 where it does not. ``nbad``
    [BLOCK_N]: out-of-range labels; ``nnf`` [BLOCK_N]: non-finite p of used voxels (marginal: of this chunk's
    classes; top-label: of all classes)."""
    lab, keep, nbad = voxels(t_ptr, b64, n, nmask, C, N, ignore_index, has_ignore, LABELS, NUM_RATERS, R_PAD)
    mx, den = normaliser(x_img, n, nmask, C, N, C_BLOCK, BLOCK_N, ACTIVATION, SINGLE_CHUNK)
    if MODE == 0:
        c = cc * C_BLOCK + tl.arange(0, C_BLOCK)
        cmask = c < C
        p = probs(load_x(x_img, c, n, cmask, nmask, N), cmask, mx, den, ACTIVATION, SINGLE_CHUNK)
        finite = is_finite(p)
        used = cmask[:, None] & keep[None, :]
        nnf = tl.sum((used & (~finite)).to(tl.int32), axis=0)
        valid = used & finite
        q = tl.where(valid, p, 0.0)
        y, ybar = marginal_targets(t_ptr, lab, b64, c, cmask, n, nmask, C, N, LABELS, NUM_RATERS, R_PAD)
    else:
        qv, a, nf = top_label(x_img, n, nmask, mx, den, C, N, C_BLOCK, BLOCK_N, ACTIVATION, SINGLE_CHUNK)
        nnf = tl.where(keep, nf, 0)
        valid = (keep & (nf == 0))[None, :]
        q = tl.where(valid, qv[None, :], 0.0)
        y, ybar = top_targets(t_ptr, lab, b64, a, n, nmask, C, N, LABELS, NUM_RATERS, R_PAD)
    return q, y, ybar, valid, nbad, nnf
