"""Bad-input catalogue: every public entry point x every class of bad input raises ValueError / TypeError
whose message says what was expected (never a crash, a deep torch error or a silent wrong answer)."""
import math

import pytest
import torch

import tileattn
from tileattn import BlockMask, masks as M
from helpers import DEVICE

f32 = dict(dtype=torch.float32, device=DEVICE)


def t(*shape, **kw):
    return torch.randn(*shape, **{**f32, **kw})


Q, K, V = t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 8)
BM = tileattn.create_block_mask(M.causal(), None, None, 8, 8, block_size=16, device=DEVICE)
LSE = tileattn.attention(Q, K, K, return_lse=True)[1]
MHA = tileattn.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
LA = tileattn.nn.LightningAttention(16, 2, device=DEVICE)
X = t(2, 5, 16)
RATES = torch.tensor([0.1, 0.2], device=DEVICE)
S0 = torch.zeros(1, 2, 16, 8, **f32)


def attn(**kw):
    args = dict(q=Q, k=K, v=V)
    args.update(kw)
    return lambda: tileattn.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def sdpa(*args, **kw):
    a = list((Q, K, V)) if not args else list(args)
    return lambda: tileattn.scaled_dot_product_attention(*a, **kw)


def weights(**kw):
    args = dict(q=Q, k=K, lse=LSE)
    args.update(kw)
    return lambda: tileattn.attention_weights(args.pop("q"), args.pop("k"), args.pop("lse"), **args)


def cbm(fn=M.causal(), B=None, H=None, q_len=8, kv_len=8, **kw):
    return lambda: tileattn.create_block_mask(fn, B, H, q_len, kv_len, device=kw.pop("device", DEVICE), **kw)


def lists(**change):
    kw = {n: getattr(BM, n) for n in BlockMask._LIST_NAMES}
    kw.update(change)
    return lambda: BlockMask(q_len=8, kv_len=8, bs_q=16, bs_k=16, masks=kw.pop("masks", BM.masks), **kw)


def light(q=Q, k=K, v=V, decay=RATES, **kw):
    return lambda: tileattn.lightning_attention(q, k, v, decay, **kw)


def decode(q=Q[:, :, :1], k=K[:, :, :1], v=V[:, :, :1], state=S0, decay=RATES, **kw):
    return lambda: tileattn.lightning_decode(q, k, v, state, decay, **kw)


def mha(q=X, k=X, v=X, **kw):
    return lambda: MHA(q, k, v, **kw)


# (function, bad-input class) -> (call, exception type, text naming what was expected)
CU = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
PQ, PV = t(8, 2, 16), t(8, 2, 8)


def varlen(q=PQ, k=PQ, v=PV, cu_q=CU, cu_k=CU, *args, **kw):
    return lambda: tileattn.attention_varlen(q, k, v, cu_q, cu_k, *args, **kw)


KC, KL = t(2, 16, 2, 16), torch.tensor([3], dtype=torch.int32, device=DEVICE)


def kvc(q=Q[:, :, :1], k_cache=KC, v_cache=KC, seqlens=KL, **kw):
    kw.setdefault("block_table", torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE))
    return lambda: tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, **kw)


CATALOGUE = {
    # ---- attention_with_kvcache (tests/test_kvcache.py has more)
    ("attention_with_kvcache", "rank"): (kvc(q=Q[0]), ValueError, "q must have 4 dimensions"),
    ("attention_with_kvcache", "seqlens dtype"): (kvc(seqlens=KL.long()), TypeError, "cache_seqlens must be int32"),
    ("attention_with_kvcache", "capacity"): (kvc(seqlens=KL + 40), ValueError, "capacity"),
    ("attention_with_kvcache", "page size"): (kvc(k_cache=t(2, 12, 2, 16), v_cache=t(2, 12, 2, 16)), ValueError,
                                               "power of two"),
    ("attention_with_kvcache", "window"): (kvc(window=(1, 2, 3)), TypeError, "window must be a (left, right)"),
    ("attention_with_kvcache", "grad"): (kvc(q=Q[:, :, :1].clone().requires_grad_()), ValueError, "forward-only"),
    # ---- attention_varlen (tests/test_varlen.py has the cu_seqlens value checks)
    ("attention_varlen", "rank"): (varlen(q=Q), ValueError, "q must have 3 dimensions"),
    ("attention_varlen", "cu dtype"): (varlen(cu_q=CU.long()), TypeError, "cu_seqlens_q must be int32"),
    ("attention_varlen", "cu start"): (varlen(cu_k=CU + 1), ValueError, "cu_seqlens_k must start at 0"),
    ("attention_varlen", "cu total"): (varlen(cu_q=CU.clone().fill_(0)), ValueError, "must equal the number of packed rows"),
    ("attention_varlen", "max_seqlen"): (varlen(PQ, PQ, PV, CU, CU, 2, 8), ValueError, "more than max_seqlen_q"),
    ("attention_varlen", "window"): (varlen(window=(1,)), TypeError, "window must be a (left, right)"),
    ("attention_varlen", "dtype mix"): (varlen(k=PQ.half()), TypeError, "dtype"),
    # ---- attention
    ("attention", "not a tensor"): (attn(q=Q.tolist()), TypeError, "q must be a torch.Tensor"),
    ("attention", "rank"): (attn(q=Q[0]), ValueError, "q must have 4 dimensions"),
    ("attention", "dtype"): (attn(q=Q.double(), k=K.double(), v=V.double()), TypeError, "float16, bfloat16 or float32"),
    ("attention", "dtype mismatch"): (attn(k=K.half()), TypeError, "they must match"),
    ("attention", "device mismatch"): (attn(k=K.to("meta")), ValueError, "must be on one device"),
    ("attention", "empty"): (attn(q=t(1, 2, 0, 16)), ValueError, "must not be empty"),
    ("attention", "last stride"): (attn(q=t(1, 2, 16, 8).transpose(-1, -2)), ValueError, "unit stride"),
    ("attention", "head ratio"): (attn(q=t(1, 3, 8, 16)), ValueError, "multiple of key/value heads"),
    ("attention", "head dim"): (attn(k=t(1, 2, 8, 12)), ValueError, "head dims must match"),
    ("attention", "head dim > 256"): (attn(q=t(1, 2, 8, 300), k=t(1, 2, 8, 300)), ValueError, "up to 256"),
    ("attention", "batch"): (attn(k=t(2, 2, 8, 16)), ValueError, "batch sizes differ"),
    ("attention", "kv length"): (attn(v=t(1, 2, 9, 8)), ValueError, "same length"),
    ("attention", "window type"): (attn(window=(1.5, 0)), TypeError, "window must hold ints"),
    ("attention", "window shape"): (attn(window=3), TypeError, "(left, right) tuple"),
    ("attention", "window value"): (attn(window=(-2, 0)), ValueError, ">= 0 or -1"),
    ("attention", "window float tensor"): (attn(window=(torch.tensor(1.0), 0)), TypeError, "0-d integer tensors"),
    ("attention", "scale type"): (attn(scale="1"), TypeError, "scale must be a float"),
    ("attention", "scale value"): (attn(scale=math.nan), ValueError, "scale must be finite"),
    ("attention", "causal flag"): (attn(causal=1), TypeError, "causal must be a bool"),
    ("attention", "return_lse flag"): (attn(return_lse=1), TypeError, "return_lse must be a bool"),
    ("attention", "block_mask type"): (attn(block_mask=BM.to_dense()), TypeError, "tileattn.BlockMask"),
    ("attention", "block_mask lengths"): (attn(q=t(1, 2, 9, 16), block_mask=BM), ValueError, "q_len=9"),
    # ---- scaled_dot_product_attention
    ("sdpa", "not a tensor"): (sdpa(Q, K.tolist(), V), TypeError, "key must be a torch.Tensor"),
    ("sdpa", "rank"): (sdpa(Q, K[0], V), ValueError, "same number (>= 2) of dims"),
    ("sdpa", "integer dtype"): (sdpa(Q.long(), K.long(), V.long()), TypeError, "query must be a floating-point"),
    ("sdpa", "dtype mismatch"): (sdpa(Q, K.half(), V), TypeError, "share a dtype"),
    ("sdpa", "head dim"): (sdpa(Q, t(1, 2, 8, 12), V), ValueError, "same last dim"),
    ("sdpa", "heads"): (sdpa(t(1, 3, 8, 16), K, V), ValueError, "enable_gqa=True"),
    ("sdpa", "batch"): (sdpa(t(2, 2, 8, 16), t(3, 2, 8, 16), t(3, 2, 8, 8)), ValueError, "do not broadcast"),
    ("sdpa", "mask type"): (sdpa(attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
    ("sdpa", "mask dtype"): (sdpa(attn_mask=torch.ones(8, 8, dtype=torch.int32, device=DEVICE)), TypeError,
                             "bool or floating point"),
    ("sdpa", "mask shape"): (sdpa(attn_mask=torch.ones(7, 8, dtype=torch.bool, device=DEVICE)), ValueError,
                             "does not broadcast"),
    ("sdpa", "mask and is_causal"): (sdpa(attn_mask=torch.ones(8, 8, dtype=torch.bool, device=DEVICE),
                                          is_causal=True), ValueError, "must not be set when is_causal"),
    ("sdpa", "is_causal flag"): (sdpa(is_causal=1), TypeError, "is_causal must be a bool"),
    ("sdpa", "dropout"): (sdpa(dropout_p=1.5), ValueError, "dropout_p must be a float in [0, 1]"),
    ("sdpa", "scale"): (sdpa(scale=math.inf), ValueError, "scale must be finite"),
    # ---- attention_weights
    ("weights", "not a tensor"): (weights(q=1.0), TypeError, "q must be a torch.Tensor"),
    ("weights", "rank"): (weights(k=K[0]), ValueError, "k must have 4 dimensions"),
    ("weights", "lse shape"): (weights(lse=LSE[0]), ValueError, "lse must have shape (B, Hq, Nq)"),
    ("weights", "lse dtype"): (weights(lse=LSE.long()), TypeError, "lse must be a floating-point tensor"),
    ("weights", "lse NaN"): (weights(lse=LSE * math.nan), ValueError, "lse must hold log-sum-exps"),
    ("weights", "rows type"): (weights(rows=1.5), TypeError, "rows must be an int, a slice"),
    ("weights", "rows range"): (weights(rows=[9]), ValueError, "out of range"),
    ("weights", "heads tensor dtype"): (weights(heads=torch.tensor([0.0])), TypeError, "1-d integer tensor"),
    ("weights", "bias shape"): (weights(bias=torch.ones(3, 8, dtype=torch.bool, device=DEVICE)), ValueError,
                                "does not broadcast"),
    ("weights", "window"): (weights(window=(0,)), TypeError, "(left, right) tuple"),
    ("weights", "block_mask type"): (weights(block_mask="causal"), TypeError, "tileattn.BlockMask"),
    # ---- create_block_mask
    ("create_block_mask", "mask_fn type"): (cbm(fn="causal"), TypeError, "mask_fn must be callable"),
    ("create_block_mask", "B"): (cbm(B=0), ValueError, "B must be >= 1 or None"),
    ("create_block_mask", "H type"): (cbm(H=2.0), TypeError, "H must be a positive int or None"),
    ("create_block_mask", "length"): (cbm(q_len=0), ValueError, "q_len must be >= 1"),
    ("create_block_mask", "block_size"): (cbm(block_size=24), ValueError, "powers of two in [16, 256]"),
    ("create_block_mask", "meta device"): (cbm(device="meta"), ValueError, "not 'meta'"),
    ("create_block_mask", "mask_fn dtype"): (cbm(fn=lambda b, h, q, k: (k <= q).int()), TypeError,
                                             "mask_fn must return a bool tensor"),
    ("create_block_mask", "mask_fn shape"): (cbm(fn=lambda b, h, q, k: torch.ones(3, 5, dtype=torch.bool)),
                                             ValueError, "does not broadcast"),
    ("create_block_mask", "longformer global"): (cbm(fn=M.longformer(1, [20])), ValueError,
                                                 "outside the sequence"),
    # ---- BlockMask (low-level constructor, from_layout)
    ("BlockMask", "list dtype"): (lists(kv_idx_full=BM.kv_idx_full.long()), ValueError, "must be an int32 tensor"),
    ("BlockMask", "count"): (lists(kv_num_full=BM.kv_num_full + 5), ValueError, "kv_num_full must hold counts"),
    ("BlockMask", "index"): (lists(kv_idx_part=BM.kv_idx_part - 1), ValueError, "kv_idx_part must hold block indices"),
    ("BlockMask", "mask id"): (lists(q_mask_id_part=BM.q_mask_id_part + 3), ValueError, "q_mask_id_part must hold mask ids"),
    ("BlockMask", "masks shape"): (lists(masks=BM.masks[:, :8]), ValueError, "BlockMask.masks must be uint8"),
    ("BlockMask", "from_layout dtype"): (lambda: BlockMask.from_layout(torch.ones(1, 1, device=DEVICE)), TypeError,
                                         "layout must be a bool tensor"),
    ("BlockMask", "from_layout lengths"): (lambda: BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool, device=DEVICE),
                                                                         block_size=16, q_len=40), ValueError,
                                           "layout has 2 query blocks"),
    # ---- lightning_attention
    ("lightning", "not a tensor"): (light(v=None), TypeError, "v must be a torch.Tensor"),
    ("lightning", "rank"): (light(q=Q[0]), ValueError, "q must have 4 dimensions"),
    ("lightning", "dtype"): (light(q=Q.double(), k=K.double(), v=V.double()), TypeError, "float16, bfloat16 or float32"),
    ("lightning", "shape"): (light(k=t(1, 2, 9, 16)), ValueError, "k must have q's shape"),
    ("lightning", "decay type"): (light(decay=[0.1, 0.2]), TypeError, "decay must be a torch.Tensor"),
    ("lightning", "decay dtype"): (light(decay=torch.tensor([1, 2], device=DEVICE)), TypeError, "floating-point tensor of rates"),
    ("lightning", "decay shape"): (light(decay=RATES[:1]), ValueError, "decay must have shape (H,)"),
    ("lightning", "decay value"): (light(decay=-RATES), ValueError, "decay must hold finite rates"),
    ("lightning", "state shape"): (light(initial_state=S0[0]), ValueError, "initial_state must have shape"),
    ("lightning", "state dtype"): (light(initial_state=S0.half()), TypeError, "initial_state must be float32"),
    ("lightning", "flag"): (light(output_final_state="yes"), TypeError, "output_final_state must be a bool"),
    ("lightning", "scale"): (light(scale=math.nan), ValueError, "scale must be finite"),
    # ---- lightning_decode
    ("decode", "tokens"): (decode(q=Q, k=K, v=V), ValueError, "takes one token"),
    ("decode", "state shape"): (decode(state=S0[:, :1]), ValueError, "state must have shape"),
    ("decode", "state type"): (decode(state=S0.tolist()), TypeError, "state must be a torch.Tensor"),
    ("decode", "decay value"): (decode(decay=RATES * math.inf), ValueError, "decay must hold finite rates"),
    # ---- nn.MultiheadAttention.forward
    ("MultiheadAttention", "not a tensor"): (mha(q=X.tolist()), TypeError, "query must be a torch.Tensor"),
    ("MultiheadAttention", "rank"): (mha(q=X[None]), ValueError, "all be 2-d (unbatched) or all 3-d"),
    ("MultiheadAttention", "embed dim"): (mha(q=t(2, 5, 8)), ValueError, "embed_dim=16"),
    ("MultiheadAttention", "mask dtype"): (mha(attn_mask=torch.ones(5, 5, dtype=torch.int64, device=DEVICE)),
                                           TypeError, "bool or floating point tensor"),
    ("MultiheadAttention", "mask shape"): (mha(attn_mask=torch.ones(4, 5, dtype=torch.bool, device=DEVICE)),
                                           ValueError, "2-d attn_mask must have shape (L, S)"),
    ("MultiheadAttention", "padding mask shape"): (mha(key_padding_mask=torch.ones(2, 4, dtype=torch.bool, device=DEVICE)),
                                                   ValueError, "key_padding_mask must have shape (N, S)"),
    ("MultiheadAttention", "causal without mask"): (mha(is_causal=True), ValueError, "needs attn_mask"),
    ("MultiheadAttention", "flag"): (mha(need_weights="no"), TypeError, "need_weights must be a bool"),
    # ---- nn.LightningAttention.forward
    ("LightningAttention", "not a tensor"): (lambda: LA(X.tolist()), ValueError, "x must be a (B, N, 16) tensor"),
    ("LightningAttention", "width"): (lambda: LA(t(2, 5, 8)), ValueError, "x must be a (B, N, 16) tensor"),
    ("LightningAttention", "state shape"): (lambda: LA(X, initial_state=S0), ValueError, "initial_state must have shape"),
}


@pytest.mark.parametrize("key", list(CATALOGUE), ids=[f"{f}-{c}" for f, c in CATALOGUE])
def test_bad_input(key):
    call, exc, expected = CATALOGUE[key]
    assert exc in (ValueError, TypeError)
    with pytest.raises(exc) as info:
        call()
    assert expected in str(info.value), f"{key}: message {str(info.value)!r} does not say {expected!r}"


def test_catalogue_covers_every_public_function():
    funcs = {f for f, _ in CATALOGUE}
    assert funcs == {"attention", "attention_varlen", "attention_with_kvcache", "sdpa", "weights", "create_block_mask", "BlockMask", "lightning", "decode",
                     "MultiheadAttention", "LightningAttention"}
