"""Test-session setup shared by every test module.

- Without a GPU, Triton kernels are tested on CPU tensors through the interpreter: TRITON_INTERPRET=1 must be
  set before triton is first imported, so it is set here (only when no CUDA device exists).
- CALIBOPS_TEST_REQUIRE_EXT=1 (set by .ci/run) turns a missing compiled extension into a test failure instead
  of skipped cpu-backend tests, so CI cannot go green on a silently failed build.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    os.environ.setdefault("CALIBOPS_VALIDATE", "1")


@pytest.fixture(autouse=True, scope="session")
def _require_extension():
    if os.environ.get("CALIBOPS_TEST_REQUIRE_EXT", "0") == "1":
        from calibops.backends import extension as _ops

        assert _ops.extension_loaded(), f"compiled extension required but not loaded: {_ops.EXTENSION_ERROR}"
    yield
