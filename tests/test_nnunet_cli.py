"""``calibops nnunet`` and ``calibops.integrations.nnunet`` where nnU-Net is not installed: one clear line naming the
pip extra (runs everywhere: the absence is simulated). The commands themselves are tested end to end in
tests/test_integrations_nnunet.py (CI's nnU-Net job)."""

from __future__ import annotations

import importlib
import sys

import pytest

from calibops.cli import main


def _without_nnunet(monkeypatch):
    for name in [m for m in sys.modules if m == "nnunetv2" or m.startswith("nnunetv2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # `import nnunetv2` now raises ImportError
    monkeypatch.delitem(sys.modules, "calibops.integrations.nnunet", raising=False)


def test_help_lists_nnunet_and_needs_no_nnunet(monkeypatch, capsys):
    _without_nnunet(monkeypatch)
    assert main(["--help"]) == 0
    assert "nnunet" in capsys.readouterr().out
    assert main(["nnunet", "train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--binning" in out and "--ace-deep-supervision" in out and "-device" in out
    assert main(["nnunet", "predict", "--help"]) == 0
    assert "--save_probabilities" in capsys.readouterr().out


def test_missing_nnunet_is_one_line(monkeypatch, capsys):
    _without_nnunet(monkeypatch)
    assert main(["nnunet", "train", "1", "2d", "0", "--binning", "soft", "-device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("calibops nnunet: error:") and "calibops[nnunet]" in err[0]
    with pytest.raises(ImportError, match=r"calibops\[nnunet\]"):
        importlib.import_module("calibops.integrations.nnunet")


def test_usage_errors(capsys):
    assert main(["nnunet"]) == 2
    assert main(["nnunet", "fit"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["nnunet", "train", "1", "2d", "0", "--binning", "medium"]) == 2
    assert "--binning" in capsys.readouterr().err
