"""Test configuration for vold.kernels.

- ``TRITON_INTERPRET=1`` is set here, before anything imports triton, so that the Triton engine runs
  on the CPU under the interpreter (on a GPU machine, export ``TRITON_INTERPRET=0`` to test the
  compiled kernels instead: an explicit value in the environment is kept).
- ``tests/`` is put on ``sys.path`` so that ``reference`` and ``helpers`` import under any pytest
  import mode.
- Every test starts from the same torch seed.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: realistic shapes or subprocess measurements (run in CI, skip with -m 'not slow')"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
