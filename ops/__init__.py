"""tileattn: attention kernels in Triton, shipped as PyTorch autograd ops.

Layout of every tensor is ``(B, H, N, D)`` like ``torch.nn.functional.scaled_dot_product_attention``.
"""
from tileattn._version import __version__
from tileattn import reference
from tileattn.attention import attention

__all__ = ["__version__", "reference", "attention"]
