"""examples/mni152_evaluate.py: real anatomy (the MNI152 template shipped in nilearn's wheel), evaluated offline.

Runs the example as a user would and checks its report against the expected output kept next to it
(examples/mni152_evaluate_expected.txt): every line with numbers but the timings must match exactly (the run is
seeded). Needs nilearn (``pip install "calibops[examples]"``); skipped without it. Slow: about 20 s of CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nilearn")
pytest.importorskip("nibabel")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[1]


def _report_lines(text: str) -> list[str]:
    keep = []
    for line in text.splitlines():
        if line.startswith("#") or line.startswith("time:") or line.startswith("figures:"):
            continue
        keep.append(re.sub(r" \(\d+\.\d s wall, \d+\.\d s CPU\)$", "", line))  # the build's timing
    return keep


@pytest.mark.slow
def test_mni152_example_matches_its_expected_output(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "mni152_out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mni152_evaluate.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = _report_lines(proc.stdout.replace(str(out), "mni152_out"))
    expected = _report_lines((ROOT / "examples" / "mni152_evaluate_expected.txt").read_text())
    assert got == expected
    for mode, figures in (
        ("marginal", ("dataset_histogram", "reliability_GM", "groups_reliability_CSF")),
        ("top_label", ("dataset_histogram", "reliability_top_label")),
    ):
        for stem in figures:
            for ext in ("pdf", "png"):
                assert (out / f"eval_{mode}" / f"{stem}.{ext}").stat().st_size > 1000
    assert (out / "anatomy.png").stat().st_size > 1000
    assert "mm³" in proc.stdout  # the volume CRPS in the header's unit
