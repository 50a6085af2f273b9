"""attention_with_kvcache: decoding over contiguous and paged KV caches against a float64 reference (random
page permutations, page sizes, ragged lengths incl. 0 and full pages, new tokens appended in place, GQA
packing, windows, forced key splits), the append touching exactly the new rows, bad inputs, CUDA graphs."""
import pytest
import torch

import tileattn
from tileattn.kernels.utils import interpreter_enabled
from tileattn.reference import attention_kvcache_ref
from helpers import DEVICE, ON_GPU, assert_close

pytestmark = pytest.mark.skipif(not (ON_GPU or interpreter_enabled()), reason="needs a GPU or TRITON_INTERPRET=1")


def make_cache(B, Hkv, D, Dv, lens, page, cap, dtype, gen):
    """Caches of capacity ``cap`` (paged when ``page``: pages shuffled over a pool with spare pages)."""
    if page:
        max_pages = cap // page
        n_pages = B * max_pages + 5
        table = torch.randperm(n_pages, generator=gen)[: B * max_pages].view(B, max_pages).int().to(DEVICE)
        kc = torch.randn(n_pages, page, Hkv, D, generator=gen).to(DEVICE, dtype)
        vc = torch.randn(n_pages, page, Hkv, Dv, generator=gen).to(DEVICE, dtype)
    else:
        table = None
        kc = torch.randn(B, Hkv, cap, D, generator=gen).to(DEVICE, dtype)
        vc = torch.randn(B, Hkv, cap, Dv, generator=gen).to(DEVICE, dtype)
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def run_case(B=3, hq=8, hkv=2, D=64, Dv=64, nq=1, n_new=0, lens=(0, 37, 100), page=16, cap=128, window=None,
             causal=True, splits=None, dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    kc, vc, table, cl = make_cache(B, hkv, D, Dv, list(lens), page, cap, dtype, gen)
    q = torch.randn(B, hq, nq, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, hkv, n_new, D, generator=gen).to(DEVICE, dtype) if n_new else None
    v = torch.randn(B, hkv, n_new, Dv, generator=gen).to(DEVICE, dtype) if n_new else None
    kc0, vc0 = kc.clone(), vc.clone()
    r64 = attention_kvcache_ref(q, kc0, vc0, cl, k, v, block_table=table, causal=causal, window=window)
    rlp = attention_kvcache_ref(q, kc0, vc0, cl, k, v, block_table=table, causal=causal, window=window, upcast=False)
    out, lse = tileattn.attention_with_kvcache(q, kc, vc, cl, k, v, block_table=table, causal=causal, window=window,
                                               return_lse=True, num_splits=splits)
    assert_close("out", out, r64[0], rlp[0], dtype)
    assert_close("lse", lse, r64[1], rlp[1], torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(r64[1]))
    # the append wrote exactly rows cache_seqlens[b] .. + n_new of every sequence, nothing else
    exp_k, exp_v = kc0.clone(), vc0.clone()
    for b in range(B):
        for t in range(n_new):
            pos = int(cl[b]) + t
            if table is None:
                exp_k[b, :, pos], exp_v[b, :, pos] = k[b, :, t], v[b, :, t]
            else:
                pg = int(table[b, pos // page])
                exp_k[pg, pos % page], exp_v[pg, pos % page] = k[b, :, t], v[b, :, t]
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)


CASES = [
    pytest.param(dict(page=0), id="contiguous-decode"),
    pytest.param(dict(page=16, n_new=1, nq=1), id="paged16-append1"),
    pytest.param(dict(page=64, n_new=7, nq=7, lens=(0, 57, 64), hkv=1), id="paged64-append7-mqa-fullpage"),
    pytest.param(dict(page=256, cap=512, nq=16, n_new=0, lens=(256, 3, 500), splits=3), id="paged256-nq16-splits"),
    pytest.param(dict(page=16, hq=4, hkv=4, D=128, Dv=96, nq=4, n_new=4, window=(9, -1)), id="mha-d128-dv96-window"),
    pytest.param(dict(page=0, hq=8, hkv=1, D=256, Dv=256, nq=2, n_new=1, lens=(0, 1, 126), splits=2, cap=256),
                 id="contiguous-d256-g8-splits"),
    pytest.param(dict(page=32, nq=5, n_new=0, causal=False, lens=(31, 0, 64)), id="paged32-noncausal"),
    pytest.param(dict(page=16, dtype=torch.bfloat16, nq=3, n_new=2), id="bf16"),
    pytest.param(dict(page=16, dtype=torch.float32, nq=3, n_new=2, lens=(5, 17, 0)), id="fp32"),
]


@pytest.mark.parametrize("kw", CASES)
def test_kvcache_matches_reference(kw):
    run_case(**kw)


def test_kvcache_no_new_tokens_and_empty_sequence():
    """Nnew = 0 leaves the caches bitwise unchanged; a sequence with no keys gives out 0, lse -inf."""
    run_case(page=16, n_new=0, nq=2, lens=(0, 0, 16))


def bad(**over):
    gen = torch.Generator().manual_seed(0)
    kc, vc, table, cl = make_cache(2, 2, 16, 16, [3, 5], 16, 32, torch.float32, gen)
    args = dict(q=torch.randn(2, 4, 1, 16, device=DEVICE), k_cache=kc, v_cache=vc, cache_seqlens=cl, block_table=table)
    args.update(over)
    return lambda: tileattn.attention_with_kvcache(**args)


@pytest.mark.parametrize("call,exc,match", [
    pytest.param(bad(cache_seqlens=torch.tensor([3, 5], device=DEVICE)), TypeError, "int32", id="seqlens-int64"),
    pytest.param(bad(cache_seqlens=torch.tensor([3], dtype=torch.int32, device=DEVICE)), ValueError, "(B,)",
                 id="seqlens-shape"),
    pytest.param(bad(cache_seqlens=torch.tensor([3, 40], dtype=torch.int32, device=DEVICE)), ValueError, "capacity",
                 id="beyond-capacity"),
    pytest.param(bad(block_table=torch.tensor([[0, 1], [2, 99]], dtype=torch.int32, device=DEVICE),
                     cache_seqlens=torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)), ValueError,
                 "outside", id="page-out-of-range"),
    pytest.param(bad(block_table=torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)), TypeError, "int32",
                 id="table-int64"),
    pytest.param(bad(k_cache=torch.randn(4, 24, 2, 16, device=DEVICE), v_cache=torch.randn(4, 24, 2, 16, device=DEVICE)),
                 ValueError, "power of two", id="page-size"),
    pytest.param(bad(k=torch.randn(2, 2, 1, 16, device=DEVICE)), ValueError, "both k and v", id="k-without-v"),
    pytest.param(bad(k=torch.randn(2, 2, 1, 8, device=DEVICE), v=torch.randn(2, 2, 1, 16, device=DEVICE)), ValueError,
                 "Nnew", id="new-shape"),
    pytest.param(bad(q=torch.randn(2, 3, 1, 16, device=DEVICE)), ValueError, "multiple", id="heads"),
    pytest.param(bad(q=torch.randn(2, 4, 1, 16, device=DEVICE).half()), TypeError, "dtype", id="dtype-mix"),
    pytest.param(bad(q=torch.randn(2, 4, 1, 16, device=DEVICE, requires_grad=True)), ValueError, "forward-only",
                 id="autograd"),
    pytest.param(bad(num_splits=0), ValueError, "num_splits", id="splits"),
    pytest.param(bad(cache_seqlens=torch.tensor([[3, 9], [5, 9]], dtype=torch.int32, device=DEVICE)[:, 0]),
                 ValueError, "unit stride", id="strided-seqlens"),
    pytest.param(bad(block_table=torch.tensor([[0, 2], [1, 3]], dtype=torch.int32, device=DEVICE).t()),
                 ValueError, "unit stride", id="strided-table"),
    pytest.param(bad(block_table=torch.zeros(2, 0, dtype=torch.int32, device=DEVICE)), ValueError, "at least one page",
                 id="empty-table"),
])
def test_kvcache_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kvcache_garbage_table_stays_in_bounds(monkeypatch):
    """With the value checks off (what CUDA does), out-of-range page ids and lengths are clamped in the
    kernels: no out-of-bounds access, and the append skips pages outside the pool."""
    import tileattn.kvcache as kvc

    monkeypatch.setattr(kvc, "_value_checks_enabled", lambda q: False)
    gen = torch.Generator().manual_seed(0)
    kc, vc, _, _ = make_cache(2, 2, 16, 16, [3, 5], 16, 32, torch.float32, gen)
    table = torch.tensor([[-5, 1000], [3, 1 << 30]], dtype=torch.int32, device=DEVICE)
    cl = torch.tensor([-7, 2 ** 31 - 1], dtype=torch.int32, device=DEVICE)  # int32 max: clamped before + t
    kc0 = kc.clone()
    k = torch.randn(2, 2, 2, 16, device=DEVICE)
    out = tileattn.attention_with_kvcache(torch.randn(2, 4, 1, 16, device=DEVICE), kc, vc, cl, k, k,
                                         block_table=table)
    assert out.shape == (2, 4, 1, 16) and torch.isfinite(out).all()
    # sequence 0 (length clamped to 0) wrote its 2 rows to page -5 -> skipped; sequence 1 is past capacity
    assert torch.equal(kc, kc0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_kvcache_cuda_graph_capture():
    """A decode step (append + attention) captured in a CUDA graph replays with new cache lengths."""
    gen = torch.Generator().manual_seed(0)
    B, hkv, D = 2, 2, 64
    kc, vc, table, cl = make_cache(B, hkv, D, D, [100, 37], 64, 1024, torch.float16, gen)
    q = torch.randn(B, 8, 1, D, device=DEVICE, dtype=torch.float16)
    k = torch.randn(B, hkv, 1, D, device=DEVICE, dtype=torch.float16)
    step = lambda: tileattn.attention_with_kvcache(q, kc, vc, cl, k, k, block_table=table)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()  # warm-up: autotuning happens outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for n in ([200, 5], [1000, 0]):
        cl.copy_(torch.tensor(n, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        ref = attention_kvcache_ref(q, kc, vc, cl + 1, block_table=table)[0]
        assert_close("graph out", out, ref, None, torch.float16, floor=5e-3)


def test_kvcache_compile_fullgraph():
    """A decode step (append + attention) traces with torch.compile(fullgraph=True): the custom op declares
    its in-place cache writes; compiled and eager give the same output and the same caches."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    kc, vc, table, cl = make_cache(2, 2, 32, 32, [5, 17], 16, 64, torch.float16, gen)
    q = torch.randn(2, 4, 1, 32, generator=gen).to(DEVICE, torch.float16)
    k = torch.randn(2, 2, 1, 32, generator=gen).to(DEVICE, torch.float16)
    step = lambda q, kc, vc, k: tileattn.attention_with_kvcache(q, kc, vc, cl, k, k, block_table=table)
    kc2, vc2 = kc.clone(), vc.clone()
    out_e = step(q, kc, vc, k)
    out_c = torch.compile(step, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(q, kc2, vc2, k)
    assert torch.equal(out_e, out_c) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch._dynamo.reset()
