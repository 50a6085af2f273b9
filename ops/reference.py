"""PyTorch reference implementations, written for clarity, not speed.

Tests and benchmarks both import this module. Every function works in any floating dtype (including
float64) and is differentiable with autograd. They materialise the full score matrix: use them only
for small problems.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "visible_mask",
    "attention_ref",
    "attention_varlen_ref",
    "attention_kvcache_ref",
    "linear_attention_quadratic_ref",
    "linear_attention_recurrent_ref",
    "lightning_varlen_ref",
]


def _window_bounds(window: Optional[Tuple[int, int]], causal: bool) -> Tuple[int, int]:
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal:
        right = 0
    return left, right


def visible_mask(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    device=None,
) -> torch.Tensor:
    """Boolean (nq, nk) matrix, True where query i may see key j.

    Coordinates are bottom-right aligned: query i sits at key position ``i + nk - nq``. Query i sees
    key j iff ``i + off - left <= j <= i + off + right`` with ``off = nk - nq``; ``-1`` means unbounded.
    ``causal`` forces ``right = 0`` (equal to SDPA ``is_causal`` when nq == nk).
    """
    left, right = _window_bounds(window, causal)
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    ok = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    hkv = x.shape[1]
    return x if hkv == hq else x.repeat_interleave(hq // hkv, dim=1)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = False,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    score_mod=None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention; returns ``(out, lse)``.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv); Hq % Hkv == 0 (query head h uses
    key/value head ``h // (Hq // Hkv)``, like SDPA ``enable_gqa``). ``mask``: boolean, broadcastable
    to (B, Hq, Nq, Nk), True = attend; combined (AND) with ``causal`` / ``window``. ``bias``: float,
    broadcastable to (B, Hq, Nq, Nk), added to the scaled scores (SDPA's float ``attn_mask``).

    Score mods, in order, on the scaled scores ``s``: ``score_mod(s, b, h, q_idx, kv_idx)`` (a PyTorch
    function on broadcast (B, 1, 1, 1) / (1, Hq, 1, 1) / (1, 1, Nq, 1) / (1, 1, 1, Nk) index tensors),
    ALiBi ``s - slope[b, h] |i + Nk - Nq - j|`` (``alibi_slopes`` (Hq,) or (B, Hq)), soft-cap
    ``softcap * tanh(s / softcap)``; then ``bias``, the masks and the softmax (the LSE is of these
    scores). ``dropout_mask`` (bool, broadcastable to (B, Hq, Nq, Nk), True = kept) with ``dropout_p``:
    out = (P * mask / (1 - dropout_p)) V.

    With ``upcast`` everything is computed in float64 (the ground truth). Without it, the matmuls
    run in the input dtype and the softmax in float32 (what a same-dtype PyTorch program does).
    out: (B, Hq, Nq, Dv) in the compute dtype, lse: (B, Hq, Nq) float (natural log). A query row with
    no visible key gives out = 0 and lse = -inf (never NaN).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    hq, nq, nk, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    if score_mod is not None:
        b, h, i, j = (torch.arange(n, device=q.device).reshape([-1 if a == x else 1 for a in range(4)])
                      for x, n in enumerate((q.shape[0], hq, nq, nk)))
        s = score_mod(s, b, h, i, j)
    if alibi_slopes is not None:
        sl = alibi_slopes.to(device=s.device, dtype=s.dtype)
        sl = sl.reshape(1, hq, 1, 1) if sl.dim() == 1 else sl.reshape(-1, hq, 1, 1)
        dist = (torch.arange(nq, device=q.device)[:, None] + (nk - nq) - torch.arange(nk, device=q.device)[None, :])
        s = s - sl * dist.abs().to(s.dtype)
    if softcap is not None:  # a -inf score (masked by score_mod) stays -inf
        s = torch.where(s == float("-inf"), s, softcap * torch.tanh(s / softcap))
    if bias is not None:
        s = s + bias.to(device=s.device, dtype=s.dtype)
    ok = visible_mask(nq, nk, causal=causal, window=window, device=q.device)
    if mask is not None:
        ok = ok & mask.to(device=q.device, dtype=torch.bool)
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    lse = torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))), torch.full_like(l, -math.inf))
    if dropout_mask is not None:
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        p = p * dropout_mask.to(device=p.device, dtype=p.dtype) * keep_scale
    out = torch.matmul(p.to(v.dtype), v)
    if not upcast:
        out = out.to(dtype)
    return out, lse.squeeze(-1)


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    upcast: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention, one :func:`attention_ref` per sequence; returns ``(out, lse)``.

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, Dv) (FlashAttention's varlen layout);
    sequence b is rows ``cu_seqlens_*[b]:cu_seqlens_*[b + 1]``. out: (total_q, Hq, Dv), lse: (Hq, total_q).
    A sequence with queries but no keys gives out = 0 and lse = -inf."""
    hq, dv = q.shape[1], v.shape[-1]
    dtype = torch.float64 if upcast else q.dtype
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if q1 == q0:
            continue
        if k1 == k0:
            outs.append(torch.zeros(q1 - q0, hq, dv, device=q.device, dtype=dtype))
            lses.append(torch.full((hq, q1 - q0), -math.inf, device=q.device, dtype=torch.float64 if upcast else torch.float32))
            continue
        o, l = attention_ref(*(x[None].transpose(1, 2) for x in (q[q0:q1], k[k0:k1], v[k0:k1])), causal=causal,
                             window=window, scale=scale, upcast=upcast)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    if not outs:
        return q.new_zeros(0, hq, dv, dtype=dtype), q.new_zeros(hq, 0, dtype=torch.float64 if upcast else torch.float32)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_kvcache_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    *,
    block_table: Optional[torch.Tensor] = None,
    causal: bool = True,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over a KV cache, per sequence, without touching the cache: the keys of sequence b are its
    first ``cache_seqlens[b]`` cached rows followed by the new rows ``k[b]`` / ``v[b]`` (if given).
    Contiguous caches: (B, Hkv, Ncache, D); paged caches (with ``block_table`` (B, max_pages)):
    (num_pages, page_size, Hkv, D). q: (B, Hq, Nq, D). Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq))."""
    B, hq, nq, _ = q.shape
    dv = v_cache.shape[-1]
    outs, lses = [], []
    for b in range(B):
        n = int(cache_seqlens[b])
        if block_table is None:
            kb, vb = k_cache[b, :, :n], v_cache[b, :, :n]
        else:
            ps = k_cache.shape[1]
            pages = block_table[b, : (n + ps - 1) // ps].long()
            kb = k_cache[pages].flatten(0, 1)[:n].transpose(0, 1)
            vb = v_cache[pages].flatten(0, 1)[:n].transpose(0, 1)
        if k is not None:
            kb, vb = torch.cat([kb, k[b].to(kb.dtype)], 1), torch.cat([vb, v[b].to(vb.dtype)], 1)
        if kb.shape[1] == 0:
            outs.append(q.new_zeros(hq, nq, dv, dtype=torch.float64 if upcast else q.dtype))
            lses.append(torch.full((hq, nq), -math.inf, device=q.device, dtype=torch.float64 if upcast else torch.float32))
            continue
        o, l = attention_ref(q[b:b + 1], kb[None], vb[None], causal=causal, window=window, scale=scale, upcast=upcast)
        outs.append(o[0])
        lses.append(l[0])
    return torch.stack(outs), torch.stack(lses)


def _log_decays(decay: Optional[torch.Tensor], g: Optional[torch.Tensor], b: int, h: int, n: int,
                device) -> torch.Tensor:
    """float64 (B, H, N) log-decays: ``g`` itself, else ``-s_h`` for every token (0 without decay)."""
    if g is not None:
        return g.to(device=device, dtype=torch.float64).expand(b, h, n)
    rates = torch.zeros(h, device=device, dtype=torch.float64) if decay is None else \
        decay.to(device=device, dtype=torch.float64).reshape(h)
    return (-rates)[None, :, None].expand(b, h, n)


def linear_attention_quadratic_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with decay, quadratic (masked) form (the "naive" reference).

    q, k: (B, H, N, D), v: (B, H, N, Dv); the decay is either ``decay``: (H,) rates s_h >= 0 (``g_t = -s_h``)
    or ``g``: (B, H, N) per-token log-decays <= 0 (fla ``chunk_simple_gla``); neither = no decay.
    initial_state: (B, H, D, Dv) or None. With ``G_t = sum_{r <= t} g_r`` (float64) returns
    ``(out, final_state)``: ``out = scale * ((Q K^T) * M) V + scale * exp(G_t) q_t S_{-1}``,
    ``M[t, s] = exp(G_t - G_s)`` for s <= t else 0, and
    ``final_state = exp(G_{N-1}) S_{-1} + sum_s exp(G_{N-1} - G_s) k_s^T v_s``.
    Computed in float64 when ``upcast`` (default), else in the input dtype with a float32 state (the decay
    factors are computed in float64 and rounded). Differentiable in q, k, v, g and initial_state.
    """
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = torch.float64 if upcast else q.dtype
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    G = torch.cumsum(_log_decays(decay, g, b, h, n, q.device), -1)  # (B, H, N) float64
    diff = G[..., :, None] - G[..., None, :]  # (B, H, N, N)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    m = torch.where(causal, torch.exp(diff.clamp(max=0)), torch.zeros_like(diff)).to(cdt)
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * m, v) * scale
    last = G[..., -1:]  # (B, H, 1)
    kdec = k * torch.exp((last - G).clamp(max=0)).to(cdt)[..., None]
    state = torch.matmul(kdec.transpose(-1, -2), v)
    if initial_state is not None:
        s0 = initial_state.to(cdt if upcast else torch.float32)
        qdec = q * torch.exp(G).to(cdt)[..., None]
        out = out + (torch.matmul(qdec.to(s0.dtype), s0) * scale).to(out.dtype)
        state = state.to(s0.dtype) + torch.exp(last).to(s0.dtype)[..., None] * s0
    return out, state.to(torch.float64 if upcast else torch.float32)


def linear_attention_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same semantics as :func:`linear_attention_quadratic_ref`, computed token by token:
    ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``. Returns ``(out, final_state)``."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = torch.float64 if upcast else torch.float32
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    lam = torch.exp(_log_decays(decay, g, b, h, n, q.device)).to(cdt)  # (B, H, N)
    state = torch.zeros(b, h, d, dv, device=q.device, dtype=cdt)
    if initial_state is not None:
        state = state + initial_state.to(cdt)
    outs = []
    for i in range(n):
        state = lam[:, :, i, None, None] * state + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, i], state) * scale)
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(b, h, 0, dv)
    return out, state


def lightning_varlen_ref(q, k, v, cu_seqlens, decay=None, *, g=None, scale=None, initial_state=None,
                         upcast=True, ref=None):
    """Packed sequences: q, k (1, H, T, D), v (1, H, T, Dv), g (1, H, T), cu_seqlens (nseq + 1,) and
    initial_state (nseq, H, D, Dv): each sequence through ``ref`` (default the recurrent reference) with
    its own state. Returns ``(out (1, H, T, Dv), final_states (nseq, H, D, Dv))``."""
    ref = ref or linear_attention_recurrent_ref
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, states = [], []
    for n, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, st = ref(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], decay, g=None if g is None else g[:, :, a:e],
                    scale=scale, initial_state=h0, upcast=upcast)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, dim=2), torch.cat(states, dim=0)
