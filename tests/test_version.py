"""Version identity: one version, written in calibops/_version.py, read by the package metadata (pyproject's
dynamic version), ``calibops.__version__`` and ``calibops --version``; the changelog has a section for it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import calibops
from calibops.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_reads_the_one_version() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    conf = read_configuration(ROOT / "pyproject.toml", expand=True)
    # what a build writes into the metadata: the attribute of calibops/_version.py, not a second literal
    assert "version" in conf["project"]["dynamic"]
    assert conf["project"]["version"] == calibops.__version__
    raw = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^version\s*=\s*"', raw, flags=re.M), "a second version literal in pyproject.toml"
    assert re.fullmatch(r"\d+\.\d+\.\d+", calibops.__version__)
    assert calibops.__version__.startswith("0.3.")


def test_installed_metadata_matches_when_installed_from_this_checkout() -> None:
    try:
        dist = importlib.metadata.distribution("calibops")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("calibops is not installed (run from a source tree)")
    direct = dist.read_text("direct_url.json") or ""
    if ROOT.as_uri() not in direct and str(ROOT) not in direct:
        pytest.skip(f"the installed calibops metadata belongs to another checkout ({direct.strip() or dist})")
    assert dist.version == calibops.__version__


def test_cli_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"calibops {calibops.__version__}"
    assert main(["-V"]) == 0
    out = subprocess.run(
        [sys.executable, "-m", "calibops", "--version"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == f"calibops {calibops.__version__}"
    assert main(["--help"]) == 0
    assert "--version" in capsys.readouterr().out


def test_changelog_has_every_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    heads = re.findall(r"^## (\d+\.\d+\.\d+)", text, flags=re.M)
    assert heads[0] == calibops.__version__
    assert {"0.1.0", "0.2.0", "0.3.0"} <= set(heads)
    assert "**Breaking" in text
