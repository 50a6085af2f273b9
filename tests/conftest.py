"""Test setup: run the Triton kernels under the interpreter when there is no CUDA device.

The interpreter must be switched on before any ``@triton.jit`` function is defined, so this runs
before ``tileattn`` is imported anywhere in the test session.
"""
import contextlib
import faulthandler
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if "fuzz" not in (config.getoption("markexpr", "") or ""):
        skip_fuzz = pytest.mark.skip(reason="large fuzz budget: run with `pytest -m fuzz`")
        for item in items:
            if "fuzz" in item.keywords and item.get_closest_marker("fuzz") is not None:
                item.add_marker(skip_fuzz)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _test_timeout() -> int:
    """Seconds from TILEATTN_TEST_TIMEOUT (0 / unset: no limit). A per-test limit without pytest-timeout,
    which the offline GPU image may lack."""
    raw = os.environ.get("TILEATTN_TEST_TIMEOUT", "").strip()
    if not raw:
        return 0
    try:
        sec = int(raw)
    except ValueError:
        raise pytest.UsageError(f"TILEATTN_TEST_TIMEOUT must be a whole number of seconds, got {raw!r}")
    if sec < 0:
        raise pytest.UsageError(f"TILEATTN_TEST_TIMEOUT must be >= 0, got {sec}")
    return sec


def pytest_configure(config):
    _test_timeout()  # a bad TILEATTN_TEST_TIMEOUT stops the run before any test


@contextlib.contextmanager
def _time_limit(item, phase: str):
    """With TILEATTN_TEST_TIMEOUT=S, a test phase (setup, call, teardown) running longer than S seconds
    fails with a TimeoutError (SIGALRM, raised at the next Python bytecode); one stuck inside native code
    (e.g. a hung GPU kernel) for S + 60 s gets every thread's stack dumped by faulthandler and the process
    exits."""
    sec = _test_timeout()
    if not sec:
        yield
        return

    def _alarm(signum, frame):
        raise TimeoutError(f"{item.nodeid} ({phase}) exceeded TILEATTN_TEST_TIMEOUT={sec} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(sec)
    faulthandler.dump_traceback_later(sec + 60, exit=True)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _time_limit(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _time_limit(item, "call"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _time_limit(item, "teardown"):
        yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    from tileattn.kernels.utils import set_poison

    set_poison(True)
    yield
    set_poison(False)
