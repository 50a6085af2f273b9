"""``torch.nn`` drop-ins on the fused kernels: :class:`MultiheadAttention` (and ``LightningAttention``,
re-exported from :mod:`tileattn.lightning`)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from tileattn._utils import MAX_HEAD_DIM, SUPPORTED_DTYPES, check_bool, dispatching_subclass, warn_once

__all__ = ["MultiheadAttention", "LightningAttention"]


def __getattr__(name):
    # LightningAttention lives in tileattn.lightning; import it lazily so this module works without it.
    if name == "LightningAttention":
        from tileattn.lightning import LightningAttention

        return LightningAttention
    raise AttributeError(f"module 'tileattn.nn' has no attribute {name!r}")


def _as_float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch MHA convention (bool True = masked out) -> additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` whose attention runs on tileattn's fused kernels.

    Same constructor (``embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None``), parameters
    and ``state_dict`` keys (``in_proj_weight`` or ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``, ``bias_k``,
    ``bias_v``) as torch's — it subclasses it, so a torch checkpoint loads as is and ``isinstance``
    checks pass.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` follows torch: query (L, E_q), (L, N, E_q) or, with
    ``batch_first``, (N, L, E_q); key / value (S, E_k) / (S, E_v) likewise; ``key_padding_mask`` (N, S)
    or (S,), bool (True = ignore that key) or float (added); ``attn_mask`` (L, S) or
    (N * num_heads, L, S), bool (True = not allowed) or float (added); ``is_causal`` is a hint that
    ``attn_mask`` is the causal mask (used, as torch does, only when there is no key_padding_mask and
    ``need_weights=False``). Returns ``(attn_output, attn_weights)``: the output shaped like query with
    E = embed_dim, and with ``need_weights`` the attention probabilities ((N, L, S) averaged over heads,
    or (N, num_heads, L, S); unbatched without N), computed by the Triton weights kernel from q, k and
    the LSE of the fused forward, so the attention itself stays fused.

    Attention dropout (``dropout`` > 0 in training mode) runs fused in the kernels (Philox keyed per
    element, seeded from torch's default generator). Differences from torch: the returned weights carry no
    gradient and are the pre-dropout probabilities; a query row whose keys are all
    masked returns output 0 and weights 0 where torch returns NaN. Falls back to torch's implementation
    with a one-time warning for: dtypes other than float16 /
    bfloat16 / float32, head dims above 256, nested tensors, empty inputs, and float masks that require
    grad.
    """

    def _fallback_reason(self, query, key, value, key_padding_mask, attn_mask) -> Optional[str]:
        for m in (key_padding_mask, attn_mask):
            if dispatching_subclass(m):
                return f"a {type(m).__name__} mask (a tensor subclass torch dispatches itself; not a dense mask)"
        if any(x.is_nested for x in (query, key, value)):
            return "nested tensors are not supported"
        if query.dtype not in SUPPORTED_DTYPES:
            return f"dtype {query.dtype} is not supported (float16, bfloat16, float32 are)"
        if self.head_dim > MAX_HEAD_DIM:
            return f"head dims above {MAX_HEAD_DIM} are not supported"
        if any(x.numel() == 0 for x in (query, key, value)):
            return "empty inputs"
        for m in (key_padding_mask, attn_mask):
            if m is not None and m.is_floating_point() and m.requires_grad and torch.is_grad_enabled():
                return "a float mask that requires grad (the fused op gives masks no gradient)"
        return None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """See the class docstring (same contract as :meth:`torch.nn.MultiheadAttention.forward`)."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and (not isinstance(m, torch.Tensor) or (
                    not dispatching_subclass(m) and m.dtype != torch.bool and not m.is_floating_point())):
                raise TypeError(f"{name} must be a bool or floating point tensor or None")
        for name, flag in (("need_weights", need_weights), ("average_attn_weights", average_attn_weights),
                           ("is_causal", is_causal)):
            check_bool(name, flag)
        reason = self._fallback_reason(query, key, value, key_padding_mask, attn_mask)
        if reason is not None:
            warn_once(f"mha-fallback-{reason}",
                      f"tileattn.nn.MultiheadAttention: falling back to torch because of {reason}.")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)

        # ---- shapes: work in (N, L, E) ----
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 2-d (unbatched) or all 3-d (batched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"unbatched key_padding_mask must be 1-d (S,), got {tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"query embedding dim must be embed_dim={self.embed_dim}, got {E}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must match query's batch and each other's length")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"key_padding_mask must have shape (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that needs attn_mask (torch's contract); pass the causal mask too")
        # torch: with the is_causal hint, no key_padding_mask and need_weights=False, the causal flag replaces
        # attn_mask, whose shape is then not checked beyond its rank (and the unbatched 3-d shape)
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            if attn_mask.dim() not in (2, 3) or (not batched and attn_mask.dim() == 3
                                                 and tuple(attn_mask.shape) != (H, L, S)):
                raise ValueError("attn_mask must be 2-d or 3-d" + ("" if batched else f" ((num_heads, L, S) = "
                                 f"{(H, L, S)} when 3-d for unbatched inputs)") + f", got shape {tuple(attn_mask.shape)}")
            attn_mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise ValueError(f"2-d attn_mask must have shape (L, S) = {(L, S)}, got {tuple(attn_mask.shape)}")
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (N * H, L, S):
                    raise ValueError(
                        f"3-d attn_mask must have shape (N * num_heads, L, S) = {(N * H, L, S)}, got {tuple(attn_mask.shape)}")
                attn_mask = attn_mask.reshape(N, H, L, S)
            else:
                raise ValueError(f"attn_mask must be 2-d or 3-d, got {attn_mask.dim()}-d")

        # ---- projections ----
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
                q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)

        # ---- extra keys: bias_k / bias_v, zero attention; masks get an "attend" column each ----
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E).to(v.dtype)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            extra += 1
        Sx = S + extra

        bias = None
        if not use_causal:
            masks = [m for m in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :])
                     if m is not None]
            if extra:
                masks = [F.pad(m, (0, extra), value=False if m.dtype == torch.bool else 0.0) for m in masks]
            if masks and all(m.dtype == torch.bool for m in masks):
                blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
                bias = ~blocked  # our bool masks are True = attend
            elif masks:
                bias = _as_float_mask(masks[0], query.dtype)
                if len(masks) == 2:
                    bias = bias + _as_float_mask(masks[1], query.dtype)

        # ---- fused attention on (N, H, L, hd) views (no copies) ----
        from tileattn.sdpa import _sdpa_4d

        qh = q.unflatten(-1, (H, hd)).transpose(1, 2)
        kh = k.unflatten(-1, (H, hd)).transpose(1, 2)
        vh = v.unflatten(-1, (H, hd)).transpose(1, 2)
        res = _sdpa_4d(qh, kh, vh, bias, use_causal, None, return_lse=need_weights,
                       dropout_p=self.dropout if self.training else 0.0)
        o, lse = res if need_weights else (res, None)
        out = F.linear(o.transpose(1, 2).reshape(N, L, E), self.out_proj.weight, self.out_proj.bias)

        weights = None
        if need_weights:
            from tileattn.attention import _check_bias
            from tileattn.weights import _weights_from_lse

            qh_, kh_ = (x if x.stride(-1) == 1 else x.contiguous() for x in (qh, kh))
            weights = _weights_from_lse(qh_, kh_, lse, bias=_check_bias(bias, qh_, kh_), scale=1.0 / math.sqrt(hd))
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights[0]
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
