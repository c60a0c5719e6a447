"""The loud, early message when the compiled extension did not build (pip hides the build's own warning)."""

from __future__ import annotations

import os
import subprocess
import sys

from calibops.backends import extension as _ops


def test_message_rules():
    assert _ops.missing_extension_message(None, "boom", True) is None  # loaded: nothing to say
    assert _ops.missing_extension_message("ModuleNotFoundError: x", None, False) is None  # never built
    msg = _ops.missing_extension_message("ModuleNotFoundError: x", "CompileError: g++ failed", False)
    assert "NOT available" in msg and "g++ failed" in msg and "10x slower" in msg and "-v" in msg
    msg = _ops.missing_extension_message("ImportError: undefined symbol", None, True)
    assert "built but fails to load" in msg and "undefined symbol" in msg


def test_import_warns_when_setup_recorded_a_failed_build(tmp_path):
    marker = os.path.join(os.path.dirname(_ops.__file__), "_build_failed.txt")
    assert not os.path.exists(marker)
    code = "import warnings; warnings.simplefilter('always'); import calibops"
    try:
        with open(marker, "w") as f:
            f.write("CompileError: no compiler")
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=os.path.dirname(os.path.dirname(_ops.__file__)),
        )
    finally:
        os.remove(marker)
    assert r.returncode == 0, r.stderr
    if _ops.extension_loaded():
        assert "NOT available" not in r.stderr  # a loaded extension wins over a stale record
    else:
        assert "NOT available" in r.stderr and "no compiler" in r.stderr
