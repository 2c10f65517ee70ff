"""Test configuration for vold.kernels.

- ``TRITON_INTERPRET=1`` is set here, before anything imports triton, so that the Triton engine runs
  on the CPU under the interpreter (on a GPU machine, export ``TRITON_INTERPRET=0`` to test the
  compiled kernels instead: an explicit value in the environment is kept).
- ``tests/`` is put on ``sys.path`` so that ``reference`` and ``helpers`` import under any pytest
  import mode.
- ``VOLD_DEBUG=1``: ``vold.cli.main`` raises user errors instead of printing them (see below).
- Every test starts from the same torch seed.
- ``one_thread`` (trainer tests opt in with ``pytestmark``) and ``tiny``: the tiny run of
  ``vold.testing.prepare_tiny_run``, shared by the trainer test modules.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# vold.cli.main prints a user error in one line and returns 2; the tests that call it in-process assert on the
# exception and its message instead (VOLD_DEBUG=1 re-raises). tests/test_trainer_usability.py unsets it to test
# what the user sees.
os.environ.setdefault("VOLD_DEBUG", "1")
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine threads make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny student/teacher models and data (``vold.testing.prepare_tiny_run``), one per test module."""
    from vold.testing import prepare_tiny_run

    return prepare_tiny_run(tmp_path_factory.mktemp("tiny"))
