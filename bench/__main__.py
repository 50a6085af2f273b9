"""``python -m bench``: verify, measure, plot (see ``python -m bench --help`` and :mod:`bench.cli`)."""
import os
import sys


def _interpreter_without_cuda() -> None:
    """Without CUDA, tileattn's kernels can only run under Triton's interpreter, which must be switched on
    before tileattn (any ``@triton.jit``) is imported. A user's explicit TRITON_INTERPRET is kept."""
    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


if __name__ == "__main__":
    _interpreter_without_cuda()
    from bench.cli import main

    sys.exit(main())
