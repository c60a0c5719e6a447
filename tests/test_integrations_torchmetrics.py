"""The torchmetrics adapter: equal to DatasetCalibration, in a MetricCollection, plot(ax=), and a 2-process sync.

Every state is a sum (dist_reduce_fx="sum"), so two gloo processes fed two shards must give exactly the
statistics of one process fed everything (counts and histogram exactly; float64 sums to 1e-12 relative, the
errors computed from them to float32 rounding).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchmetrics")

from torchmetrics import MetricCollection  # noqa: E402

from calibops import DatasetCalibration  # noqa: E402
from calibops.integrations.torchmetrics import DatasetCalibrationMetric  # noqa: E402

C, M = 4, 12
CFG = {"to_onehot_y": True, "softmax": True, "ignore_index": 255, "include_background": False}


def _data():
    g = torch.Generator().manual_seed(99)
    out = []
    for B, size in ((2, (9, 8)), (1, (5, 6, 4)), (3, (7, 7)), (2, (4, 11))):
        x = 2 * torch.randn(B, C, *size, generator=g)
        y = torch.randint(0, C, (B, *size), generator=g)
        y[torch.rand(y.shape, generator=g) < 0.1] = 255
        out.append((x, y))
    return out


def _reference():
    ref = DatasetCalibration(C, num_bins=M, **CFG)
    for x, y in _data():
        ref.update(x, y)
    return ref


def _check_against(res: dict, ref: DatasetCalibration) -> None:
    r = ref.compute()
    for k, v in zip(("ece", "ace", "mce"), r.macro, strict=True):
        torch.testing.assert_close(res[k], v.nanmean(), rtol=0, atol=1e-6)
    for k, v in zip(("ece", "ace", "mce"), r.micro, strict=True):
        torch.testing.assert_close(res[f"micro_{k}"], v.nanmean(), rtol=0, atol=1e-6)


def test_equals_dataset_calibration_and_resets():
    m = DatasetCalibrationMetric(C, num_bins=M, **CFG)
    for x, y in _data():
        m.update(x, y)
    ref = _reference()
    _check_against(m.compute(), ref)
    assert torch.equal(m.histogram(), ref.histogram())
    per = m.compute_per_class()
    torch.testing.assert_close(per["micro_ace"], ref.compute().micro.ace, rtol=0, atol=0)
    m.reset()
    assert int(m.num_images) == 0 and int(m.hist.sum()) == 0


def test_metric_collection_and_forward():
    coll = MetricCollection({"cal": DatasetCalibrationMetric(C, num_bins=M, **CFG)})
    for x, y in _data():
        coll.update(x, y)
    res = coll.compute()
    assert {"ece", "ace", "mce", "micro_ece", "micro_ace", "micro_mce"} <= set(res)
    _check_against(res, _reference())
    # forward = the batch's own value, and accumulation continues
    m = DatasetCalibrationMetric(C, num_bins=M, **CFG)
    x, y = _data()[0]
    batch_val = m(x, y)
    one = DatasetCalibration(C, num_bins=M, **CFG)
    one.update(x, y)
    _check_against(batch_val, one)


def test_plot_takes_ax(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    m = DatasetCalibrationMetric(C, num_bins=M, class_names=["bg", "a", "b", "c"], **CFG)
    for x, y in _data():
        m.update(x, y)
    fig, ax = m.plot()
    assert ax.figure is fig and ax.get_title() == "all classes"
    mine = Figure()
    ax2 = mine.add_subplot(1, 2, 2)
    fig2, ax_out = m.plot(ax=ax2, class_index=0)
    assert fig2 is mine and ax_out is ax2 and ax2.get_title() == "a"
    data = ax2.collections[0].get_array()
    h = m.histogram()[0].double()
    cols = h.sum(0)
    torch.testing.assert_close(
        torch.as_tensor(data.filled(0)).reshape(M, M)[:, cols > 0], (h / cols.clamp(min=1))[:, cols > 0]
    )
    fig2.savefig(tmp_path / "p.png")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        DatasetCalibrationMetric(0)
    with pytest.raises(ValueError, match="class_names"):
        DatasetCalibrationMetric(3, class_names=["a"])
    m = DatasetCalibrationMetric(3, to_onehot_y=True)
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        m.update(torch.rand(1, 4, 5, 5), torch.zeros(1, 5, 5, dtype=torch.long))


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        m = DatasetCalibrationMetric(C, num_bins=M, **CFG)
        for i, (x, y) in enumerate(_data()):
            if i % 2 == rank:
                m.update(x, y)
        res = m.compute()
        local = int(m.num_images)  # unsynced again after compute
        torch.save({"res": res, "local": local, "hist": m.hist.clone()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_processes_equal_one_process(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("distributed workers did not finish within 120 s")
    ref = _reference()
    outs = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(2)]
    assert sorted(o["local"] for o in outs) == [3, 5]  # each rank saw its shard only
    for o in outs:
        _check_against(o["res"], ref)


def test_lightning_example_in_docs_runs():
    L = pytest.importorskip("lightning")
    import pathlib
    import re
    import warnings

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "LightningModule" in b)
    ns: dict = {}
    exec(compile(block, "docs/integrations.md[Lightning]", "exec"), ns)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {
                "image": torch.randn(1, 12, 12, generator=g),
                "label": torch.randint(0, 3, (1, 12, 12), generator=g),
            }

    model = ns["Segmenter"](torch.nn.Conv2d(1, 3, 3, padding=1), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        (res,) = trainer.validate(model, torch.utils.data.DataLoader(Data(), batch_size=2), verbose=False)
    ref = DatasetCalibration(3, to_onehot_y=True, softmax=True)
    with torch.no_grad():
        for i in range(4):
            item = Data()[i]
            ref.update(model.net(item["image"][None]), item["label"][None])
    assert res["val_ace"] == pytest.approx(float(ref.compute().macro.ace.nanmean()), abs=1e-6)
    assert res["val_micro_mce"] == pytest.approx(float(ref.compute().micro.mce.nanmean()), abs=1e-6)
