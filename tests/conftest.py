"""Test setup: run the Triton kernels under the interpreter when there is no CUDA device.

The interpreter must be switched on before any ``@triton.jit`` function is defined, so this runs
before ``tileattn`` is imported anywhere in the test session.
"""
import os

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
