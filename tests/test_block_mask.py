"""BlockMask construction (create_block_mask / from_layout / & |), its data contract, the ready-made
predicates of tileattn.masks, and the plot script. Host-side only (no kernels)."""
import importlib.util
import itertools
import os

import pytest
import torch

import tileattn
from tileattn import block_mask as bm_mod
from tileattn import masks as M
from tileattn.block_mask import BlockMask, create_block_mask
from tileattn.reference import visible_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def dense_of(fn, B, H, nq, nk):
    """Evaluate a predicate on the full index grid (the dense truth for small sizes)."""
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(nq).view(1, 1, nq, 1)
    k = torch.arange(nk).view(1, 1, 1, nk)
    return torch.broadcast_to(fn(b, h, q, k), (B, H, nq, nk))


def explicit(nq, nk, pred):
    """(nq, nk) bool from a scalar Python predicate pred(i, j) (independent of the torch predicates)."""
    return torch.tensor([[bool(pred(i, j)) for j in range(nk)] for i in range(nq)], dtype=torch.bool).reshape(nq, nk)


def check_contract(bm: BlockMask, dense: torch.Tensor):
    """Every rule of the data contract, checked block by block against the dense truth ``dense``
    (broadcastable to (bm.B, bm.H, q_len, kv_len))."""
    B, H, nq, nk = bm.B, bm.H, bm.q_len, bm.kv_len
    bq, bk = bm.bs_q, bm.bs_k
    nQB, nKB = bm.num_q_blocks, bm.num_kv_blocks
    assert (nQB, nKB) == (-(-nq // bq), -(-nk // bk))
    dense = torch.broadcast_to(dense.cpu(), (B, H, nq, nk))
    assert torch.equal(bm.to_dense().cpu(), dense)
    for name in BlockMask._LIST_NAMES:
        t = getattr(bm, name)
        assert t.dtype == torch.int32 and t.is_contiguous() and t.device == bm.device, name
    assert bm.masks.dtype == torch.uint8 and bm.masks.is_contiguous() and bm.masks.dim() == 3
    assert bm.masks.shape[0] >= 1 and tuple(bm.masks.shape[1:]) == (bq, bk)
    pad = torch.zeros(B, H, nQB * bq, nKB * bk, dtype=torch.bool)
    pad[:, :, :nq, :nk] = dense
    tiles = pad.view(B, H, nQB, bq, nKB, bk).permute(0, 1, 2, 4, 3, 5)  # (B, H, nQB, nKB, bq, bk)
    cnt = tiles.sum((-1, -2))
    inside = ((torch.arange(nQB) + 1) * bq <= nq)[:, None] & ((torch.arange(nKB) + 1) * bk <= nk)[None, :]
    exp_full = (cnt == bq * bk) & inside
    exp_part = (cnt > 0) & ~exp_full
    masks = bm.masks.cpu().bool()
    L = {n: getattr(bm, n).cpu() for n in BlockMask._LIST_NAMES}
    fwd_ids = {}
    for b, h, i in itertools.product(range(B), range(H), range(nQB)):
        for kind, exp in (("full", exp_full), ("part", exp_part)):
            num = int(L[f"kv_num_{kind}"][b, h, i])
            idx = L[f"kv_idx_{kind}"][b, h, i].tolist()
            want = torch.nonzero(exp[b, h, i]).flatten().tolist()
            assert idx[:num] == want, (kind, b, h, i, idx[:num], want)  # ascending, exact set
            assert all(x == 0 for x in idx[num:])
        ids = L["kv_mask_id_part"][b, h, i].tolist()
        num = int(L["kv_num_part"][b, h, i])
        assert all(x == 0 for x in ids[num:])
        for j, mid in zip(L["kv_idx_part"][b, h, i].tolist()[:num], ids[:num]):
            assert 0 <= mid < masks.shape[0]
            assert torch.equal(masks[mid], tiles[b, h, i, j]), (b, h, i, j)
            fwd_ids[(b, h, i, j)] = mid
    for b, h, j in itertools.product(range(B), range(H), range(nKB)):
        for kind, exp in (("full", exp_full), ("part", exp_part)):
            num = int(L[f"q_num_{kind}"][b, h, j])
            idx = L[f"q_idx_{kind}"][b, h, j].tolist()
            assert idx[:num] == torch.nonzero(exp[b, h, :, j]).flatten().tolist()
            assert all(x == 0 for x in idx[num:])
        num = int(L["q_num_part"][b, h, j])
        for i, mid in zip(L["q_idx_part"][b, h, j].tolist()[:num], L["q_mask_id_part"][b, h, j].tolist()[:num]):
            assert fwd_ids[(b, h, i, j)] == mid
        assert all(x == 0 for x in L["q_mask_id_part"][b, h, j].tolist()[num:])
    # deduplicated: no two stored masks are equal; zero beyond the lengths
    flat = [bytes(m.flatten().tolist()) for m in bm.masks.cpu()]
    assert len(set(flat)) == len(flat)
    if int(exp_part.sum()) == 0:
        assert bm.masks.shape[0] == 1 and int(bm.masks.sum()) == 0
    else:
        assert bm.masks.shape[0] == len(set(fwd_ids.values()))
    assert bm.num_full == int(exp_full.sum()) and bm.num_partial == int(exp_part.sum())
    assert bm.density == pytest.approx(float((cnt > 0).float().mean()))
    assert bm.visited_blocks() == int((cnt > 0).sum())


def make(fn, B, H, nq, nk, bs=16):
    return create_block_mask(fn, B, H, nq, nk, block_size=bs, device="cpu")


# --------------------------------------------------------------------------------------------------
# create_block_mask: contract, lengths, block sizes, broadcast, chunking, dedup
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (63, 40), (40, 63), (64, 64), (100, 33)])
@pytest.mark.parametrize("bs", [16, (16, 32), (32, 16)])
def test_random_elements_contract(nq, nk, bs):
    dense = torch.rand(2, 3, nq, nk) < 0.6
    dense[..., :8, :] = True  # some full blocks
    dense[..., 20:40, :] = False  # some empty blocks
    bm = make(lambda b, h, q, k: dense[b, h, q, k], 2, 3, nq, nk, bs)
    assert (bm.B, bm.H, bm.q_len, bm.kv_len) == (2, 3, nq, nk)
    check_contract(bm, dense)


@pytest.mark.parametrize("nq,nk", [(17, 17), (257, 257), (70, 130), (130, 70)])
def test_causal_contract_and_dedup(nq, nk):
    bm = make(M.causal(nq, nk), None, None, nq, nk)
    check_contract(bm, visible_mask(nq, nk, causal=True))
    if nq == nk and nq % 16 == 0:
        assert bm.masks.shape[0] == 1  # every diagonal block shares one mask


@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (100, 37), (37, 100), (128, 128), (250, 190)])
@pytest.mark.parametrize("bs", [16, (32, 16)])
def test_band_fast_path_equals_generic(nq, nk, bs):
    fns = [M.causal(), M.causal(nq, nk), M.sliding_window(5, 0, nq, nk), M.sliding_window(-1, 20),
           M.sliding_window(40, -1, nq, nk), M.sliding_window(0, 0), M.sliding_window(-1, -1),
           M.and_masks(M.causal(nq, nk), M.sliding_window(9, 3, nq, nk)),
           M.and_masks(M.causal(), M.sliding_window(0, -1, q_len=1, kv_len=6))]  # empty band: kv - q <= 0 and >= 5
    for fn in fns:
        assert hasattr(fn, "_tileattn_band")
        fast = create_block_mask(fn, 2, None, nq, nk, block_size=bs, device="cpu")
        slow = create_block_mask(lambda b, h, q, k: fn(b, h, q, k), 2, None, nq, nk, block_size=bs, device="cpu")
        for name in BlockMask._LIST_NAMES + ("masks",):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), (fn._tileattn_band, name)
    check_contract(create_block_mask(fns[2], None, None, nq, nk, block_size=bs, device="cpu"),
                   visible_mask(nq, nk, window=(5, 0)))
    assert not hasattr(M.or_masks(M.causal()), "_tileattn_band")
    assert not hasattr(M.and_masks(M.causal(), M.dilated(2)), "_tileattn_band")


def test_causal_dedup_one_mask_per_pattern():
    bm = make(M.causal(), None, None, 256, 256)
    assert bm.num_partial == 16 and bm.masks.shape[0] == 1
    assert torch.equal(bm.masks[0].bool(), torch.ones(16, 16, dtype=torch.bool).tril())
    bm = make(M.dilated(4), None, None, 128, 128)  # block 16 is a multiple of the stride: one pattern
    assert bm.num_partial == 64 and bm.masks.shape[0] == 1


def test_broadcast_b_h():
    # predicate ignoring b / h: B=None, H=None stores 1; with B, H given the same lists are repeated
    fn = M.causal()
    b1 = make(fn, None, None, 50, 50)
    b2 = make(fn, 2, 3, 50, 50)
    assert (b1.B, b1.H, b2.B, b2.H) == (1, 1, 2, 3)
    for name in BlockMask._LIST_NAMES:
        assert torch.equal(getattr(b2, name), getattr(b1, name).expand(2, 3, *getattr(b1, name).shape[2:]))
    # predicate depending on h only, broadcast over B
    fn_h = lambda b, h, q, k: (k <= q) | (h == 1)  # noqa: E731
    bm = make(fn_h, None, 2, 40, 40)
    assert (bm.B, bm.H) == (1, 2)
    check_contract(bm, dense_of(fn_h, 1, 2, 40, 40))
    # predicate depending on b: with B=None it sees b = 0 only
    fn_b = lambda b, h, q, k: k <= q + 16 * b  # noqa: E731
    check_contract(make(fn_b, 3, None, 40, 40), dense_of(fn_b, 3, 1, 40, 40))
    assert torch.equal(make(fn_b, None, None, 40, 40).to_dense()[0, 0], visible_mask(40, 40, causal=True))


def test_mask_fn_sees_only_in_range_indices():
    seen = []

    def fn(b, h, q, k):
        seen.append((int(q.max()), int(k.max()), int(q.min()), int(k.min())))
        return k <= q

    make(fn, None, None, 37, 21)
    assert max(s[0] for s in seen) == 36 and max(s[1] for s in seen) == 20 and min(s[2] + s[3] for s in seen) >= 0


def test_chunked_evaluation_matches_and_is_bounded(monkeypatch):
    doc = torch.randint(0, 5, (300,)).sort().values
    fn = M.document(doc, causal=True)
    ref = make(fn, 2, 1, 300, 300, 32)
    sizes = []

    def spy(b, h, q, k):
        sizes.append(torch.broadcast_shapes(b.shape, h.shape, q.shape, k.shape).numel())
        return fn(b, h, q, k)

    monkeypatch.setattr(bm_mod, "_CHUNK_ELEMS", 2 * 2 * 32 * 32)  # 2 tiles per chunk: splits q and kv
    bm = make(spy, 2, 1, 300, 300, 32)
    assert max(sizes) <= 2 * 2 * 32 * 32 and len(sizes) > 10
    for name in BlockMask._LIST_NAMES + ("masks",):
        assert torch.equal(getattr(bm, name), getattr(ref, name)), name
    check_contract(bm, dense_of(fn, 2, 1, 300, 300))


def test_dedup_exact_fallback_on_fingerprint_collision(monkeypatch):
    # all-equal fingerprints: every distinct mask collides, the table must fall back to exact matching
    orig = bm_mod._MaskTable.__init__

    def init(self, nbits, device):
        orig(self, nbits, device)
        self.weights.zero_()

    monkeypatch.setattr(bm_mod._MaskTable, "__init__", init)
    monkeypatch.setattr(bm_mod, "_CHUNK_ELEMS", 4 * 16 * 16)  # many add() calls
    dense = torch.rand(1, 1, 90, 90) < 0.5
    dense[..., :, :16] = dense[..., :, 16:32]  # repeated patterns
    bm = make(lambda b, h, q, k: dense[b, h, q, k], None, None, 90, 90)
    check_contract(bm, dense)


def test_mask_table_ids_stable_across_calls():
    t = bm_mod._MaskTable(256, torch.device("cpu"))
    a = torch.rand(5, 256) < 0.5
    ids1 = t.add(torch.cat([a, a[:2]])).tolist()
    assert sorted(ids1[:5]) == [0, 1, 2, 3, 4] and ids1[5:] == ids1[:2]
    b = torch.rand(2, 256) < 0.5
    ids2 = t.add(torch.cat([b, a[3:4]])).tolist()
    assert sorted(ids2[:2]) == [5, 6] and ids2[2] == ids1[3]
    stored = t.masks(16, 16).reshape(7, 256).bool()
    assert torch.equal(stored[ids1[:5]], a) and torch.equal(stored[ids2[:2]], b)


# --------------------------------------------------------------------------------------------------
# predicates vs explicit constructions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,nk", [(33, 33), (20, 45), (45, 20)])
@pytest.mark.parametrize("window", [(-1, -1), (5, 0), (0, 3), (7, 2), (-1, 4), (3, -1)])
def test_sliding_window_matches_reference(nq, nk, window):
    fn = M.sliding_window(*window, q_len=nq, kv_len=nk)
    truth = visible_mask(nq, nk, window=window)
    assert torch.equal(dense_of(fn, 1, 1, nq, nk)[0, 0], truth)
    check_contract(make(fn, None, None, nq, nk), truth)


@pytest.mark.parametrize("nq,nk", [(30, 30), (10, 37), (37, 10)])
def test_causal_matches_reference(nq, nk):
    assert torch.equal(dense_of(M.causal(nq, nk), 1, 1, nq, nk)[0, 0], visible_mask(nq, nk, causal=True))
    assert torch.equal(dense_of(M.causal(), 1, 1, nq, nk)[0, 0], explicit(nq, nk, lambda i, j: j <= i))


@pytest.mark.parametrize("causal", [False, True])
def test_document(causal):
    n = 70
    ids = torch.tensor([0] * 10 + [1] * 25 + [-1] * 5 + [2] * 30)
    want = explicit(n, n, lambda i, j: ids[i] == ids[j] and ids[i] >= 0 and (j <= i or not causal))
    fn = M.document(ids, causal=causal)
    assert torch.equal(dense_of(fn, 1, 1, n, n)[0, 0], want)
    check_contract(make(fn, None, None, n, n), want)
    # per-batch ids
    ids2 = torch.stack([ids, torch.arange(n) // 16])
    fn2 = M.document(ids2, causal=causal)
    want2 = explicit(n, n, lambda i, j: ids2[1, i] == ids2[1, j] and (j <= i or not causal))
    got = make(fn2, 2, None, n, n).to_dense()
    assert torch.equal(got[0, 0], want) and torch.equal(got[1, 0], want2)


def test_prefix_lm():
    n = 50
    want = explicit(n, n, lambda i, j: j < 12 or j <= i)
    check_contract(make(M.prefix_lm(12), None, None, n, n), want)
    got = make(M.prefix_lm(torch.tensor([12, 0])), 2, None, n, n).to_dense()
    assert torch.equal(got[0, 0], want) and torch.equal(got[1, 0], explicit(n, n, lambda i, j: j <= i))


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_and_strided(causal):
    n = 60
    check_contract(make(M.dilated(3, causal=causal), None, None, n, n),
                   explicit(n, n, lambda i, j: (i - j) % 3 == 0 and (j <= i or not causal)))
    check_contract(make(M.strided(7, causal=causal), None, None, n, n),
                   explicit(n, n, lambda i, j: (abs(i - j) < 7 or (i - j) % 7 == 0) and (j <= i or not causal)))


def test_longformer():
    n = 80
    g = {0, 41}
    want = explicit(n, n, lambda i, j: abs(i - j) <= 4 or i in g or j in g)
    check_contract(make(M.longformer(4, global_idx=[41, 0]), None, None, n, n), want)
    assert torch.equal(dense_of(M.longformer(2), 1, 1, n, n)[0, 0], explicit(n, n, lambda i, j: abs(i - j) <= 2))


def test_bigbird():
    n, blk = 200, 16
    nb = -(-n // blk)
    fn = M.bigbird(1, 1, 2, blk, seed=3, seq_len=n)
    lay = fn.block_layout
    base = explicit(nb, nb, lambda a, c: abs(a - c) <= 1 or a < 1 or c < 1)
    assert torch.all(lay >= base)
    extra = (lay & ~base).sum(1)
    assert torch.equal(extra, torch.minimum((~base).sum(1), torch.tensor(2)))  # exactly 2 random blocks per row
    want = explicit(n, n, lambda i, j: bool(lay[i // blk, j // blk]))
    bm = make(fn, None, None, n, n, blk)
    check_contract(bm, want)
    assert torch.equal(bm.layout()[0, 0], lay)
    # seeded and deterministic
    assert torch.equal(M.bigbird(1, 1, 2, blk, seed=3, seq_len=n).block_layout, lay)
    assert not torch.equal(M.bigbird(1, 1, 2, blk, seed=4, seq_len=n).block_layout, lay)
    with pytest.raises(ValueError, match="seq_len"):
        M.bigbird(1, 1, 2, blk, 0)


def test_and_or_masks():
    n = 40
    a, b = M.causal(), M.sliding_window(5, 5)
    da, db = dense_of(a, 1, 1, n, n), dense_of(b, 1, 1, n, n)
    assert torch.equal(dense_of(M.and_masks(a, b), 1, 1, n, n), da & db)
    assert torch.equal(dense_of(M.or_masks(a, b), 1, 1, n, n), da | db)
    assert torch.equal(dense_of(M.and_masks(a, b, M.dilated(2)), 1, 1, n, n), da & db & dense_of(M.dilated(2), 1, 1, n, n))
    check_contract(make(M.and_masks(), None, None, n, n), torch.ones(n, n, dtype=torch.bool))
    check_contract(make(M.or_masks(), None, None, n, n), torch.zeros(n, n, dtype=torch.bool))


def test_predicate_argument_errors():
    with pytest.raises(ValueError):
        M.causal(q_len=10)
    with pytest.raises(ValueError):
        M.sliding_window(-2, 0)
    with pytest.raises(TypeError):
        M.document(torch.rand(10))
    with pytest.raises(ValueError):
        M.dilated(0)
    with pytest.raises(ValueError):
        M.longformer(2, global_idx=[-1])
    with pytest.raises(TypeError):
        M.and_masks(M.causal(), 3)


# --------------------------------------------------------------------------------------------------
# from_layout
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,lens,bs", [
    ((1, 1, 4, 4), (None, None), 16),
    ((2, 3, 5, 3), (70, 40), 16),
    ((1, 2, 3, 6), (33, 190), (16, 32)),
    ((2, 1, 1, 1), (1, 5), 16),
])
def test_from_layout(shape, lens, bs):
    layout = torch.rand(shape) < 0.5
    layout[..., 0, 0] = True
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    nq = lens[0] or shape[2] * bq
    nk = lens[1] or shape[3] * bk
    bm = BlockMask.from_layout(layout, block_size=bs, q_len=lens[0], kv_len=lens[1])
    dense = layout.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
    check_contract(bm, dense)
    assert torch.equal(bm.layout(), layout)
    assert bm.masks.shape[0] <= 3  # ragged row, ragged column, corner


def test_from_layout_2d_and_errors():
    bm = BlockMask.from_layout(torch.eye(4, dtype=torch.bool), block_size=32)
    assert (bm.B, bm.H, bm.q_len, bm.kv_len, bm.num_full, bm.num_partial) == (1, 1, 128, 128, 4, 0)
    assert bm.masks.shape == (1, 32, 32) and int(bm.masks.sum()) == 0
    with pytest.raises(ValueError, match="query blocks"):
        BlockMask.from_layout(torch.ones(4, 4, dtype=torch.bool), block_size=32, q_len=200)
    with pytest.raises(ValueError, match="key blocks"):
        BlockMask.from_layout(torch.ones(4, 4, dtype=torch.bool), block_size=32, kv_len=96)
    with pytest.raises(TypeError):
        BlockMask.from_layout(torch.ones(4, 4), block_size=32)
    with pytest.raises(ValueError):
        BlockMask.from_layout(torch.ones(1, 1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        BlockMask.from_layout(torch.ones(4, 4, dtype=torch.bool), block_size=24)


# --------------------------------------------------------------------------------------------------
# & and |
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,nk", [(64, 64), (50, 77)])
def test_and_or(nq, nk):
    da = torch.rand(2, 1, nq, nk) < 0.7
    da[..., :16, :] = True
    a = make(lambda b, h, q, k: da[b, h, q, k], 2, None, nq, nk)
    fb = M.causal(nq, nk)
    b = make(fb, None, None, nq, nk)
    b3 = make(lambda b_, h, q, k: fb(b_, h, q, k) | (h == 2), None, 3, nq, nk)
    db, db3 = dense_of(fb, 1, 1, nq, nk), dense_of(lambda b_, h, q, k: fb(b_, h, q, k) | (h == 2), 1, 3, nq, nk)
    check_contract(a & b, da & db)
    check_contract(a | b, da | db)
    c = a & b3
    assert (c.B, c.H) == (2, 3)
    check_contract(c, da & db3)
    check_contract(b | b3, db | db3)


def test_and_or_reclassify():
    n = 64
    lower, upper = make(M.causal(), None, None, n, n), make(lambda b, h, q, k: k >= q, None, None, n, n)
    u = lower | upper  # partial | partial on the diagonal -> full
    assert u.num_partial == 0 and u.num_full == 16 and u.masks.shape[0] == 1
    check_contract(u, torch.ones(n, n, dtype=torch.bool))
    i = lower & upper  # only the diagonal survives
    check_contract(i, torch.eye(n, dtype=torch.bool))
    off = make(lambda b, h, q, k: k < q, None, None, n, n) & upper  # partial & partial -> empty
    assert off.num_full + off.num_partial == 0
    check_contract(off, torch.zeros(n, n, dtype=torch.bool))


def test_and_or_errors():
    a = make(M.causal(), None, None, 64, 64)
    with pytest.raises(ValueError, match="lengths"):
        a & make(M.causal(), None, None, 64, 48)
    with pytest.raises(ValueError, match="block sizes"):
        a | make(M.causal(), None, None, 64, 64, 32)
    with pytest.raises(ValueError):
        make(M.causal(), 2, None, 64, 64) & make(M.causal(), 3, None, 64, 64)
    with pytest.raises(TypeError):
        a & torch.ones(1)


# --------------------------------------------------------------------------------------------------
# validation, repr, to(), check_compatible, visited_blocks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs,exc", [(8, ValueError), (512, ValueError), (48, ValueError), ((16,), TypeError),
                                    ("16", TypeError), (True, TypeError), ((16, 24), ValueError)])
def test_block_size_validation(bs, exc):
    with pytest.raises(exc):
        create_block_mask(M.causal(), None, None, 64, 64, block_size=bs, device="cpu")


def test_create_argument_errors():
    c = M.causal()
    with pytest.raises(ValueError):
        create_block_mask(c, None, None, 0, 64, device="cpu")
    with pytest.raises(TypeError):
        create_block_mask(c, None, None, 64.0, 64, device="cpu")
    with pytest.raises(ValueError):
        create_block_mask(c, 0, None, 64, 64, device="cpu")
    with pytest.raises(TypeError):
        create_block_mask("causal", None, None, 64, 64, device="cpu")
    with pytest.raises(TypeError, match="bool"):
        create_block_mask(lambda b, h, q, k: (k <= q).int(), None, None, 64, 64, device="cpu")
    with pytest.raises(ValueError, match="broadcast"):
        create_block_mask(lambda b, h, q, k: torch.ones(3, 1, 1, 1, dtype=torch.bool), 2, None, 64, 64, device="cpu")
    with pytest.raises(TypeError, match="Tensor"):
        create_block_mask(lambda b, h, q, k: True, None, None, 64, 64, device="cpu")


def test_repr_and_density():
    bm = make(M.causal(), None, None, 64, 64)
    r = repr(bm)
    assert "q_len=64" in r and "block_size=(16, 16)" in r and "density=62.5%" in r
    assert "full=6" in r and "partial=4" in r
    assert "\n  +...\n  #+..\n  ##+.\n  ###+" in r
    big = make(M.causal(), None, None, 40 * 16, 40 * 16)
    assert "\n" not in repr(big)
    assert bm.density == pytest.approx(10 / 16)


def test_to_and_visited_blocks():
    bm = make(M.causal(), None, 2, 64, 64)
    assert bm.to("cpu") is bm and bm.device == torch.device("cpu")
    assert bm.visited_blocks() == 20 and bm.visited_blocks(batch=3) == 60 and bm.visited_blocks(batch=3, heads=2) == 60
    assert make(M.causal(), None, None, 64, 64).visited_blocks(batch=3, heads=2) == 60


@pytest.mark.gpu
def test_cuda_roundtrip():
    doc = torch.randint(0, 4, (300,)).sort().values
    fn = M.document(doc, causal=True)
    g = create_block_mask(fn, 2, None, 300, 300, block_size=64, device="cuda")
    c = create_block_mask(fn, 2, None, 300, 300, block_size=64, device="cpu")
    assert g.device.type == "cuda" and g.masks.is_cuda
    for name in BlockMask._LIST_NAMES + ("masks",):
        assert torch.equal(getattr(g, name).cpu(), getattr(c, name)), name
    assert torch.equal(g.to("cpu").to_dense(), c.to_dense())
    check_contract(g, dense_of(fn, 1, 1, 300, 300))


def test_check_compatible():
    bm = make(M.causal(), None, 4, 33, 50)
    q, k = torch.zeros(2, 4, 33, 8), torch.zeros(2, 2, 50, 8)  # GQA: the mask's H counts query heads
    bm.check_compatible(q, k)
    make(M.causal(), 2, None, 33, 50).check_compatible(q, k)
    with pytest.raises(ValueError, match="q_len=33"):
        bm.check_compatible(torch.zeros(2, 4, 34, 8), k)
    with pytest.raises(ValueError, match="kv_len=50"):
        bm.check_compatible(q, torch.zeros(2, 2, 49, 8))
    with pytest.raises(ValueError, match="H=4"):
        bm.check_compatible(torch.zeros(2, 8, 33, 8), k)
    with pytest.raises(ValueError, match="B=3"):
        make(M.causal(), 3, None, 33, 50).check_compatible(q, k)
    with pytest.raises(ValueError):
        bm.check_compatible(torch.zeros(33, 8), k)


def test_low_level_constructor_rebuilds_state():
    dense = torch.rand(2, 1, 70, 45) < 0.5
    dense[..., :32, :32] = True
    ref = make(lambda b, h, q, k: dense[b, h, q, k], 2, None, 70, 45)
    kw = {n: getattr(ref, n).clone() for n in BlockMask._LIST_NAMES}
    bm = BlockMask(q_len=70, kv_len=45, bs_q=16, bs_k=16, masks=ref.masks.clone(), **kw)
    check_contract(bm, dense)  # to_dense / layout rebuilt from the forward lists (decoded by the value check)
    assert torch.equal(bm.block_state()[0], ref.block_state()[0])
    assert torch.equal(bm.block_state()[1], ref.block_state()[1])
    kw["kv_idx_full"] = kw["kv_idx_full"].long()
    with pytest.raises(ValueError, match="kv_idx_full"):
        BlockMask(q_len=70, kv_len=45, bs_q=16, bs_k=16, masks=ref.masks, **kw)


def test_public_exports():
    assert tileattn.BlockMask is BlockMask and tileattn.create_block_mask is create_block_mask
    assert tileattn.masks is M


# --------------------------------------------------------------------------------------------------
# plot script
# --------------------------------------------------------------------------------------------------
def _plot_module():
    spec = importlib.util.spec_from_file_location("plot_block_mask", os.path.join(ROOT, "scripts", "plot_block_mask.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_block_mask(tmp_path):
    mod = _plot_module()
    bm = make(M.document(torch.tensor([0] * 30 + [1] * 40), causal=True), None, 2, 70, 70)
    p = mod.plot_block_mask(bm, str(tmp_path / "m.png"), h=1)
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        mod.plot_block_mask(bm, str(tmp_path / "x.png"), b=1)
    assert mod.main(["--mask", "random", "--len", "200", "--block-size", "32", "--out", str(tmp_path / "r.png")]) == 0
    assert os.path.getsize(tmp_path / "r.png") > 1000


def test_per_batch_predicates_need_their_batch_size():
    """(B, N) document ids / (B,) prefix lengths with B=None would silently use batch 0: refused."""
    import tileattn
    from tileattn import masks as M

    ids = torch.tensor([[0] * 20 + [1] * 12, [0] * 8 + [1] * 24])
    with pytest.raises(ValueError, match="B=2"):
        tileattn.create_block_mask(M.document(ids), None, None, 32, 32, block_size=16)
    with pytest.raises(ValueError, match="B=2"):
        tileattn.create_block_mask(M.prefix_lm(torch.tensor([3, 9])), None, None, 32, 32, block_size=16)
    with pytest.raises(ValueError, match="cover 16 tokens"):
        tileattn.create_block_mask(M.document(torch.zeros(16, dtype=torch.long)), None, None, 32, 32, block_size=16)
    bm = tileattn.create_block_mask(M.document(ids), 2, None, 32, 32, block_size=16)
    assert bm.B == 2
