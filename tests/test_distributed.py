"""DatasetCalibration under torch.distributed: two gloo processes equal one process seeing all the data.

The test spawns two processes on localhost (a free TCP port, a timeout on the whole run); each rank feeds an
uneven shard (different numbers and sizes of images), then calls compute(), histogram(), records(gather=True)
and writes what it got. The parent compares both ranks' results with a single process fed every image, and
with the independent oracle of tests/test_metrics.py.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from calibops.metrics import DatasetCalibration

from .test_metrics import oracle

WORLD = 2
CFG = {"to_onehot_y": True, "softmax": True, "ignore_index": 255, "include_background": False}
C, M = 4, 12
TIMEOUT_S = 90


def _data():
    """Every image of the data set, as (input, target) batches; rank r gets batches r, r+2, ..."""
    g = torch.Generator().manual_seed(1234)
    batches = []
    for B, size in ((2, (9, 8)), (1, (5, 6, 4)), (3, (7, 7)), (1, (16,)), (2, (4, 11))):
        x = 2 * torch.randn(B, C, *size, generator=g)
        y = torch.randint(0, C, (B, *size), generator=g)
        y[torch.rand(y.shape, generator=g) < 0.1] = 255
        batches.append((x, y))
    return batches


def _shard(rank: int):
    return [b for i, b in enumerate(_data()) if i % WORLD == rank]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        m = DatasetCalibration(C, num_bins=M, keep_records=True, **CFG)
        for i, (x, y) in enumerate(_shard(rank)):
            m.update(x, y, image_ids=[f"r{rank}b{i}i{b}" for b in range(x.shape[0])])
        res = m.compute()
        res_again = m.compute()  # a second reduction must not double-count
        hist = m.histogram()
        counts = m.pooled_counts()
        recs = m.records(gather=True)
        local_images = int(m.state_tensors()["num_images"])
        torch.save(
            {
                "macro": torch.stack(list(res.macro)),
                "micro": torch.stack(list(res.micro)),
                "micro_again": torch.stack(list(res_again.micro)),
                "num_images": res.num_images,
                "images_per_class": res.images_per_class,
                "hist": hist,
                "counts": counts,
                "records": recs,
                "local_images": local_images,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_processes_equal_one_process(tmp_path):
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")

    single = DatasetCalibration(C, num_bins=M, **CFG)
    for x, y in _data():
        single.update(x, y)
    s = single.compute()
    expected = oracle(_data(), C, M, **CFG)
    n_images = sum(x.shape[0] for x, _ in _data())

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert sum(r["local_images"] for r in results) == n_images
    assert 0 < results[0]["local_images"] < n_images  # each rank really saw only its shard
    for r in results:
        assert r["num_images"] == n_images
        torch.testing.assert_close(r["macro"], torch.stack(list(s.macro)), atol=1e-6, rtol=0, equal_nan=True)
        torch.testing.assert_close(r["micro"], torch.stack(list(s.micro)), atol=1e-6, rtol=0, equal_nan=True)
        assert torch.equal(r["micro_again"], r["micro"])
        assert torch.equal(r["hist"], single.histogram())
        torch.testing.assert_close(r["counts"], single.pooled_counts(), atol=0, rtol=0)
        assert torch.equal(r["images_per_class"], s.images_per_class)
        np.testing.assert_allclose(r["macro"].double().numpy(), expected["macro"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(r["micro"].double().numpy(), expected["micro"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(r["hist"].numpy(), expected["hist"])
        # gathered records: every image once, with the rank it came from
        assert len(r["records"]) == n_images * (C - 1)
        assert {rec["rank"] for rec in r["records"]} == {0, 1}
        assert all(rec["image"].startswith(f"r{rec['rank']}") for rec in r["records"])


# ----------------------------------------------- issue 11: groups, adaptive bins, L2, classification under DDP
GROUPS = ("g0", "g1", "g2")
PCFG = {"groups": GROUPS, "adaptive_bins": 4, "fine_bins": 64, "keep_records": True}


def _groups_of(batch_index: int, B: int) -> list[str]:
    return [GROUPS[(batch_index + b) % 2] for b in range(B)]  # g2 never appears


def _class_data():
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(n, C, generator=g), torch.randint(0, C, (n,), generator=g)) for n in (5, 17, 3, 11)]


def _protocol_results(m: DatasetCalibration, cm: DatasetCalibration) -> dict:
    res = m.compute()
    groups = m.compute_groups()
    out = {
        "micro_l2": res.micro.l2,
        "macro_l2": res.macro.l2,
        "groups": {
            n: (torch.stack([*r.macro, r.macro.l2, *r.micro, r.micro.l2]), r.num_images) for n, r in groups.items()
        },
        "gap": m.group_gaps()["ece"].gap,
        "adaptive": torch.stack([*m.adaptive_errors()]),
        "boot_estimate": m.bootstrap("ece", num_samples=50)["gap"].estimate,
        "class_micro": torch.stack([*cm.compute().micro, cm.compute().micro.l2]),
        "class_groups": {n: r.micro.ece for n, r in cm.compute_groups().items()},
    }
    return out


def _protocol_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        m = DatasetCalibration(C, num_bins=M, **CFG, **PCFG)
        cm = DatasetCalibration(
            C, num_bins=M, to_onehot_y=True, softmax=True, include_background=True, classification=True, groups=GROUPS
        )
        for i, (x, y) in enumerate(_data()):
            if i % WORLD == rank:
                m.update(x, y, image_ids=[f"b{i}i{b}" for b in range(x.shape[0])], groups=_groups_of(i, x.shape[0]))
        for i, (x, y) in enumerate(_class_data()):
            if i % WORLD == rank:
                cm.update(x, y, groups=_groups_of(i, x.shape[0]))
        calls = []
        real = dist.all_reduce

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        dist.all_reduce = counting
        m.compute()
        dist.all_reduce = real
        out = _protocol_results(m, cm)
        out["all_reduce_calls"] = len(calls)
        torch.save(out, os.path.join(out_dir, f"p{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_processes_equal_one_process_for_groups_adaptive_l2_classification(tmp_path):
    ctx = mp.start_processes(
        _protocol_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    m = DatasetCalibration(C, num_bins=M, **CFG, **PCFG)
    cm = DatasetCalibration(
        C, num_bins=M, to_onehot_y=True, softmax=True, include_background=True, classification=True, groups=GROUPS
    )
    for i, (x, y) in enumerate(_data()):
        m.update(x, y, groups=_groups_of(i, x.shape[0]))
    for i, (x, y) in enumerate(_class_data()):
        cm.update(x, y, groups=_groups_of(i, x.shape[0]))
    want = _protocol_results(m, cm)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"p{r}.pt", weights_only=False)
        assert got["all_reduce_calls"] == 1  # every sum in one collective
        for k in ("micro_l2", "macro_l2", "gap", "adaptive", "boot_estimate", "class_micro"):
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, equal_nan=True)
        for n in GROUPS:
            torch.testing.assert_close(got["groups"][n][0], want["groups"][n][0], atol=1e-6, rtol=0, equal_nan=True)
            assert got["groups"][n][1] == want["groups"][n][1]
            torch.testing.assert_close(
                got["class_groups"][n], want["class_groups"][n], atol=1e-6, rtol=0, equal_nan=True
            )
    assert want["groups"]["g2"][1] == 0 and want["groups"]["g0"][1] > 0
