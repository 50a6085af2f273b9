"""Hugging Face transformers integration: ``attn_implementation="tileattn"``.

>>> import tileattn.integrations.transformers as tt
>>> tt.register()
>>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tileattn")

transformers is optional (``pip install tileattn[hf]``); it is imported only by :func:`register`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tileattn._utils import warn_once
from tileattn.sdpa import scaled_dot_product_attention

__all__ = ["NAME", "register", "tileattn_attention_forward"]

NAME = "tileattn"


def tileattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """Attention function with the signature transformers' ``AttentionInterface`` expects.

    Args:
        module: the calling attention layer (read for ``is_causal`` when the argument is None).
        query: (B, Hq, L, D); key / value: (B, Hkv, S, D) with Hq % Hkv == 0 (GQA without repeat_kv).
        attention_mask: None, or a 4-d (B or 1, 1, L, S) mask as transformers builds it: bool
            (True = attend, what the ``sdpa`` mask function gives) or float (added to the scores).
            Sliding-window and padding patterns arrive folded into this mask.
        dropout: attention dropout, fused in the kernels (transformers passes 0.0 in eval mode).
        scaling: softmax scale (default 1/sqrt(D)).
        is_causal: as transformers' sdpa integration: causal (top-left aligned) only when there is no
            mask and L > 1.

        softcap (keyword): attention-logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma-2's
            ``attn_logit_softcapping``), applied in the kernels before the mask like transformers' eager path.

    Returns:
        ``(out, None)`` with out (B, L, Hq, D) contiguous; attention weights are not returned.
    """
    softcap = kwargs.get("softcap")
    if kwargs.get("output_attentions", False):
        warn_once("hf-output-attentions", "tileattn attention does not return attention weights "
                  "(output_attentions); use tileattn.attention_weights on q and k instead.")
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    if softcap is not None:  # 4-d GQA inputs and mask as transformers builds them: the fused op directly
        from tileattn.sdpa import _sdpa_4d

        out = _sdpa_4d(query, key, value, attention_mask, is_causal, scaling, dropout_p=float(dropout),
                       softcap=float(softcap))
    else:
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal,
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register tileattn with ``transformers.AttentionInterface`` under ``name`` (and, on versions that
    have it, the ``sdpa`` mask builder with ``AttentionMaskInterface`` so padding / sliding-window masks
    are built as 4-d bool masks, or skipped for plain causal). Returns ``name`` for
    ``attn_implementation=``. Raises ImportError when transformers is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tileattn.integrations.transformers needs transformers>=4.48 "
                          "(pip install 'tileattn[hf]')") from e
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - transformers 4.48 / 4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = tileattn_attention_forward
    else:
        AttentionInterface.register(name, tileattn_attention_forward)
    try:  # transformers >= 4.53 builds masks per attention implementation
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older versions build a float 4-d mask for custom implementations
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
