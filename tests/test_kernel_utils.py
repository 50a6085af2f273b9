"""The small shared Triton kernels, run under the interpreter on CPU (proves kernels run in CI)."""
import pytest
import torch

from tileattn.kernels import interpreter_enabled, row_dot
from helpers import DEVICE, randn, rel_err


def test_interpreter_is_on_without_cuda():
    assert torch.cuda.is_available() or interpreter_enabled()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 17, 80), (1, 2, 257, 256)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_row_dot(shape, dtype):
    a = randn(*shape, dtype=dtype, layout="bnhd")  # non-contiguous
    b = randn(*shape, dtype=dtype)
    out = row_dot(a, b)
    ref = (a.double() * b.double()).sum(-1)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert rel_err(out, ref) < 1e-5
