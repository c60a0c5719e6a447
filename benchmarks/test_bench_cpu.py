"""pytest-benchmark entries for the CPU backend (not in the default test paths).

    pytest benchmarks/test_bench_cpu.py --benchmark-enable --benchmark-columns=median,iqr,rounds

Forward, backward and forward+backward of mL1-ACE from logits + labels and from probabilities + one-hot, hard and
soft binning, and the contract v2 rows (top-label from logits + labels, 3 raters; hard, cpu only), at
(2, 4, 64, 64, 64), for calibops ``cpu`` and the ``torch-vectorised`` baseline (benchmarks/_common.py). With the
repository's default ``--benchmark-disable`` each entry runs once, as a smoke test. The full comparison table (all
shapes, the reference, GB/s, memory) is ``benchmarks/bench_cpu.py``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cpu import loss_fn, make_inputs, wanted  # noqa: E402

import calibops  # noqa: E402

SHAPE = (2, 4, 64, 64, 64)
IMPLS = ["cpu", "torch-vectorised"]

_cache: dict = {}


def _inputs(kind):
    if kind not in _cache:
        _cache[kind] = make_inputs(torch, SHAPE, kind)
    return _cache[kind]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("binning", ["hard", "soft"])
@pytest.mark.parametrize("kind", ["logits", "probs", "logits-top", "logits-r3"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_cpu(benchmark, impl, kind, binning, mode):
    if not wanted(kind, SHAPE, binning, impl):
        pytest.skip("contract v2 rows: hard binning, cpu / reference only")
    if impl == "cpu" and calibops.available_backends()["cpu"] is not None:
        pytest.skip(f"cpu backend unavailable: {calibops.available_backends()['cpu']}")
    x, t = _inputs(kind)
    fn = loss_fn(impl, kind, binning, 20)
    benchmark.group = f"{kind} {binning} {mode}"
    benchmark.extra_info["threads"] = torch.get_num_threads()

    if mode == "fwd":

        def run():  # as in training: the input requires grad, the graph is built
            return fn(x.detach().requires_grad_(True), t)

        loss = benchmark(run)
    elif mode == "fwd+bwd":

        def run():
            xx = x.detach().requires_grad_(True)
            loss = fn(xx, t)
            loss.backward()
            return loss

        loss = benchmark(run)
    else:

        def setup():
            xx = x.detach().requires_grad_(True)
            return (fn(xx, t),), {}

        loss = benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=7, iterations=1)
        loss = fn(x, t)
    assert torch.isfinite(loss.detach()).all()
