"""tileattn: attention kernels in Triton, shipped as PyTorch autograd ops.

Layout of every tensor is ``(B, H, N, D)`` like ``torch.nn.functional.scaled_dot_product_attention``.
"""
from tileattn._version import __version__
from tileattn import reference
from tileattn.attention import ScoreMod, attention, attention_varlen, dropout_mask
from tileattn.kvcache import attention_with_kvcache
from tileattn import masks
from tileattn.block_mask import BlockMask, create_block_mask
from tileattn.sdpa import scaled_dot_product_attention
from tileattn.weights import attention_weights
from tileattn import nn
from tileattn.lightning import (LightningAttention, fla_lightning_decay_rates, lightning_attention, lightning_decay_rates,
                                lightning_decode)

__all__ = ["lightning_attention", "lightning_decode", "lightning_decay_rates", "fla_lightning_decay_rates", "LightningAttention", "scaled_dot_product_attention", "attention_weights", "nn", "__version__", "reference", "attention", "attention_varlen", "ScoreMod", "dropout_mask", "attention_with_kvcache", "masks", "BlockMask", "create_block_mask"]
