"""Hardening of the dataset metrics (issue 24): checkpoints validated against every invariant, older checkpoints,
histogram memory, exact rater volumes in the records, DDP with a rank that saw no batch."""

from __future__ import annotations

import math

import pytest
import torch

import calibops.functional as F
from calibops import DatasetCalibration


# ------------------------------------------------------------------ volume_crps records: exact rater volumes
def test_volume_crps_record_exact_above_2_pow_24():
    # two raters one voxel apart on 2**24 + 8 voxels: float32 sums stop counting at 2**24 and give both raters the
    # same volume (sigma 0) or a wrong one; the exact volumes are N and N - 1
    N = 2**24 + 8
    x = torch.full((1, 2, N), 0.25)
    x[:, 0] = 0.75
    t = torch.ones(1, 2, N, dtype=torch.uint8)
    t[0, 1, 0] = 0
    m = DatasetCalibration(
        2, num_bins=4, include_background=False, to_onehot_y=True, multi_rater=True, keep_records=True
    )
    m.update(x, t)
    got = m.records()[0]["volume_crps"]
    mu, sd = N - 0.5, 0.5
    v = 0.25 * N
    z = (v - mu) / sd
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    exact = sd * (z * (2 * Phi - 1) + 2 * phi - 1 / math.sqrt(math.pi))
    assert got == pytest.approx(exact, rel=1e-9)
    assert got == pytest.approx(F.volume_crps(x, t, to_onehot_y=True)[0, 0].item(), rel=1e-12)


# ------------------------------------------------------------------ histogram memory
def test_histogram_memory_refused_at_construction_naming_num_bins(monkeypatch):
    monkeypatch.delenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", raising=False)
    for M in (2 * 10**4, 10**5, 10**6):  # 2.98 GiB, 74.5 GiB, 7451 GiB: a raw allocator error / OOM on v0.2
        with pytest.raises(ValueError, match=rf"num_bins={M}: .* would need [0-9.]+ GiB .*num_bins=11585 or fewer"):
            DatasetCalibration(1, num_bins=M)
    with pytest.raises(ValueError, match=r"num_bins=5000: .* 2 group\(s\)"):
        DatasetCalibration(2, num_bins=5000, groups=("a", "b"))  # 3 x 2 x 5000^2 x 8 = 1.12 GiB
    DatasetCalibration(2, num_bins=100, groups=("a", "b"))
    # the bound is documented and overridable: by argument, and by the environment variable
    with pytest.raises(ValueError, match="num_bins=200"):
        DatasetCalibration(1, num_bins=200, histogram_memory_limit=200 * 200 * 8 - 1)
    assert DatasetCalibration(1, num_bins=200, histogram_memory_limit=200 * 200 * 8).histogram().shape == (1, 200, 200)
    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", "1000")
    with pytest.raises(ValueError, match="num_bins=20: .*CALIBOPS_HISTOGRAM_MEMORY_LIMIT"):
        DatasetCalibration(1, num_bins=20)
    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="CALIBOPS_HISTOGRAM_MEMORY_LIMIT must be a whole number"):
        DatasetCalibration(1, num_bins=20)
    monkeypatch.delenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT")
    with pytest.raises(ValueError, match="histogram_memory_limit must be >= 1"):
        DatasetCalibration(1, histogram_memory_limit=0)


def test_cli_histogram_check_is_the_metric_bound(monkeypatch):
    from calibops.cli.evaluate import UsageError, check_histogram_memory

    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", str(50 * 50 * 8))
    check_histogram_memory(50, 1, 0)
    with pytest.raises(UsageError, match="--num-bins 51: .*--num-bins 50 or fewer"):
        check_histogram_memory(51, 1, 0)
    with pytest.raises(ValueError, match="num_bins=51"):
        DatasetCalibration(1, num_bins=51)


def test_histogram_memory_adapter_checks_classes_before_allocating(monkeypatch):
    pytest.importorskip("monai")
    from calibops.integrations.monai import CalibrationErrorMetric

    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", str(3 * 40 * 40 * 8))  # 3 classes fit, 4 do not
    metric = CalibrationErrorMetric(num_bins=40)  # C is learnt at the first batch
    x = torch.softmax(torch.randn(1, 4, 8, 8), 1)
    y = torch.randint(0, 4, (1, 1, 8, 8))
    with pytest.raises(ValueError, match="num_bins=40: .*4 class"):
        metric(y_pred=x, y=torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).float())
    assert metric.dataset is None


# ------------------------------------------------------------------ tampered checkpoints
def _full_metric(**kw):
    opts = dict(to_onehot_y=True, softmax=True, keep_records=True, dice=True, groups=("a", "b"), brier=True)
    opts.update(adaptive_bins=5, fine_bins=50)
    opts.update(kw)
    m = DatasetCalibration(3, num_bins=10, **opts)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, generator=g) * 2
        y = torch.randint(0, 3, (4, 1, 6, 6), generator=g)
        m.update(x, y, groups=["a", "b", "a", "a"] if step else ["b", "b", "a", "b"])
    return m


def _scaled(key, factor):
    def tamper(sd):
        sd[key] = sd[key] * factor

    return tamper


def _zero(key):
    def tamper(sd):
        sd[key] = torch.zeros_like(sd[key])

    return tamper


def _p2_over_p(sd):
    sd["sum_p2"] = sd["sum_p"] + 0.5


def _py_over(sd):
    sd["sum_py"] = torch.maximum(sd["sum_p"], sd["sum_y"]) + 0.5


def _halve_fine(sd):
    sd["fine_count"] = sd["fine_count"] / 2


def _garbage_record(sd):
    sd["records"][4] = "garbage"


def _unknown_key(sd):
    sd["records"][2]["hacked"] = 1.0


def _reordered(sd):
    recs = sd["records"]
    sd["records"] = recs[1:] + recs[:1]


def _unknown_group(sd):
    for r in sd["records"][3:6]:  # the whole block of image 1
        r["group"] = "zzz"


def _moved_group(sd):
    for r in sd["records"][:3]:  # image 0 (group b) claimed by group a: group sizes disagree
        r["group"] = "a"


def _ece_out_of_range(sd):
    sd["records"][0]["ece"] = 7.0


def _records_voxels(sd):
    sd["records"][0]["voxels"] *= 1000
    sd["records"][1]["voxels"] *= 1000
    sd["records"][2]["voxels"] *= 1000


def _records_ece(sd):
    sd["records"][0]["ece"] = 0.999 if sd["records"][0]["ece"] < 0.5 else 0.0


TAMPERS = {
    "count x1000": (_scaled("count", 1000), "'count'"),
    "count / 2": (_scaled("count", 0.5), "'sum_p'"),
    "group_count x1000": (_scaled("group_count", 1000), "'group_count'"),
    "group macro sums x1000": (_scaled("group_macro_sum", 1000), "'group_macro_sum'"),
    "group_macro_l2 x1000": (_scaled("group_macro_l2", 1000), "'group_macro_l2'"),
    "brier_sum x1000": (_scaled("brier_sum", 1000), "'brier_sum'"),
    "sum_p2 > sum_p": (_p2_over_p, "'sum_p2'"),
    "sum_py > min(sum_p, sum_y)": (_py_over, "'sum_py'"),
    "fine_count halved": (_halve_fine, "'fine_count'"),
    "fine_count x2": (_scaled("fine_count", 2), "'fine_count'"),
    "zeroed group histograms": (_zero("group_hist"), "'group_hist'"),
    "zeroed group macro counts": (_zero("group_macro_n"), "'group_macro_n'"),
    "garbage record": (_garbage_record, r"\['records'\]\[4\]"),
    "unknown record key": (_unknown_key, r"\['records'\]\[2\].*hacked"),
    "reordered records": (_reordered, r"\['records'\]\[0\].*reordered"),
    "unknown-group records": (_unknown_group, r"\['records'\]\[3\].*'zzz'"),
    "records moved to another group": (_moved_group, r"'records'.*group_images"),
    "record ECE out of range": (_ece_out_of_range, r"\['records'\]\[0\]\['ece'\]"),
    "record voxels x1000": (_records_voxels, r"'records'.*voxels"),
    "record ECE changed": (_records_ece, r"'records'.*macro_sum"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_checkpoint_is_one_error_naming_the_field(name):
    import copy

    tamper, field = TAMPERS[name]
    src = _full_metric()
    sd = copy.deepcopy(src.state_dict())
    DatasetCalibration(3, num_bins=10, **_opts()).load_state_dict(copy.deepcopy(sd))  # untampered: loads
    tamper(sd)
    dst = DatasetCalibration(3, num_bins=10, **_opts())
    before = {k: v.clone() for k, v in dst.state_tensors().items()}
    with pytest.raises(ValueError, match=field):
        dst.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in dst.state_tensors().items())  # nothing replaced


def _opts():
    return dict(
        to_onehot_y=True,
        softmax=True,
        keep_records=True,
        dice=True,
        groups=("a", "b"),
        brier=True,
        adaptive_bins=5,
        fine_bins=50,
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(mode="top_label", dice=False),
        dict(include_background=False, right=True),
        dict(softmax=False, sigmoid=True),
    ],
)
def test_genuine_checkpoints_load(kw):
    src = _full_metric(**kw)
    dst = DatasetCalibration(3, num_bins=10, **{**_opts(), **kw})
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.histogram(), src.histogram())
    assert dst.records() == src.records()


def test_genuine_checkpoints_load_classification_and_raters():
    m = DatasetCalibration(
        3, num_bins=10, classification=True, to_onehot_y=True, softmax=True, groups=("a", "b"), brier=True
    )
    m.update(torch.randn(50, 3), torch.randint(0, 3, (50,)), groups=["a"] * 20 + ["b"] * 30)
    DatasetCalibration(
        3, num_bins=10, classification=True, to_onehot_y=True, softmax=True, groups=("a", "b"), brier=True
    ).load_state_dict(m.state_dict())
    r = DatasetCalibration(3, num_bins=10, to_onehot_y=True, softmax=True, multi_rater=True, keep_records=True)
    r.update(torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 3, 5, 5)))
    DatasetCalibration(
        3, num_bins=10, to_onehot_y=True, softmax=True, multi_rater=True, keep_records=True
    ).load_state_dict(r.state_dict())


# ------------------------------------------------------------------ checkpoints of earlier versions
DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_v0_1_checkpoint_refused_naming_the_version():
    # written by calibops 0.1 itself (commit a231151, the last of the 0.1.0 release, backend="reference"):
    # DatasetCalibration(3, num_bins=8, include_background=False, to_onehot_y=True, softmax=True, keep_records=True),
    # two updates of two 5x5 images
    sd = torch.load(DATA / "checkpoint_v0_1.pt", weights_only=True)
    assert set(sd) == {"config", "count", "sum_p", "sum_y", "macro_sum", "macro_n", "hist", "num_images", "records"}
    assert "mode" not in sd["config"] and "l2" not in sd["records"][0]
    m = DatasetCalibration(3, num_bins=8, include_background=False, to_onehot_y=True, softmax=True, keep_records=True)
    with pytest.raises(ValueError, match=r"written by calibops 0\.1 .*images_with_class.*0\.2 and later load"):
        m.load_state_dict(sd)
    assert int(m.state_tensors()["num_images"]) == 0


def test_v0_2_checkpoint_loads():
    # written by calibops 0.2 (groups, Brier, adaptive bins, records): every sum and record restored
    sd = torch.load(DATA / "checkpoint_v0_2.pt", weights_only=True)
    opts = dict(include_background=False, to_onehot_y=True, softmax=True, keep_records=True, groups=("a", "b"))
    m = DatasetCalibration(3, num_bins=8, brier=True, adaptive_bins=4, fine_bins=40, **opts)
    m.load_state_dict(sd)
    assert int(m.state_tensors()["num_images"]) == 4 and len(m.records()) == 8
    for k, v in m.state_tensors().items():
        assert torch.equal(v, sd[k].to(v.dtype)), k
    assert m.compute().macro.ece == pytest.approx([0.2366, 0.2714], abs=1e-4)  # as 0.2 computed it


# ------------------------------------------------------------------ DDP: a rank that saw no batch
def _idle_rank_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=40)
    )
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(7)
        x, y = torch.randn(3, 3, 6, 6, generator=g), torch.randint(0, 3, (3, 1, 6, 6), generator=g)
        out = {}
        m = DatasetCalibration(3, num_bins=6, to_onehot_y=True, softmax=True, groups=("a", "b"), keep_records=True)
        if rank == 0:  # rank 1 sees no batch at all
            m.update(x, y, groups=["a", "b", "a"])
        out["ece"] = m.compute().macro.ece
        out["hist"] = m.histogram()
        out["group_gaps"] = m.group_gaps()["ece"].gap
        out["records"] = len(m.records(gather=True))
        try:
            from calibops.integrations.monai import CalibrationErrorMetric
        except ImportError:
            CalibrationErrorMetric = None
        if CalibrationErrorMetric is not None:
            mm = CalibrationErrorMetric(num_bins=6, to_onehot_y=True, softmax=True)
            if rank == 0:
                mm(y_pred=x, y=y)
            out["monai"] = mm.aggregate()
            out["monai_all"] = mm.aggregate_all()["mce"]
            out["monai_buffer"] = mm.get_buffer()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears the group down while the other's last collective is in flight
    finally:
        dist.destroy_process_group()


def test_ddp_rank_without_batches_does_not_hang(tmp_path):
    import socket
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.fail("torch.distributed with gloo is needed for this test")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_idle_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("a rank that saw no batch hung the others (no result within 120 s)")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(3, 3, 6, 6, generator=g), torch.randint(0, 3, (3, 1, 6, 6), generator=g)
    single = DatasetCalibration(3, num_bins=6, to_onehot_y=True, softmax=True)
    single.update(x, y)
    for r in (r0, r1):
        torch.testing.assert_close(r["ece"], single.compute().macro.ece, equal_nan=True)
        assert torch.equal(r["hist"], single.histogram())
        assert r["records"] == 9
        torch.testing.assert_close(r["group_gaps"], r0["group_gaps"], equal_nan=True)
    if "monai" in r0:
        from calibops.integrations.monai import CalibrationErrorMetric

        ref = CalibrationErrorMetric(num_bins=6, to_onehot_y=True, softmax=True)
        ref(y_pred=x, y=y)
        for r in (r0, r1):
            torch.testing.assert_close(r["monai"], ref.aggregate(), equal_nan=True)
            torch.testing.assert_close(r["monai_all"], ref.aggregate_all()["mce"], equal_nan=True)
            assert r["monai_buffer"].shape == (3, 3)
