"""The two-phase walk of the tile engine: interior tiles (no masks) vs boundary tiles (masked body), the
tensor-descriptor (TMA) interior path run under the interpreter, and a negative scale."""
import pytest
import torch

from tileattn.kernels import attention as A
from tileattn.kernels.utils import interpreter_enabled
from tileattn.reference import visible_mask
from helpers import DEVICE, run_case, spy_ws


def _expected_phases(nq, nk, bm, bn, left, right):
    """Per query tile: (#key tiles fully visible and in bounds, #key tiles partly visible), brute force
    from the element mask (causal = right 0; -1 unbounded), in the tiles of the walk's grid."""
    win = None if (left, right) == (-1, -1) else (left, right)
    vis = visible_mask(nq, nk, causal=False, window=win, device="cpu")
    out = []
    for m0 in range(0, nq, bm):
        rows = vis[m0:m0 + bm]
        n_int = n_bnd = 0
        for n0 in range(0, nk + bn, bn):
            tile = rows[:, n0:n0 + bn]
            if tile.numel() == 0 or not tile.any():
                continue
            if tile.shape[1] == bn and tile.all():
                n_int += 1
            else:
                n_bnd += 1
        out.append((n_int, n_bnd))
    return out


@pytest.mark.skipif(not interpreter_enabled(), reason="the step counter is an interpreter-build debug option")
@pytest.mark.parametrize("nq,nk,left,right", [
    pytest.param(256, 256, -1, -1, id="dense-tile-multiple"),
    pytest.param(100, 257, -1, -1, id="dense-ragged"),
    pytest.param(256, 256, -1, 0, id="causal"),
    pytest.param(100, 300, -1, 0, id="causal-nq<nk"),
    pytest.param(300, 100, -1, 0, id="causal-nq>nk"),
    pytest.param(200, 200, 40, 0, id="causal-window-cuts-tiles"),
    pytest.param(150, 170, 45, 13, id="window-both-sides"),
    pytest.param(64, 500, 70, -1, id="window-left-only"),
])
def test_interior_and_boundary_tiles(nq, nk, left, right):
    """Each query tile runs exactly the fully visible in-bounds key tiles unmasked and exactly the partly
    visible ones masked; lengths that are and are not tile multiples, windows that cut tiles, Nq != Nk."""
    q = torch.randn(1, 1, nq, 16, device=DEVICE)
    k = torch.randn(1, 1, nk, 16, device=DEVICE)
    _, _, visits = A.attention_forward(q, k, k, scale=0.25, left=left, right=right, count_visits=True)
    bm, bn = A.INTERPRET_CONFIG[0], A.INTERPRET_CONFIG[1]
    assert [tuple(x) for x in visits[0].tolist()] == _expected_phases(nq, nk, bm, bn, left, right)


@pytest.fixture
def tma_on(monkeypatch):
    monkeypatch.setattr(A, "TMA_MODE", "on")


@pytest.mark.skipif(not interpreter_enabled(), reason="forces the descriptor path under the interpreter")
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,causal,window", [
    pytest.param(1, 2, 2, 65, 65, 64, 64, True, None, id="causal-65"),
    pytest.param(1, 4, 2, 40, 97, 80, 80, False, None, id="gqa-d80-nq<nk"),
    pytest.param(2, 2, 1, 70, 40, 32, 48, True, None, id="mqa-causal-nq>nk-dv48"),
    pytest.param(1, 2, 2, 90, 90, 16, 16, False, (20, 7), id="window"),
])
def test_descriptor_interior_path(tma_on, B, Hq, Hkv, Nq, Nk, D, Dv, causal, window):
    """The interior steps loading through tensor descriptors (the sm_90 path) give the same results."""
    run_case(B, Hq, Hkv, Nq, Nk, D, Dv, torch.float32, causal=causal, window=window)


@pytest.mark.parametrize("tma", ["off", "on"])
def test_negative_scale(monkeypatch, tma):
    """The scale's sign is folded into the score operand (kernels scale by |scale|): negative scales
    stay exact in both phases."""
    if tma == "on" and not interpreter_enabled():
        pytest.skip("descriptor path forced only under the interpreter")
    monkeypatch.setattr(A, "TMA_MODE", tma if tma == "on" else A.TMA_MODE)
    run_case(1, 2, 1, 70, 45, 32, 32, torch.float32, causal=True, scale=-0.4)


def test_negative_scale_bf16():
    """bf16 with a negative scale (the interpreter's bf16 negation is wrong: the kernel negates in fp32
    there)."""
    run_case(1, 2, 2, 40, 40, 32, 32, torch.bfloat16, causal=True, scale=-0.3)


@pytest.mark.parametrize("kernel,table", [("_attn_fwd", "FWD_CONFIGS"), ("_attn_bwd_dq", "DQ_CONFIGS"),
                                          ("_attn_bwd_dkdv", "DKDV_CONFIGS")])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_sparse_configs_fit_the_blocks(kernel, table, bs):
    """Every family's autotune list for a block-sparse call has tiles no larger than the blocks — also
    for single-config entries, which Triton's autotuner never prunes — and a boundary step that divides
    the block (a tile larger than a block would read the wrong lists and run past the element masks)."""
    tables = getattr(A, table)
    for family, buckets in tables.items():
        for bucket in buckets:
            for c in A.configs_for(kernel, tables, family, bucket, bs, bs):
                m, n, b = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_B"]
                assert m <= bs and n <= bs and bs % b == 0, (family, bucket, c.kwargs)


def test_grid_folds_batch_heads(monkeypatch):
    """Heads and batch sit on grid axes 1 / 2 (CUDA limits them to 65535 each); dK/dV folds
    batch x kv heads over two axes, and programs past the end redo the last one (same values)."""
    monkeypatch.setattr(A, "_GRID_YZ", 4)  # B * Hkv = 6 > 4: folded into a 4 x 2 grid with two spare programs
    run_case(3, 4, 2, 37, 45, 16, 16, torch.float32, causal=True)
    monkeypatch.setattr(A, "_GRID_YZ", 1)
    q = torch.randn(2, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="CUDA grid limit"):
        A.attention_forward(q, q, q, scale=1.0)


@pytest.mark.skipif(not interpreter_enabled(), reason="forces the descriptor path under the interpreter")
def test_descriptor_interior_path_block_sparse(tma_on):
    """Full blocks (interior steps) of a block-sparse call load through descriptors too: per-head random
    layouts with GQA, ragged lengths (edge blocks are partial) and an empty query block."""
    import tileattn

    g = torch.Generator().manual_seed(3)
    nq, nk, bs = 100, 150, 32
    layout = torch.rand(2, 4, -(-nq // bs), -(-nk // bs), generator=g) < 0.6
    layout[1, 2, 0] = False
    bm = tileattn.BlockMask.from_layout(layout.to(DEVICE), block_size=bs, q_len=nq, kv_len=nk)
    run_case(2, 4, 2, nq, nk, 48, 40, torch.float32, block_mask=bm)


@pytest.fixture
def swapped(monkeypatch):
    """The interpreter's config with a query step wider than the key tile: dK/dV runs the swapped
    orientation (scores [BM, BN], transposed dK^T / dV^T accumulators), as the sm_90 d128 / d256 tiles do."""
    monkeypatch.setattr(A, "INTERPRET_CONFIG", (32, 16, 4, 1, 32, True))


@pytest.mark.skipif(not interpreter_enabled(), reason="forces an interpreter config")
@pytest.mark.parametrize("tma", ["off", "on"])
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,dtype,causal,window", [
    pytest.param(1, 2, 2, 65, 65, 64, 64, torch.float32, True, None, id="causal-65"),
    pytest.param(1, 4, 2, 40, 97, 80, 96, torch.float16, False, None, id="gqa-d80-dv96-nq<nk"),
    pytest.param(2, 2, 1, 70, 33, 32, 48, torch.bfloat16, True, None, id="mqa-causal-nq>nk"),
    pytest.param(1, 2, 2, 90, 90, 16, 16, torch.float32, False, (20, 7), id="window-cuts-tiles"),
    pytest.param(1, 1, 1, 1, 17, 256, 256, torch.float16, False, None, id="d256-nq1"),
])
def test_swapped_dkdv(swapped, monkeypatch, tma, B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal, window):
    """Swapped dK/dV tiles give the same gradients as the reference, with pointer and descriptor loads (the
    descriptor path also serves its boundary steps: TMA zero-fills rows past Nq)."""
    if tma == "on":
        monkeypatch.setattr(A, "TMA_MODE", "on")
    run_case(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal=causal, window=window)


@pytest.mark.skipif(not interpreter_enabled(), reason="forces an interpreter config")
def test_swapped_dkdv_sparse_mods_dropout(swapped):
    """Block-sparse partial blocks, score mods and dropout on the swapped orientation (the same (i, j)
    keep bits as the forward: compared with the unswapped run bitwise-close)."""
    import tileattn

    g = torch.Generator().manual_seed(5)
    layout = torch.rand(1, 2, 3, 3, generator=g) < 0.7
    layout[0, 1, 2] = False
    bm = tileattn.BlockMask.from_layout(layout.to(DEVICE), block_size=32, q_len=80, kv_len=70)
    run_case(1, 2, 1, 80, 70, 32, 32, torch.float32, block_mask=bm)
    run_case(1, 2, 2, 50, 45, 32, 32, torch.float32, causal=True, mods={"softcap": 2.0},
             ref_mods={"softcap": 2.0})
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    grads = []
    for cfg in ((32, 16, 4, 1, 32, True), (32, 32, 4, 1)):
        A.INTERPRET_CONFIG = cfg
        out = tileattn.attention(q, k, v, causal=True, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def ws_on(monkeypatch):
    monkeypatch.setattr(A, "WARP_SPECIALIZE", "on")


@pytest.mark.skipif(not interpreter_enabled(), reason="forces the warp-specialized walk under the interpreter")
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,dtype,scale", [
    pytest.param(1, 2, 2, 65, 65, 64, 64, torch.float32, None, id="ragged-65"),
    pytest.param(2, 4, 2, 40, 97, 80, 96, torch.float16, None, id="gqa-d80-dv96-nq<nk"),
    pytest.param(1, 2, 1, 70, 33, 32, 48, torch.bfloat16, None, id="mqa-nq>nk"),
    pytest.param(1, 1, 1, 1, 17, 256, 256, torch.float16, -0.0625, id="d256-nq1-negative-scale"),
    pytest.param(1, 2, 2, 64, 96, 16, 16, torch.float32, None, id="tile-multiples"),
])
def test_warp_specialized_walk(ws_on, B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale):
    """The warp-specialized dense forward's walk (q through a descriptor, one walk over every key tile with
    the key bound masked, no boundary phase) gives the reference outputs, LSE and gradients."""
    run_case(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale=scale)


@pytest.mark.skipif(not interpreter_enabled(), reason="forces the warp-specialized walk under the interpreter")
def test_warp_specialized_walk_eligibility(ws_on, monkeypatch):
    """Only dense forward calls take the warp-specialized walk (causal, window, block-sparse, bias, score
    mods, packed sequences and KV caches keep the two-phase walk), and split-KV decoding on it still merges
    its splits right."""
    import tileattn
    from tileattn.reference import attention_ref

    seen = spy_ws(monkeypatch)
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for n in (3, 300, 300))
    out, lse = A.attention_forward(q, k, v, scale=0.2, num_splits=3)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), scale=0.2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    assert seen == ["on"]
    q = torch.randn(1, 2, 40, 32, device=DEVICE)
    tileattn.attention(q, q, q, causal=True)
    tileattn.attention(q, q, q, window=(5, 5))
    tileattn.attention(q, q, q, softcap=3.0)
    tileattn.attention(q, q, q, block_mask=tileattn.BlockMask.from_layout(
        torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), block_size=32, q_len=40, kv_len=40))
    from tileattn.attention import _attention

    _attention(q, q, q, bias=torch.ones(40, 40, dtype=torch.bool, device=DEVICE))
    assert seen == ["on"] + ["off"] * 5
