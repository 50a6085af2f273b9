"""Seeded differential fuzzer: tileattn against float64 references written here from the README's semantics.

One case is drawn per seed (``case(seed)``) and checked by ``run(case)``: random shapes, strides, GQA ratios,
causal flags, windows, soft-caps, ALiBi slopes, dropout, block masks (random layouts / predicates, also rebuilt through the validated
low-level constructor), SDPA masks (bool / float, broadcast, top-left causal, torch's ``CausalBias``),
lightning decays and states, the decode step. Failures raise AssertionError whose first line is the replay
command. Used by ``tests/test_fuzz.py`` (small budget in CI, ``pytest -m fuzz`` for a large one) and
``scripts/fuzz.py --cases N``.
"""
from __future__ import annotations

import math
import random
from typing import Optional

import torch

from helpers import DEVICE, ON_GPU, assert_close

KINDS = ("attention", "attention", "sdpa", "lightning", "decode")


def replay_line(seed: int) -> str:
    return f"replay: python scripts/fuzz.py --seed {seed} --cases 1   (or pytest tests/test_fuzz.py -k 'seed{seed}]')"


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def _tensor(rng: random.Random, shape, dtype, scale=1.0):
    """A random tensor of ``shape`` with random strides: contiguous, a (B, N, H, D) buffer transposed, or a
    slice of a wider last dim (row stride > D). Unit last stride always (the documented requirement)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    style = rng.choice(("contiguous", "bnhd", "padded"))
    if style == "bnhd" and len(shape) == 4:
        b, h, n, d = shape
        return (torch.randn(b, n, h, d, generator=g) * scale).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    if style == "padded":
        x = torch.randn(*shape[:-1], shape[-1] + rng.randint(1, 5), generator=g)
        return (x * scale).to(device=DEVICE, dtype=dtype)[..., :shape[-1]]
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _dtype(rng):
    return rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))


# --------------------------------------------------------------------------------------------------
# float64 references from the documented semantics
# --------------------------------------------------------------------------------------------------
def softmax_ref(q, k, v, visible, scale, bias=None, softcap=None, alibi=None, keep=None, p_drop=0.0):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) in any dtype; ``visible`` bool broadcastable
    to (B, Hq, Nq, Nk); ``bias`` float added to the scaled scores. GQA: query head h uses kv head
    h // (Hq // Hkv). Rows with no visible key: out 0, lse -inf. Returns (out, lse) in q's dtype. README
    score mods: ALiBi ``s - slope |i + Nk - Nq - j|`` (``alibi`` (Hq,) or (B, Hq)), then the soft-cap
    ``c tanh(s / c)``, before the masks; dropout: probabilities times ``keep`` / (1 - p), LSE before it."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    nq, nk = s.shape[-2:]
    if alibi is not None:
        dist = (torch.arange(nq)[:, None] + nk - nq - torch.arange(nk)[None, :]).abs().to(s.dtype)
        s = s - alibi.to(s.dtype).reshape(-1, q.shape[1], 1, 1) * dist
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])  # exp(-inf) = 0 for masked keys and empty rows
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - p_drop)
    return torch.matmul(p, v), lse


def band_visible(nq, nk, causal, window):
    """README: query i sees key j iff i + Nk - Nq - left <= j <= i + Nk - Nq + right (-1 unbounded),
    causal: j <= i + Nk - Nq (right = 0)."""
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    ok = torch.ones(nq, nk, dtype=torch.bool)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def lightning_ref(q, k, v, rates, scale, h0, g=None):
    """README recurrence: S_t = lambda_t S_{t-1} + k_t^T v_t, o_t = scale q_t S_t with lambda_t = exp(-s_h)
    (per-head rates) or exp(g_t) (per-token log-decays, (B, H, N)). Returns (out, S_last)."""
    B, H, N, D = q.shape
    lam = torch.ones(H, dtype=q.dtype) if rates is None else torch.exp(-rates.to(q.dtype))
    lam = lam[None, :, None].expand(B, H, N) if g is None else torch.exp(g.to(q.dtype))
    S = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype) if h0 is None else h0.to(q.dtype)
    outs = []
    for t in range(N):
        S = lam[:, :, t, None, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


# --------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------
def _compare(tag, ours, ref_fn, inputs, dtype, grads=True):
    """``ref_fn(*tensors) -> tuple of outputs``; compares forward outputs and, with ``grads``, the gradients
    of every input under a random cotangent, against float64 (the low-precision run of the same reference
    sets the tolerance, as in helpers.assert_close)."""
    runs = {}
    for name, dt in (("64", torch.float64), ("lp", dtype)):
        xs = [None if x is None else x.detach().cpu().to(dt).requires_grad_(x.requires_grad) for x in inputs]
        runs[name] = (xs, ref_fn(*xs))
    (x64, o64), (xlp, olp) = runs["64"], runs["lp"]
    floor = 5e-3 if ON_GPU and dtype == torch.float32 else None  # TF32 dot products on GPU
    for i, (a, r, rl) in enumerate(zip(ours, o64, olp)):
        assert_close(f"{tag} output {i}", a.detach().cpu(), r.detach(), rl.detach(), dtype=dtype, floor=floor)
    if not grads:
        return
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in o64]
    cots = [torch.where(torch.isinf(o.detach()), torch.zeros_like(c), c) for c, o in zip(cots, o64)]  # -inf LSE
    live = [i for i, x in enumerate(inputs) if x is not None and x.requires_grad]
    ours_g = torch.autograd.grad(list(ours), [inputs[i] for i in live],
                                 [c.to(device=o.device, dtype=o.dtype) for c, o in zip(cots, ours)], allow_unused=True)
    r64 = torch.autograd.grad(list(o64), [x64[i] for i in live], cots, allow_unused=True)
    rlp = torch.autograd.grad(list(olp), [xlp[i] for i in live], [c.to(o.dtype) for c, o in zip(cots, olp)],
                              allow_unused=True)
    for i, a, r, rl in zip(live, ours_g, r64, rlp):
        r = torch.zeros(inputs[i].shape, dtype=torch.float64) if r is None else r
        rl = torch.zeros_like(r) if rl is None else rl
        assert a is not None, f"{tag}: no gradient for input {i}"
        a = a.detach().cpu()
        if r.norm() == 0:
            assert a.float().abs().max() < 1e-2, f"{tag} grad {i}: expected 0, got max {a.float().abs().max()}"
        else:
            assert_close(f"{tag} grad of input {i}", a, r, rl, dtype=dtype, floor=floor)


# --------------------------------------------------------------------------------------------------
# case generators and runners
# --------------------------------------------------------------------------------------------------
def _window(rng, nk):
    if rng.random() < 0.5:
        return None
    return (rng.choice((-1, rng.randint(0, nk))), rng.choice((-1, rng.randint(0, nk))))


def _block_mask(rng, B, Hq, nq, nk):
    """A random BlockMask and its dense bool (B|1, H|1, nq, nk) form, computed here (not by BlockMask)."""
    import tileattn

    bs = (rng.choice((16, 32)), rng.choice((16, 32)))
    bm_b, bm_h = rng.choice((None, B)), rng.choice((None, Hq))
    shape = (bm_b or 1, bm_h or 1)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    nqb, nkb = -(-nq // bs[0]), -(-nk // bs[1])
    if rng.random() < 0.5:
        layout = torch.rand(*shape, nqb, nkb, generator=g) < rng.choice((0.3, 0.7, 1.0))
        dense = layout.repeat_interleave(bs[0], 2).repeat_interleave(bs[1], 3)[:, :, :nq, :nk]
        bm = tileattn.BlockMask.from_layout(layout.to(DEVICE), block_size=bs, q_len=nq, kv_len=nk)
    else:
        dense = torch.rand(*shape, nq, nk, generator=g) < rng.choice((0.2, 0.6, 0.95))
        if rng.random() < 0.5:
            dense &= band_visible(nq, nk, True, None)
        d = dense.to(DEVICE)
        bm = tileattn.create_block_mask(lambda b, h, qi, ki: d[b, h, qi, ki], bm_b, bm_h, nq, nk, block_size=bs,
                                        device=DEVICE)
    if rng.random() < 0.5:  # the same lists through the validated low-level constructor
        bm = tileattn.BlockMask(q_len=nq, kv_len=nk, bs_q=bs[0], bs_k=bs[1], masks=bm.masks,
                                **{n: getattr(bm, n) for n in bm._LIST_NAMES})
    return bm, dense


def run_attention(rng: random.Random, desc: list):
    import tileattn

    B, Hkv, G = rng.randint(1, 2), rng.randint(1, 2), rng.choice((1, 2, 3))
    Hq, nq, nk = Hkv * G, rng.randint(1, 48), rng.randint(1, 48)
    D, Dv, dtype = rng.randint(1, 40), rng.randint(1, 40), _dtype(rng)
    causal, window = rng.random() < 0.4, _window(rng, nk)
    scale = rng.choice((None, 0.3))
    bm, dense = _block_mask(rng, B, Hq, nq, nk) if rng.random() < 0.4 else (None, None)
    desc.append(f"attention B={B} Hq={Hq} Hkv={Hkv} Nq={nq} Nk={nk} D={D} Dv={Dv} {dtype} causal={causal} "
                f"window={window} scale={scale} block_mask={None if bm is None else bm.block_size}")
    q = _tensor(rng, (B, Hq, nq, D), dtype).requires_grad_()
    k = _tensor(rng, (B, Hkv, nk, D), dtype).requires_grad_()
    v = _tensor(rng, (B, Hkv, nk, Dv), dtype).requires_grad_()
    # score mods and dropout (drawn last: the inputs above stay those of the seed before they existed)
    softcap = rng.choice((None, None, 1.0, 4.0))
    alibi = torch.rand(*rng.choice(((Hq,), (B, Hq))), generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) \
        if rng.random() < 0.3 else None
    p_drop = rng.choice((0.0, 0.0, 0.0, 0.2))
    desc.append(f"  softcap={softcap} alibi={None if alibi is None else tuple(alibi.shape)} dropout_p={p_drop}")
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    state = gen.get_state()
    out, lse = tileattn.attention(q, k, v, causal=causal, window=window, block_mask=bm, scale=scale, return_lse=True,
                                  softcap=softcap, alibi_slopes=None if alibi is None else alibi.to(DEVICE),
                                  dropout_p=p_drop, generator=gen)
    keep = None
    if p_drop:
        gen.set_state(state)
        seed, offset = torch.randint(0, 2 ** 62, (2,), generator=gen).tolist()
        keep = tileattn.dropout_mask(q, k, dropout_p=p_drop, seed=seed, offset=offset).cpu()
    vis = band_visible(nq, nk, causal, window)
    if dense is not None:
        vis = vis & dense
    sc = scale if scale is not None else 1 / math.sqrt(D)
    _compare("attention", (out, lse), lambda q, k, v: softmax_ref(q, k, v, vis, sc, softcap=softcap, alibi=alibi,
                                                                    keep=keep, p_drop=p_drop), (q, k, v), dtype)


def run_sdpa(rng: random.Random, desc: list):
    import tileattn
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    nb = rng.randint(0, 2)
    batch = [rng.randint(1, 3) for _ in range(nb)]
    hk = rng.randint(1, 2)
    gqa = rng.random() < 0.3
    hq = hk * (rng.choice((2, 3)) if gqa else 1)
    L, S, E, Ev, dtype = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 32), rng.randint(1, 32), _dtype(rng)

    def lead(shape):  # some batch dims broadcast (size 1)
        return [b if rng.random() < 0.7 else 1 for b in shape]

    qs, ks, vs = lead(batch) + [hq, L, E], lead(batch) + [hk, S, E], None
    vs = ks[:-1] + [Ev]
    mode = rng.choice(("none", "bool", "float", "causal", "causal_bias"))
    mask, is_causal, vis, bias = None, False, torch.ones(L, S, dtype=torch.bool), None
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if mode in ("bool", "float"):
        mshape = [d if rng.random() < 0.5 else 1 for d in batch + [hq, L, S]][rng.randint(0, nb):]
        if mode == "bool":
            mask = torch.rand(*mshape, generator=g) < 0.7
            vis = mask
        else:
            mask = torch.randn(*mshape, generator=g).masked_fill(torch.rand(*mshape, generator=g) < 0.2, -math.inf)
            bias, vis = mask.to(torch.float64), torch.isfinite(mask)
        mask = mask.to(DEVICE)
    elif mode == "causal":
        is_causal, vis = True, torch.arange(S)[None, :] <= torch.arange(L)[:, None]
    elif mode == "causal_bias":
        upper = rng.random() < 0.5
        mask = (causal_upper_left if upper else causal_lower_right)(L, S)
        vis = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + (0 if upper else S - L)
    desc.append(f"sdpa q={qs} k={ks} v={vs} {dtype} mask={mode} gqa={gqa}")
    q = _tensor(rng, qs, dtype).requires_grad_()
    k = _tensor(rng, ks, dtype).requires_grad_()
    v = _tensor(rng, vs, dtype).requires_grad_()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CausalBias warns for lower-right with L > S
        out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    full = torch.broadcast_shapes(tuple(qs[:-3]), tuple(ks[:-3]))

    def ref(q, k, v):
        q4 = q.expand(*full, hq, L, E).reshape(-1, hq, L, E)
        k4 = k.expand(*full, hk, S, E).reshape(-1, hk, S, E)
        v4 = v.expand(*full, hk, S, Ev).reshape(-1, hk, S, Ev)
        shp = tuple(full) + (hq, L, S)
        vis4 = vis.cpu().expand(shp).reshape(-1, hq, L, S)
        b4 = None if bias is None else bias.cpu().expand(shp).reshape(-1, hq, L, S).masked_fill(~vis4, 0)
        o, _ = softmax_ref(q4, k4, v4, vis4, 1 / math.sqrt(E), b4)
        return (o.reshape(*full, hq, L, Ev),)

    _compare("sdpa", (out,), ref, (q, k, v), dtype)


def run_lightning(rng: random.Random, desc: list, decode: bool = False):
    import tileattn

    B, H, N = rng.randint(1, 2), rng.randint(1, 3), 1 if decode else rng.randint(1, 40)
    D, Dv, dtype = rng.randint(1, 40), rng.randint(1, 40), _dtype(rng)
    rates = rng.choice((None, "zero", "rand", "large", "per-token"))
    decay = None if rates in (None, "per-token") else {"zero": torch.zeros(H), "rand": torch.rand(H) * 0.5,
                                                       "large": torch.rand(H) * 20}[rates]
    g = -torch.rand(B, H, N) * rng.choice((0.1, 1.0, 20.0)) if rates == "per-token" else None
    scale = rng.choice((None, 1.0))
    with_state = decode or rng.random() < 0.5
    grads = not decode or rng.random() < 0.5
    desc.append(f"{'decode' if decode else 'lightning'} B={B} H={H} N={N} D={D} Dv={Dv} {dtype} decay={rates} "
                f"scale={scale} state={with_state} grads={grads}")
    q, k, v = (_tensor(rng, (B, H, N, d), dtype, 0.5).requires_grad_(grads) for d in (D, D, Dv))
    h0 = _tensor(rng, (B, H, D, Dv), torch.float32).contiguous().requires_grad_(grads) if with_state else None
    dec = None if decay is None else decay.to(DEVICE)
    gd = None if g is None else g.to(DEVICE)
    if decode:
        out, st = tileattn.lightning_decode(q, k, v, h0, dec, g=gd, scale=scale)
    else:
        out, st = tileattn.lightning_attention(q, k, v, dec, g=gd, scale=scale, initial_state=h0,
                                               output_final_state=True)
    sc = scale if scale is not None else 1 / math.sqrt(D)
    _compare("lightning", (out, st), lambda q, k, v, h: lightning_ref(q, k, v, decay, sc, h, g), (q, k, v, h0), dtype,
             grads=grads)


def run(seed: int) -> str:
    """Run the case of ``seed``; returns its description. On failure raises AssertionError whose first
    line is the replay command."""
    rng = random.Random(seed)
    kind = KINDS[rng.randrange(len(KINDS))]
    desc: list = []
    torch.manual_seed(seed)
    try:
        if kind == "attention":
            run_attention(rng, desc)
        elif kind == "sdpa":
            run_sdpa(rng, desc)
        else:
            run_lightning(rng, desc, decode=kind == "decode")
    except Exception as e:  # noqa: BLE001 - every failure gets the replay line
        raise AssertionError(f"{replay_line(seed)}\ncase: {desc[0] if desc else kind}\n{type(e).__name__}: {e}") from e
    return desc[0]
