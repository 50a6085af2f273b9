"""Block-sparse attention through the tile engine: every ready-made mask, random layouts, empty rows,
B/H broadcast, GQA, lengths that are not block multiples, and proof that empty blocks are skipped."""
import pytest
import torch

import tileattn
from tileattn import masks
from tileattn.kernels.attention import INTERPRET_CONFIG, attention_forward
from tileattn.kernels.utils import interpreter_enabled
from helpers import DEVICE, run_case

BS = 32  # small blocks keep the interpreter fast while still giving several blocks per row


def _bm(fn, B, H, nq, nk, block_size=BS):
    return tileattn.create_block_mask(fn, B, H, nq, nk, block_size=block_size, device=DEVICE)


MASKS = [
    pytest.param(lambda nq, nk: masks.causal(nq, nk), id="causal"),
    pytest.param(lambda nq, nk: masks.sliding_window(20, 0, nq, nk), id="window"),
    pytest.param(lambda nq, nk: masks.document(torch.tensor([0] * 30 + [1] * 50 + [2] * (nk - 80)), causal=True),
                 id="document"),
    pytest.param(lambda nq, nk: masks.prefix_lm(40), id="prefix-lm"),
    pytest.param(lambda nq, nk: masks.dilated(3), id="dilated"),
    pytest.param(lambda nq, nk: masks.strided(16), id="strided"),
    pytest.param(lambda nq, nk: masks.longformer(8, [0, 70]), id="longformer"),
    pytest.param(lambda nq, nk: masks.bigbird(8, 1, 1, BS, seed=0, seq_len=nk), id="bigbird"),
]


@pytest.mark.parametrize("make", MASKS)
def test_ready_made_masks(make):
    n = 130  # not a multiple of the block
    bm = _bm(make(n, n), None, None, n, n)
    run_case(1, 2, 2, n, n, 32, 32, torch.float16, block_mask=bm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_random_layout_per_head_gqa(dtype):
    g = torch.Generator().manual_seed(1)
    nq, nk = 100, 150
    layout = torch.rand(2, 4, -(-nq // BS), -(-nk // BS), generator=g) < 0.5
    layout[0, 0, 1] = False  # a query block with no visible key block: rows give 0 / -inf
    bm = tileattn.BlockMask.from_layout(layout.to(DEVICE), block_size=BS, q_len=nq, kv_len=nk)
    out, lse = run_case(2, 4, 2, nq, nk, 48, 24, dtype, block_mask=bm)
    assert torch.all(out[0, 0, BS:2 * BS] == 0) and torch.all(torch.isneginf(lse[0, 0, BS:2 * BS]))


def test_rectangular_blocks_and_broadcast_batch():
    nq, nk = 70, 90
    fn = masks.or_masks(masks.sliding_window(10, 10, nq, nk), lambda b, h, q, k: (q + k + h) % 7 == 0)
    bm = _bm(fn, None, 2, nq, nk, block_size=(16, 32))
    run_case(2, 2, 1, nq, nk, 16, 16, torch.float32, block_mask=bm)


@pytest.mark.parametrize("causal,window", [(True, None), (False, (16, 8))], ids=["causal", "window"])
def test_block_mask_combined_with_causal_or_window(causal, window):
    n = 96
    bm = _bm(masks.document(torch.tensor([0] * 40 + [1] * 56)), None, None, n, n)
    run_case(1, 2, 2, n, n, 32, 32, torch.float16, block_mask=bm, causal=causal, window=window)


def test_block_mask_validation():
    q = torch.randn(1, 2, 64, 16, device=DEVICE)
    bm = _bm(masks.causal(), None, None, 64, 64)
    with pytest.raises(ValueError):
        tileattn.attention(q, q[:, :, :32], q[:, :, :32], block_mask=bm)  # kv_len differs
    bm3 = _bm(masks.causal(), None, 3, 64, 64)
    with pytest.raises(ValueError):
        tileattn.attention(q, q, q, block_mask=bm3)  # 3 mask heads vs 2 query heads


@pytest.mark.skipif(not interpreter_enabled(), reason="the visit counter is an interpreter-build debug option")
@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.0])
def test_kernel_skips_empty_blocks(density):
    """The forward visits exactly the listed blocks: work is proportional to density, not dense."""
    n, bs = 256, 64
    nb = n // bs
    g = torch.Generator().manual_seed(0)
    layout = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    k = int(round(density * nb * nb))
    layout.view(-1)[torch.randperm(nb * nb, generator=g)[:k]] = True
    bm = tileattn.BlockMask.from_layout(layout.to(DEVICE), block_size=bs)
    q, kk, v = (torch.randn(1, 1, n, 16, device=DEVICE) for _ in range(3))
    _, _, visits = attention_forward(q, kk, v, scale=0.25, sparse=[getattr(bm, f) for f in (
        "kv_num_full", "kv_idx_full", "kv_num_part", "kv_idx_part", "kv_mask_id_part",
        "q_num_full", "q_idx_full", "q_num_part", "q_idx_part", "q_mask_id_part", "masks")], count_visits=True)
    bm_tile, bn_tile = INTERPRET_CONFIG[0], INTERPRET_CONFIG[1]
    # every query tile visits (blocks in its row) x (key tiles per block)
    assert int(visits[..., 1].sum()) == 0  # from_layout blocks inside the lengths are full: no masked step
    visits = visits.sum(-1)
    per_block_row = layout[0, 0].sum(-1).repeat_interleave(bs // bm_tile)
    assert visits.flatten().tolist() == (per_block_row * (bs // bn_tile)).tolist()
    assert int(visits.sum()) == bm.visited_blocks() * (bs // bm_tile) * (bs // bn_tile)
    dense_visits = (n // bm_tile) * (n // bn_tile)
    assert int(visits.sum()) == round(density * dense_visits)


@pytest.mark.skipif(not interpreter_enabled(), reason="the visit counter is an interpreter-build debug option")
def test_causal_and_window_skip_tiles():
    """Causal / window (no block mask) also visit only tiles that intersect the band."""
    n = 256
    q = torch.randn(1, 1, n, 16, device=DEVICE)
    bm_tile, bn_tile = INTERPRET_CONFIG[0], INTERPRET_CONFIG[1]
    _, _, dense = attention_forward(q, q, q, scale=0.25, count_visits=True)
    _, _, causal = attention_forward(q, q, q, scale=0.25, right=0, count_visits=True)
    _, _, window = attention_forward(q, q, q, scale=0.25, left=32, right=0, count_visits=True)
    dense, causal, window = dense.sum(-1), causal.sum(-1), window.sum(-1)
    nt = n // bn_tile
    assert int(dense.sum()) == (n // bm_tile) * nt
    assert int(causal.sum()) == sum(i + 1 for i in range(n // bm_tile)) * (bm_tile // bn_tile)
    assert int(window.sum()) <= 3 * (n // bm_tile)
