"""Hugging Face transformers integration: ``attn_implementation="tileattn"``.

>>> import tileattn.integrations.transformers as tt
>>> tt.register()
>>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tileattn")

transformers is optional (``pip install tileattn[hf]``); it is imported only by :func:`register`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tileattn._utils import TensorCache, warn_once
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
        dropout: attention dropout (> 0, i.e. training with dropout, falls back to torch with a warning).
        scaling: softmax scale (default 1/sqrt(D)).
        is_causal: as transformers' sdpa integration: causal (top-left aligned) only when there is no
            mask and L > 1.
        kwargs: packed batches (padding-free training) run on :func:`tileattn.attention_varlen`, each
            sequence causal on its own (and inside ``sliding_window`` when the layer has one): either
            ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (+ ``max_length_q`` / ``max_length_k``) or a single row
            of ``position_ids`` that restart; the 4-d mask transformers built for it is then not read.

    Returns:
        ``(out, None)`` with out (B, L, Hq, D) contiguous; attention weights are not returned.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("tileattn attention does not support softcap; use attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        warn_once("hf-output-attentions", "tileattn attention does not return attention weights "
                  "(output_attentions); use tileattn.attention_weights on q and k instead.")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = _packed_sequences(query, key, kwargs)
    if packed is not None:  # padding-free training: the packed row runs as separate sequences (varlen)
        return _varlen_forward(module, query, key, value, packed, dropout, scaling, bool(is_causal), kwargs), None
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal,
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _as_int(x) -> Optional[int]:
    return None if x is None else int(x.item() if isinstance(x, torch.Tensor) else x)


def _packed_sequences(query: torch.Tensor, key: torch.Tensor, kwargs: dict):
    """``(cu_q, cu_k, max_q, max_k)`` when transformers hands this layer a packed batch, else None: either the
    flash-attention kwargs (``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``, as
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives), or ``position_ids`` of a single row
    made of several runs that step by 1 and each restart at the row's first id (reading them costs one
    device-to-host copy per forward, cached across layers; transformers' flash-attention path reads them
    in every layer). Left / right padded rows never look packed."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        return (cu_q.to(torch.int32), cu_k.to(torch.int32), _as_int(kwargs.get("max_length_q")),
                _as_int(kwargs.get("max_length_k")))
    pos = kwargs.get("position_ids")
    if pos is None or query.shape[0] != 1 or query.shape[2] < 2 or key.shape[2] != query.shape[2] \
            or pos.numel() != query.shape[2]:
        return None
    hit = _POSITION_CACHE.get(pos)  # every layer gets the same position_ids: read them once per forward
    if hit is None:
        flat = pos.reshape(-1)
        starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1) != 1).flatten()  # runs restart where ids jump
        cu = torch.cat([starts.new_tensor([0]), starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
        # packed: every run restarts at the row's first id (padded rows, e.g. [1, 1, 0, 1, 2], do not)
        packed = starts.numel() > 0 and bool((flat[starts] == flat[0]).all())
        hit = (cu, int((cu[1:] - cu[:-1]).max())) if packed else (None, 0)
        _POSITION_CACHE.put(pos, hit)
    cu, longest = hit
    return None if cu is None else (cu, cu, longest, longest)


_POSITION_CACHE = TensorCache(4)


def _varlen_forward(module, query, key, value, packed, dropout, scaling, is_causal, kwargs):
    """(1, H, total, D) inputs of a packed row -> ``tileattn.attention_varlen`` -> (1, total, Hq, Dv)."""
    from tileattn.attention import attention_varlen

    if dropout and float(dropout) > 0.0:
        raise ValueError("tileattn attention: attention dropout with packed sequences is not supported; "
                         "set the model's attention_dropout to 0")
    cu_q, cu_k, max_q, max_k = packed
    sw = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    window = (int(sw) - 1, -1) if (sw is not None and is_causal) else None  # transformers: j > i - sliding_window
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (total, H, D) views
    out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=is_causal, window=window, scale=scaling)
    return out[None]


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
