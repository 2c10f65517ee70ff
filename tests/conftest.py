"""Test configuration for vold.kernels.

- ``VOLD_TEST_DEVICE`` (default ``cpu``): the device the tests' tensors are made on. With
  ``VOLD_TEST_DEVICE=cuda`` every factory call without an explicit ``device=`` (``torch.zeros``,
  ``torch.tensor``, ...) makes its tensor on the GPU (``torch.set_default_device``), so the same tests check
  the engines on the device; random factories (``randn``, ``rand``, ``randint``, ``randperm``) draw on the
  CPU, with the CPU generator the test passes (or the global one), and move the result, so a GPU run sees
  the very inputs of a CPU run. ``helpers.DEVICE`` names the device and ``helpers.IMPLS`` adds the
  ``torch_compile`` engine on CUDA (``VOLD_TEST_IMPLS=triton,torch`` picks engines explicitly).
  ``python -m benchmarks.gpu_check`` runs the kernel tests (test_kernels.py, test_numerics.py) this way; the
  trainer tests build CPU models and are not meant for the switch.
- ``TRITON_INTERPRET=1`` is set here on the CPU, before anything imports triton, so that the Triton engine
  runs under the interpreter (an explicit value in the environment is kept; on CUDA it is not set, so the
  compiled kernels are tested).
- ``tests/`` is put on ``sys.path`` so that ``helpers`` imports under any pytest import mode (the float64
  oracle is ``vold.kernels.reference``, importable as it is).
- ``VOLD_DEBUG=1``: ``vold.cli.main`` raises user errors instead of printing them (see below).
- Every test starts from the same torch seed.
- Hypothesis (tests/test_properties.py, tests/test_numerics.py) draws the same examples on every run: the
  ``vold`` profile loaded here is derandomized (each test's examples are seeded from its own source) and keeps
  no example database, so CI never fails on a draw it has not seen before nor replays one another run left
  behind. A hunt for new failures draws at random: ``--hypothesis-profile=vold-hunt`` (with
  ``VOLD_HYPOTHESIS_EXAMPLES`` / ``VOLD_FUZZ_EXAMPLES`` for more examples, ``--hypothesis-seed=N`` to repeat one).
- ``one_thread`` (trainer tests opt in with ``pytestmark``) and ``tiny``: the tiny run of
  ``vold.testing.prepare_tiny_run``, shared by the trainer test modules.
"""

import os
import sys

TEST_DEVICE = os.environ.get("VOLD_TEST_DEVICE", "cpu").strip() or "cpu"
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# vold.cli.main prints a user error in one line and returns 2; the tests that call it in-process assert on the
# exception and its message instead (VOLD_DEBUG=1 re-raises). tests/test_trainer_usability.py unsets it to test
# what the user sees.
os.environ.setdefault("VOLD_DEBUG", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch.utils._device import DeviceContext  # noqa: E402

# factories that draw random numbers: made on the CPU (with the test's CPU generator), then moved
_RANDOM_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm}


class _TestDevice(DeviceContext):
    """``torch.set_default_device(device)``, except that random factories draw on the CPU and move the result.

    A subclass of torch's own ``DeviceContext`` (what ``set_default_device`` installs), so torch.compile
    treats it exactly like the default-device mode (dynamo skips ``DeviceContext`` subclasses)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FACTORIES and kwargs.get("device") is None:
            return func(*args, **{**kwargs, "device": "cpu"}).to(self.device)
        return super().__torch_function__(func, types, args, kwargs)


def _enter_test_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise pytest.UsageError(f"VOLD_TEST_DEVICE={name!r} is not a torch device: {error}") from error
    if device.type == "cpu":
        return  # the default: nothing to change
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"VOLD_TEST_DEVICE={name!r} but torch.cuda.is_available() is False "
                                f"(torch {torch.__version__})")
    _TestDevice(device).__enter__()  # for the whole session, like torch.set_default_device


_enter_test_device(TEST_DEVICE)

# Loaded before any test module builds its settings (which inherit from the loaded profile); the hypothesis
# plugin's --hypothesis-profile, read after this file is imported, picks another. Hypothesis's own "ci" profile
# does the same, but only where it detects a CI environment variable, and only in recent versions.
_HYPOTHESIS = dict(database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("vold", derandomize=True, **_HYPOTHESIS)
settings.register_profile("vold-hunt", derandomize=False, **_HYPOTHESIS)
settings.load_profile("vold")


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
