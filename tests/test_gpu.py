"""GPU-only checks worth a short lease (all ``gpu``-marked: skipped without CUDA, collected everywhere).

Every kernel family at realistic sizes (N up to 8k; D 64 / 128 / 256; bf16, fp16, fp32) against the float64
references with the tests' tolerance rule (``helpers.assert_close``): causal, sliding window, block-sparse,
bias masks, split-KV decoding, lightning attention with states and decoding, attention weights; plus bitwise
determinism of the backward passes and no NaN on fully masked rows. The float64 reference is O(N^2) in
memory, so the big cases use B=1 and few heads. fp32 inputs run TF32 dots on GPU (floor ``TF32_FLOOR``).
Run by ``bash scripts/gpu_session.sh OUT tests``.
"""
import pytest
import torch

import tileattn
from tileattn import masks, reference
from helpers import DEVICE, TF32_FLOOR, assert_close, randn, run_case, spy_ws
from test_lightning import check_against_reference
from test_kvcache import run_case as kvcache_case
from test_varlen import check_against_reference as varlen_check, cu
from test_weights import probs_ref

pytestmark = pytest.mark.gpu

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _floor(dtype):
    return TF32_FLOOR if dtype == FP32 else None


# ------------------------------------------------------------------------------------------------ varlen / KV cache
@pytest.mark.parametrize("dtype,causal", [(BF16, True), (FP16, False)], ids=["bf16-causal", "fp16"])
def test_varlen_packed_documents(dtype, causal):
    """Packed documents of mixed lengths (incl. empty and 1-token ones) at realistic sizes, with GQA."""
    lens = [1500, 0, 1, 777, 2048, 129, 3000]
    tot = sum(lens)
    q = torch.randn(tot, 8, 128, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(tot, 2, 128, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(tot, 2, 128, device=DEVICE).to(dtype).requires_grad_()
    varlen_check(q, k, v, cu(lens), cu(lens), causal=causal, dtype=dtype, lse_grad=False)


@pytest.mark.parametrize("page,D,dtype", [(64, 128, BF16), (16, 64, FP16), (256, 256, BF16), (0, 128, FP16)],
                         ids=["paged64-d128", "paged16-d64", "paged256-d256", "contiguous-d128"])
def test_kvcache_decoding(page, D, dtype):
    """Decoding over long caches (GQA 32/8, ragged lengths, one appended token) through the autotuned decode
    configs and automatic split-KV."""
    kvcache_case(B=4, hq=32, hkv=8, D=D, Dv=D, nq=1, n_new=1, lens=(0, 4095, 8191, 1234), page=page, cap=8192,
                 dtype=dtype)


# ------------------------------------------------------------------------------------------------ softmax
@pytest.mark.parametrize(
    "Hq,Hkv,Nq,Nk,D,dtype,causal,window",
    [
        pytest.param(2, 2, 8192, 8192, 64, BF16, True, None, id="8k-d64-bf16-causal"),
        pytest.param(4, 2, 8192, 8192, 128, FP16, False, None, id="8k-d128-fp16-gqa"),
        pytest.param(2, 2, 4096, 4096, 256, BF16, True, None, id="4k-d256-bf16-causal"),
        pytest.param(2, 2, 4096, 4096, 256, FP16, False, (512, 512), id="4k-d256-fp16-window"),
        pytest.param(2, 1, 4096, 4096, 128, FP32, True, (1024, 0), id="4k-d128-fp32-causal-window"),
        pytest.param(2, 2, 2048, 2048, 64, FP32, False, None, id="2k-d64-fp32"),
        pytest.param(4, 4, 3001, 5003, 128, BF16, True, None, id="ragged-nq<nk-bf16-causal"),
    ],
)
def test_softmax_attention(Hq, Hkv, Nq, Nk, D, dtype, causal, window):
    run_case(1, Hq, Hkv, Nq, Nk, D, D, dtype, causal=causal, window=window, floor=_floor(dtype))


def _layout_mask(n, block, density, heads=2, seed=0):
    """A random per-head (H, nb, nb) block layout of about ``density`` plus the diagonal."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // block)
    layout = torch.rand(heads, nb, nb, generator=g) < density
    layout |= torch.eye(nb, dtype=torch.bool)  # every row block sees at least its diagonal block
    return tileattn.BlockMask.from_layout(layout.to(DEVICE), block_size=block, q_len=n, kv_len=n)


@pytest.mark.parametrize(
    "name,D,dtype",
    [("document", 128, BF16), ("bigbird", 64, FP16), ("layout-0.2", 128, FP16), ("layout-0.5", 256, BF16),
     ("longformer", 128, FP32)],
)
def test_block_sparse(name, D, dtype):
    n = 8192 if D <= 128 else 4096
    if name.startswith("layout"):
        bm = _layout_mask(n, 128, float(name.split("-")[1]))
    else:
        fn = {"document": lambda: masks.document(torch.arange(n, device=DEVICE) // 1500, causal=True),
              "bigbird": lambda: masks.bigbird(3, 1, 2, 128, seed=0, seq_len=n),
              "longformer": lambda: masks.longformer(512, [0, 1, n // 2])}[name]()
        bm = tileattn.create_block_mask(fn, None, None, n, n, block_size=128, device=DEVICE)
    run_case(1, 2, 2, n, n, D, D, dtype, block_mask=bm, floor=_floor(dtype))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_bias_mask(kind, dtype):
    """The mask-tensor variant (what the SDPA drop-in runs for arbitrary masks) at N=4k, GQA, causal."""
    n, g = 4096, torch.Generator(device=DEVICE).manual_seed(0)
    if kind == "bool":
        bias = torch.rand(1, 4, n, n, device=DEVICE, generator=g) > 0.3
    else:
        bias = torch.randn(1, 1, n, n, device=DEVICE, generator=g)
        bias = bias.masked_fill(torch.rand(n, n, device=DEVICE, generator=g) > 0.8, float("-inf"))
    run_case(1, 4, 2, n, n, 128, 128, dtype, causal=True, bias=bias)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("Nq", [1, 16])
def test_split_kv_decoding(Nq, dtype):
    """Short queries over 8k keys: the public op (split-KV picked automatically on CUDA), forward and
    backward, and the forward with explicit split counts."""
    from tileattn.kernels.attention import attention_forward

    run_case(2, 16, 2, Nq, 8192, 128, 128, dtype, causal=True, floor=_floor(dtype))
    q = randn(2, 16, Nq, 128, dtype=dtype)
    k, v = randn(2, 2, 8192, 128, dtype=dtype), randn(2, 2, 8192, 128, dtype=dtype)
    o64, l64 = reference.attention_ref(q, k, v, causal=True, upcast=True)
    olp, llp = reference.attention_ref(q, k, v, causal=True)
    for splits in (3, 16, 64):
        out, lse = attention_forward(q, k, v, scale=128 ** -0.5, right=0, num_splits=splits)
        assert_close(f"out[{splits} splits]", out, o64, olp, dtype=dtype, floor=_floor(dtype))
        assert_close(f"lse[{splits} splits]", lse, l64, llp, dtype=dtype, floor=_floor(dtype))


# ------------------------------------------------------------------------------------------------ lightning
@pytest.mark.parametrize(
    "N,D,Dv,dtype",
    [(8192, 128, 128, BF16), (8192, 64, 64, FP16), (4096, 256, 256, BF16), (4096, 128, 64, FP32),
     (3001, 64, 256, FP16)],
    ids=["8k-d128-bf16", "8k-d64-fp16", "4k-d256-bf16", "4k-d128-dv64-fp32", "ragged-d64-dv256-fp16"],
)
def test_lightning_with_states(N, D, Dv, dtype):
    """Output, final state and gradients (q, k, v, initial state) against the float64 quadratic form."""
    H = 2
    q, k, v = (randn(1, H, N, d, dtype=dtype, requires_grad=True) for d in (D, D, Dv))
    h0 = (0.5 * torch.randn(1, H, D, Dv, device=DEVICE)).requires_grad_()
    check_against_reference(q, k, v, h0, tileattn.lightning_decay_rates(H, device=DEVICE))


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
def test_lightning_state_chaining_and_decode(dtype):
    """A prompt in two calls chained by the state, then token-by-token decoding, equals one call."""
    H, N, D, steps = 4, 4096, 128, 8
    q, k, v = (randn(1, H, N + steps, D, dtype=dtype) for _ in range(3))
    decay = tileattn.lightning_decay_rates(H, device=DEVICE)
    full, _ = tileattn.lightning_attention(q, k, v, decay, output_final_state=True)
    o64, _ = reference.linear_attention_quadratic_ref(q, k, v, decay, upcast=True)
    olp, _ = reference.linear_attention_quadratic_ref(q, k, v, decay, upcast=False)
    assert_close("one call", full, o64, olp, floor=_floor(dtype))
    a, s = tileattn.lightning_attention(q[:, :, :1500], k[:, :, :1500], v[:, :, :1500], decay,
                                        output_final_state=True)
    b, s = tileattn.lightning_attention(q[:, :, 1500:N], k[:, :, 1500:N], v[:, :, 1500:N], decay,
                                        initial_state=s, output_final_state=True)
    outs = [a, b]
    for t in range(N, N + steps):
        o, s = tileattn.lightning_decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], s, decay)
        outs.append(o)
    assert_close("chained + decoded", torch.cat(outs, dim=2), o64, olp, floor=_floor(dtype))


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
def test_lightning_per_token_decay_long(dtype):
    """Per-token decay (g, with dg) at N = 4k, D = 128, against the float64 quadratic form."""
    H, N, D = 2, 4096, 128
    q, k, v = (randn(1, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3))
    h0 = (0.5 * torch.randn(1, H, D, D, device=DEVICE)).requires_grad_()
    g = (-0.05 * torch.rand(1, H, N, device=DEVICE)).requires_grad_()
    check_against_reference(q, k, v, h0, None, g=g)


def test_lightning_packed_sequences_long():
    """cu_seqlens with lengths off the chunk grid (and an empty one) == per-sequence calls, bf16 D = 128."""
    H, D = 4, 128
    lens = [3000, 0, 1, 4097, 2500]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    T = int(cu[-1])
    q, k, v = (randn(1, H, T, D, dtype=BF16) for _ in range(3))
    g = -0.05 * torch.rand(1, H, T, device=DEVICE)
    h0 = torch.randn(len(lens), H, D, D, device=DEVICE)
    out, ht = tileattn.lightning_attention(q, k, v, g=g, initial_state=h0, cu_seqlens=cu, output_final_state=True)
    for n, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == e:
            assert torch.equal(ht[n], h0[n])
            continue
        o, s = tileattn.lightning_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], g=g[:, :, a:e],
                                            initial_state=h0[n:n + 1], output_final_state=True)
        o_p = out[:, :, a:e].float()
        assert (o.float() - o_p).norm() <= 1e-2 * o_p.norm() and (s - ht[n:n + 1]).norm() <= 1e-4 * s.norm()


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("flags", [{"causal": True}, {"window": (256, 256)}], ids=["causal", "window"])
def test_attention_weights(dtype, flags):
    """Probabilities of selected heads / rows at N=4k (GQA), reusing the fused forward's LSE."""
    n = 4096
    q, k, v = randn(1, 4, n, 128, dtype=dtype), randn(1, 2, n, 128, dtype=dtype), randn(1, 2, n, 128, dtype=dtype)
    _, lse = tileattn.attention(q, k, v, return_lse=True, **flags)
    rows = torch.arange(0, n, 7, device=DEVICE)
    w = tileattn.attention_weights(q, k, lse, heads=[0, 3], rows=rows, **flags)
    p64 = probs_ref(q, k, **flags)[:, [0, 3]][:, :, rows]
    plp = probs_ref(q, k, upcast=False, **flags)[:, [0, 3]][:, :, rows]
    assert_close("weights", w, p64, plp, floor=_floor(dtype))


# ------------------------------------------------------------------------------------------------ properties
def _grads(fn, inputs, seed=1):
    out = fn(*inputs)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    do = torch.randn(out.shape, device=DEVICE, generator=g).to(out.dtype)
    return torch.autograd.grad(out, inputs, do)


@pytest.mark.parametrize("op", ["causal-gqa", "block-sparse", "lightning"])
def test_backward_bitwise_deterministic(op):
    """Two backward passes on the same inputs give bitwise equal gradients (no atomics)."""
    n = 4096
    if op == "lightning":
        ins = [randn(1, 4, n, 128, dtype=BF16, requires_grad=True) for _ in range(3)]
        decay = tileattn.lightning_decay_rates(4, device=DEVICE)
        fn = lambda q, k, v: tileattn.lightning_attention(q, k, v, decay)  # noqa: E731
    else:
        ins = [randn(1, 8 if i == 0 else 2, n, 128, dtype=BF16, requires_grad=True) for i in range(3)]
        bm = _layout_mask(n, 128, 0.3, heads=8) if op == "block-sparse" else None
        fn = lambda q, k, v: tileattn.attention(q, k, v, causal=bm is None, block_mask=bm)  # noqa: E731
    first = _grads(fn, ins)
    for _ in range(2):
        for name, a, b in zip("qkv", first, _grads(fn, ins)):
            assert torch.equal(a, b), f"d{name} differs between runs"


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
def test_masked_rows_have_no_nan(dtype):
    """Rows that see no key (causal with Nq > Nk, and an empty block-mask row) give out = 0, lse = -inf
    and zero, finite gradients."""
    nq, nk = 3000, 1000
    q, k, v = randn(1, 2, nq, 64, dtype=dtype, requires_grad=True), *(
        randn(1, 2, nk, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
    empty = slice(0, nq - nk)  # bottom-right aligned causal: these queries precede every key
    out.float().sum().backward()
    for name, x in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not torch.isnan(x).any(), f"NaN in {name}"
    assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()
    assert (q.grad[:, :, empty] == 0).all()

    layout = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=DEVICE)
    layout[..., 5, :] = False  # query block 5 sees nothing
    bm = tileattn.BlockMask.from_layout(layout, block_size=128)
    q, k, v = (randn(1, 2, 2048, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    out, lse = tileattn.attention(q, k, v, block_mask=bm, return_lse=True)
    out.float().sum().backward()
    rows = slice(5 * 128, 6 * 128)
    assert not any(torch.isnan(x).any() for x in (out, q.grad, k.grad, v.grad))
    assert (out[:, :, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
    assert (q.grad[:, :, rows] == 0).all()


# ------------------------------------------------------------------------------------------------ score mods, dropout
@pytest.mark.parametrize(
    "Nq,Nk,D,dtype,causal,mod",
    [
        pytest.param(4096, 4096, 128, BF16, True, "softcap", id="4k-d128-bf16-causal-softcap"),
        pytest.param(2048, 3000, 64, FP16, False, "alibi", id="ragged-d64-fp16-alibi"),
        pytest.param(2048, 2048, 256, BF16, True, "scoremod", id="2k-d256-bf16-causal-scoremod"),
    ],
)
def test_score_mods_at_scale(Nq, Nk, D, dtype, causal, mod):
    from test_score_mods import R, rel_bias, rel_bias_grad, rel_bias_ref

    slopes = torch.rand(4, device=DEVICE) * 0.1
    table = torch.randn(4, R + 1, device=DEVICE)
    mods, ref = {"softcap": ({"softcap": 5.0}, {"softcap": 5.0}),
                 "alibi": ({"alibi_slopes": slopes, "softcap": 5.0}, {"alibi_slopes": slopes, "softcap": 5.0}),
                 "scoremod": ({"score_mod": tileattn.ScoreMod(rel_bias, rel_bias_grad, table)},
                              {"score_mod": rel_bias_ref(table)})}[mod]
    run_case(1, 4, 2, Nq, Nk, D, D, dtype, causal=causal, mods=mods, ref_mods=ref, floor=_floor(dtype))


def test_dropout_at_scale_and_bitwise():
    """Dropout at 2k: equals the reference fed dropout_mask's mask; same generator seed -> bitwise-equal
    output and gradients."""
    q, k, v = (randn(1, 4, 2048, 128, dtype=BF16, requires_grad=True) for _ in range(3))
    res = []
    for _ in range(2):
        gen = torch.Generator(device=DEVICE).manual_seed(3)
        state = gen.get_state()
        out = tileattn.attention(q, k, v, causal=True, dropout_p=0.1, generator=gen)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        res.append([out] + list(grads))
    assert all(torch.equal(a, b) for a, b in zip(*res))
    gen.set_state(state)
    seed, offset = torch.randint(0, 2 ** 62, (2,), generator=gen, device=DEVICE).tolist()
    keep = tileattn.dropout_mask(q, k, dropout_p=0.1, seed=seed, offset=offset, causal=True)
    o64, _ = reference.attention_ref(q, k, v, causal=True, upcast=True, dropout_mask=keep, dropout_p=0.1)
    olp, _ = reference.attention_ref(q, k, v, causal=True, dropout_mask=keep, dropout_p=0.1)
    assert_close("out", res[0][0], o64, olp, dtype=BF16)


# ------------------------------------------------------------------------------------------------ every sm_90 tile
def _sm90_configs():
    """(kernel table, family, head-dim bucket, config, WS) of every shipped sm_90 tile: the autotuner runs
    only the fastest one, so each is forced once here."""
    from tileattn.kernels import attention as A

    out = []
    for tname in ("FWD_CONFIGS", "DQ_CONFIGS", "DKDV_CONFIGS"):
        for family in ("sm90", "mask90", "fp32_90"):
            for bucket, configs in getattr(A, tname)[family].items():
                for cfg in configs:
                    out.append(pytest.param(tname, family, bucket, cfg, False,
                                            id=f"{tname[:-8].lower()}-{family}-d{bucket}-{'x'.join(map(str, cfg))}"))
    for bucket, configs in A.WS_CONFIGS.items():
        for cfg in configs:
            out.append(pytest.param("FWD_CONFIGS", "sm90", bucket, cfg, True,
                                    id=f"fwd-ws-d{bucket}-{'x'.join(map(str, cfg))}"))
    return out


@pytest.mark.parametrize("tname,family,bucket,cfg,ws", _sm90_configs())
def test_every_sm90_tile(monkeypatch, tname, family, bucket, cfg, ws):
    """Each shipped sm_90 tile (forced alone into its table) against the float64 reference: ragged lengths,
    GQA, a head dim inside its bucket (80 / 96 pad to 128, 200 to 256), causal except for the dense-only
    warp-specialized walk; swapped dK/dV tiles, the bias-tensor (mask90) and TF32 (fp32_90) families."""
    from tileattn.kernels import attention as A

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("sm_90 tiles")
    monkeypatch.setitem(getattr(A, tname)[family], bucket, [cfg])
    monkeypatch.setattr(A, "_TUNED", {})
    D = {64: 64, 128: 96, 256: 200}[bucket]
    dtype = FP32 if family == "fp32_90" else BF16
    bias = None
    if family == "mask90":
        g = torch.Generator(device=DEVICE).manual_seed(1)
        bias = torch.rand(1, 4, 777, 1031, device=DEVICE, generator=g) > 0.2
    seen = spy_ws(monkeypatch)
    if ws:
        monkeypatch.setattr(A, "WARP_SPECIALIZE", "on")
    run_case(1, 4, 2, 777, 1031, D, D, dtype, causal=not ws, bias=bias, floor=_floor(dtype))
    run_case(2, 2, 2, 1100, 1100, D, D, dtype, causal=False, floor=_floor(dtype))
    if ws:
        assert "on" in seen, "the warp-specialized walk did not run"


@pytest.mark.parametrize("D,dtype", [(128, BF16), (256, FP16), (64, FP32)], ids=["d128-bf16", "d256-fp16", "d64-fp32"])
@pytest.mark.parametrize("bs", [32, 64])
def test_block_sparse_small_blocks(bs, D, dtype):
    """Block-sparse blocks narrower than the sm_90 tiles (the small-block fallback tiles)."""
    run_case(1, 2, 2, 1000, 1000, D, D, dtype, block_mask=_layout_mask(1000, bs, 0.3), floor=_floor(dtype))
