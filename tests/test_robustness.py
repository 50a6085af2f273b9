"""Hardening against hand-built inputs and torch corner cases (issue 12): BlockMask list values, SDPA with
torch's CausalBias, MHA's is_causal hint, bounded caches, the decay guard, clearer errors, NaN propagation,
thread safety on GPU."""
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import tileattn
from tileattn import BlockMask, masks as M
from helpers import DEVICE, ON_GPU, randn


# --------------------------------------------------------------------------------------------------
# 1. BlockMask list values
# --------------------------------------------------------------------------------------------------
def _lists(bm):
    return {n: getattr(bm, n).clone() for n in BlockMask._LIST_NAMES}


def _build(bm, kw, masks=None):
    return BlockMask(q_len=bm.q_len, kv_len=bm.kv_len, bs_q=bm.bs_q, bs_k=bm.bs_k,
                     masks=bm.masks if masks is None else masks, **kw)


def test_issue_repro_raises_naming_the_list():
    bm = tileattn.create_block_mask(M.causal(), None, None, 32, 32, block_size=16, device=DEVICE)
    kw = _lists(bm)
    kw["kv_num_full"][:] = 50
    with pytest.raises(ValueError, match=r"kv_num_full must hold counts in \[0, 2\]; got 50"):
        _build(bm, kw)


@pytest.fixture(scope="module")
def rich_mask():
    """Full, partial (several distinct element masks) and empty blocks, B = 2."""
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 1, 40, 56, generator=g) < 0.6
    dense[:, :, :16, :16] = True
    dense[:, :, 16:32, 32:48] = False
    d = dense.to(DEVICE)
    bm = tileattn.create_block_mask(lambda b, h, q, k: d[b, h, q, k], 2, None, 40, 56, block_size=16, device=DEVICE)
    assert bm.num_full and bm.num_partial and bm.masks.shape[0] >= 2 and bm.density < 1
    return bm


def _first(num):
    """Index of the first row with a nonempty list."""
    return tuple(int(x) for x in torch.nonzero(num)[0])


def _set(t, idx, val):
    t[idx] = val


CORRUPTIONS = {
    # counts
    "count_above": (lambda kw, bm: kw["kv_num_part"].fill_(bm.num_kv_blocks + 1), "kv_num_part must hold counts"),
    "count_negative": (lambda kw, bm: _set(kw["q_num_full"], (0, 0, 0), -1), "q_num_full must hold counts"),
    # indices
    "index_above": (lambda kw, bm: _set(kw["kv_idx_full"], _first(kw["kv_num_full"]) + (0,), bm.num_kv_blocks),
                    "kv_idx_full must hold block indices"),
    "index_negative": (lambda kw, bm: _set(kw["kv_idx_part"], _first(kw["kv_num_part"]) + (0,), -1),
                       "kv_idx_part must hold block indices"),
    "index_above_transposed": (lambda kw, bm: _set(kw["q_idx_part"], _first(kw["q_num_part"]) + (0,), 99),
                               "q_idx_part must hold block indices"),
    # duplicates: a block listed twice in a row, or both full and partial
    "duplicate": (lambda kw, bm: _dup(kw, "kv_num_part", "kv_idx_part"), "kv_idx_full / kv_idx_part must list each block"),
    "full_and_partial": (lambda kw, bm: _full_and_part(kw), "kv_idx_full / kv_idx_part must list each block"),
    # mask ids
    "mask_id_above": (lambda kw, bm: _set(kw["kv_mask_id_part"], _first(kw["kv_num_part"]) + (0,), bm.masks.shape[0]),
                      "kv_mask_id_part must hold mask ids"),
    "mask_id_negative": (lambda kw, bm: _set(kw["q_mask_id_part"], _first(kw["q_num_part"]) + (0,), -3),
                         "q_mask_id_part must hold mask ids"),
    # forward / transposed disagreement
    "transposed_missing_block": (lambda kw, bm: _set(kw["q_num_full"], _first(kw["q_num_full"]), 0),
                                 "forward lists .* and the transposed lists"),
    "transposed_other_mask": (lambda kw, bm: _other_mask(kw, bm), "forward lists .* and the transposed lists"),
}


def _dup(kw, num_name, idx_name):
    """Make a row with >= 2 entries list its first block twice."""
    num, idx = kw[num_name], kw[idx_name]
    pos = tuple(int(x) for x in torch.nonzero(num >= 2)[0])
    idx[pos + (1,)] = idx[pos + (0,)]


def _full_and_part(kw):
    """Append a row's first full block to its partial list (count stays within nKB)."""
    pos = tuple(int(x) for x in torch.nonzero((kw["kv_num_full"] > 0) & (kw["kv_num_part"] < kw["kv_idx_part"].shape[-1]))[0])
    n = int(kw["kv_num_part"][pos])
    kw["kv_idx_part"][pos + (n,)] = kw["kv_idx_full"][pos + (0,)]
    kw["kv_num_part"][pos] += 1


def _other_mask(kw, bm):
    pos = _first(kw["q_num_part"]) + (0,)
    kw["q_mask_id_part"][pos] = (kw["q_mask_id_part"][pos] + 1) % bm.masks.shape[0]


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_every_list_corruption_is_caught(rich_mask, kind):
    corrupt, msg = CORRUPTIONS[kind]
    kw = _lists(rich_mask)
    _build(rich_mask, kw)  # the untouched lists are accepted
    corrupt(kw, rich_mask)
    with pytest.raises(ValueError, match=msg):
        _build(rich_mask, kw)


def test_valid_hand_built_lists_run_like_the_original(rich_mask):
    bm = _build(rich_mask, _lists(rich_mask))
    assert torch.equal(bm.to_dense(), rich_mask.to_dense())
    q, k, v = (randn(2, 2, n, 16, dtype=torch.float32) for n in (40, 56, 56))
    assert torch.equal(tileattn.attention(q, k, v, block_mask=bm), tileattn.attention(q, k, v, block_mask=rich_mask))


def test_internal_constructors_skip_the_check(monkeypatch):
    calls = []
    monkeypatch.setattr(BlockMask, "_check_lists", lambda self: calls.append(1) or self.block_state())
    bm = tileattn.create_block_mask(M.causal(), None, None, 64, 64, block_size=16, device=DEVICE)
    bm = tileattn.BlockMask.from_layout(torch.ones(4, 4, dtype=torch.bool, device=DEVICE), block_size=16) & bm
    assert calls == []


def test_meta_device_block_masks_are_rejected():
    with pytest.raises(ValueError, match="meta"):
        tileattn.create_block_mask(M.causal(), None, None, 32, 32, block_size=16, device="meta")
    with pytest.raises(ValueError, match="meta"):
        tileattn.BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool, device="meta"), block_size=16)


# --------------------------------------------------------------------------------------------------
# 4. folded-window cache stays bounded
# --------------------------------------------------------------------------------------------------
def test_folded_window_cache_is_bounded():
    from tileattn.attention import _FOLD_CACHE_SIZE, _prepare_block_mask

    bm = tileattn.create_block_mask(M.causal(), None, None, 48, 48, block_size=16, device=DEVICE)
    q = randn(1, 1, 48, 16, dtype=torch.float32)
    for w in range(200):
        _prepare_block_mask(bm, q, q, w, -1)
        assert len(bm._tileattn_folded) <= _FOLD_CACHE_SIZE
    assert len(bm._tileattn_folded) == _FOLD_CACHE_SIZE
    recent = _prepare_block_mask(bm, q, q, 199, -1)
    assert _prepare_block_mask(bm, q, q, 199, -1) is recent  # a hit reuses the folded mask
    out = tileattn.attention(q, q, q, block_mask=bm, window=(5, -1))
    ref = tileattn.attention(q, q, q, causal=True, window=(5, -1))
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------------
# 2. SDPA with torch's CausalBias
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(5, 19), (19, 5), (12, 12)])
def test_sdpa_causal_bias_matches_torch(variant, L, S):
    from torch.nn.attention import bias as tb

    make = getattr(tb, f"causal_{variant}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns for lower-right with L > S
        bias = make(L, S)
    x = [torch.randn(2, 3, n, d, dtype=torch.float64, device=DEVICE) for n, d in ((L, 16), (S, 16), (S, 8))]
    ours_in = [t.float().requires_grad_() for t in x]
    ref_in = [t.clone().requires_grad_() for t in x]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tileattn.scaled_dot_product_attention(*ours_in, attn_mask=bias)
        ref = F.scaled_dot_product_attention(*ref_in, attn_mask=bias)
    do = torch.randn_like(ref)
    out.backward(do.float())
    ref.backward(do)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_sdpa_causal_bias_errors():
    from torch.nn.attention.bias import causal_upper_left

    q = randn(1, 1, 4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="is_causal"):
        tileattn.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(4, 4), is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias was built for .* \(4, 4\)"):
        tileattn.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 5))


class _LoggingMask(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (it only records what torch dispatched)."""
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_sdpa_unknown_dispatching_subclass_goes_to_torch():
    q = randn(1, 2, 6, 16, dtype=torch.float32)
    mask = (torch.rand(6, 6, device=DEVICE) < 0.7) | torch.eye(6, dtype=torch.bool, device=DEVICE)
    sub = mask.as_subclass(_LoggingMask)
    _LoggingMask.seen.clear()
    with pytest.warns(UserWarning, match="_LoggingMask"):
        out = tileattn.scaled_dot_product_attention(q, q, q, attn_mask=sub)
    assert "scaled_dot_product_attention" in _LoggingMask.seen  # torch dispatched it, we did not read it
    torch.testing.assert_close(out.as_subclass(torch.Tensor), F.scaled_dot_product_attention(q, q, q, attn_mask=mask))


# --------------------------------------------------------------------------------------------------
# 3. nn.MultiheadAttention: the is_causal hint replaces attn_mask like torch
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_shape", [(3, 3), (7, 5, 5)])
def test_mha_causal_hint_ignores_mask_shape(mask_shape):
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    ours = tileattn.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 16, device=DEVICE)
    mask = torch.zeros(mask_shape, dtype=torch.bool, device=DEVICE)  # grad mode on: torch's slow path
    r, _ = ref(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
    o, _ = ours(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
    torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask must be 2-d or 3-d"):
        ours(x, x, x, attn_mask=torch.zeros(4, dtype=torch.bool, device=DEVICE), need_weights=False, is_causal=True)
    with pytest.raises(ValueError, match="2-d attn_mask must have shape"):  # without the hint the shape matters
        ours(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool, device=DEVICE), need_weights=False)


# --------------------------------------------------------------------------------------------------
# 5. the decay guard cannot be bypassed by writes the version counter misses
# --------------------------------------------------------------------------------------------------
def test_decay_written_through_data_is_caught():
    q, k, v = (randn(1, 2, 8, 16, dtype=torch.float32) for _ in range(3))
    rates = torch.tensor([0.1, 0.2], device=DEVICE)
    tileattn.lightning_attention(q, k, v, rates)
    rates.data[0] = -5.0  # no version bump
    if not ON_GPU:  # CPU: checked on every call
        with pytest.raises(ValueError, match="decay must hold finite rates"):
            tileattn.lightning_attention(q, k, v, rates)


def test_decay_device_side_guard_gives_nan_not_garbage(monkeypatch):
    """Where the eager check cannot run (no sync allowed, or a cached CUDA check), an invalid rate makes its
    head's output NaN instead of huge finite numbers; the other heads are untouched."""
    import tileattn.lightning as L

    monkeypatch.setattr(L, "_can_sync", lambda: False)
    q, k, v = (randn(1, 2, 40, 16, dtype=torch.float32) for _ in range(3))
    rates = torch.tensor([-5.0, 0.2], device=DEVICE)
    out = tileattn.lightning_attention(q, k, v, rates)
    assert torch.isnan(out[:, 0]).all() and torch.isfinite(out[:, 1]).all()
    o1, s1 = tileattn.lightning_decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, rates)
    assert torch.isnan(o1[:, 0]).all() and torch.isfinite(o1[:, 1]).all()


# --------------------------------------------------------------------------------------------------
# 6. clearer errors and documented behaviour
# --------------------------------------------------------------------------------------------------
def test_attention_weights_argument_errors():
    q = randn(1, 2, 8, 16, dtype=torch.float32)
    out, lse = tileattn.attention(q, q, q, return_lse=True)
    with pytest.raises(TypeError, match="rows must be an int, a slice"):
        tileattn.attention_weights(q, q, lse, rows=1.5)
    with pytest.raises(TypeError, match="heads must be an int, a slice"):
        tileattn.attention_weights(q, q, lse, heads="0")
    with pytest.raises(TypeError, match="lse must be a floating-point tensor"):
        tileattn.attention_weights(q, q, lse.long())
    bad = lse.clone()
    bad[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="lse must hold log-sum-exps"):
        tileattn.attention_weights(q, q, bad)


def test_longformer_global_index_outside_the_sequence():
    fn = M.longformer(2, [0, 40])
    tileattn.create_block_mask(fn, None, None, 64, 64, block_size=16, device=DEVICE)
    for f in (fn, M.and_masks(M.causal(), fn), M.or_masks(fn)):
        with pytest.raises(ValueError, match="token position 40"):
            tileattn.create_block_mask(f, None, None, 32, 32, block_size=16, device=DEVICE)


def test_bool_flags_are_checked_alike():
    q = randn(1, 1, 8, 16, dtype=torch.float32)
    for kw in ({"return_lse": 1}, {"causal": 1}):
        with pytest.raises(TypeError, match="must be a bool"):
            tileattn.attention(q, q, q, **kw)
    with pytest.raises(TypeError, match="output_final_state must be a bool"):
        tileattn.lightning_attention(q, q, q, output_final_state=1)


def test_double_backward_says_unsupported():
    q, k, v = (randn(1, 2, 8, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    for fn in (lambda: tileattn.attention(q, k, v, causal=True), lambda: tileattn.lightning_attention(q, k, v)):
        (g,) = torch.autograd.grad(fn().square().sum(), q, create_graph=True)  # first order still works
        ref = torch.autograd.grad(fn().square().sum(), q)[0]
        torch.testing.assert_close(g, ref)
        with pytest.raises(NotImplementedError, match="double backward .* is not supported"):
            g.sum().backward()


def test_window_accepts_0d_integer_tensors():
    q, k, v = (randn(1, 2, 20, 16, dtype=torch.float32) for _ in range(3))
    ref = tileattn.attention(q, k, v, window=(3, 0))
    out = tileattn.attention(q, k, v, window=(torch.tensor(3), torch.tensor(0, dtype=torch.int32)))
    assert torch.equal(out, ref)
    with pytest.raises(TypeError, match="window must hold ints"):
        tileattn.attention(q, k, v, window=(torch.tensor(3.0), 0))


def test_masks_causal_alignment_is_as_documented():
    """README: top-left (j <= i) without lengths, bottom-right with them."""
    i, j = torch.arange(2)[:, None], torch.arange(4)[None, :]
    z = torch.zeros(())
    assert torch.equal(M.causal()(z, z, i, j), j <= i)
    assert torch.equal(M.causal(2, 4)(z, z, i, j), j <= i + 2)


def test_nonfinite_inputs_propagate_as_documented():
    """README: NaN in query row i -> row i (out and LSE); in key j -> the rows that see key j; rows that do
    not see it stay finite; LSE ignores v."""
    q, k, v = (randn(1, 1, 48, 16, dtype=torch.float32) for _ in range(3))
    qn = q.clone()
    qn[0, 0, 5] = float("nan")
    out, lse = tileattn.attention(qn, k, v, causal=True, return_lse=True)
    bad = torch.isnan(out[0, 0]).any(-1)
    assert bad.nonzero().flatten().tolist() == [5] and torch.isnan(lse[0, 0]).nonzero().flatten().tolist() == [5]
    kn = k.clone()
    kn[0, 0, 20] = float("inf")
    out, lse = tileattn.attention(q, kn, v, causal=True, return_lse=True)
    assert torch.isfinite(out[0, 0, :20]).all() and torch.isnan(out[0, 0, 20:]).any(-1).all()
    vn = v.clone()
    vn[0, 0, 20] = float("nan")
    out, lse = tileattn.attention(q, k, vn, causal=True, return_lse=True)
    assert torch.isfinite(lse).all() and torch.isnan(out[0, 0, 20:]).all(-1).all()


# --------------------------------------------------------------------------------------------------
# 7. thread safety of GPU launches (the interpreter's global state is not thread-safe: documented)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_concurrent_gpu_launches_from_threads():
    torch.manual_seed(0)
    cases = [tuple(randn(2, 4, n, 64, dtype=torch.float16) for _ in range(3)) for n in (128, 257, 512, 1000)]
    expected = [tileattn.attention(*c, causal=bool(i % 2)) for i, c in enumerate(cases)]
    torch.cuda.synchronize()
    results, errors = {}, []

    def worker(t):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for r in range(20):
                    i = (t + r) % len(cases)
                    results[(t, r)] = (i, tileattn.attention(*cases[i], causal=bool(i % 2)))
            stream.synchronize()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, out in results.values():
        assert torch.equal(out, expected[i])


def test_per_token_decay_device_side_guard_gives_nan_not_garbage(monkeypatch):
    """As above for a per-token log-decay g: an invalid value (here positive, where the CPU check is skipped)
    makes its head's outputs NaN from that token on, in the chunked op and in the decode step."""
    import tileattn.lightning as L

    monkeypatch.setattr(L, "_can_sync", lambda: False)
    q, k, v = (randn(1, 2, 40, 16, dtype=torch.float32) for _ in range(3))
    g = -torch.rand(1, 2, 40, device=DEVICE)
    g[0, 0, 5] = 3.0
    out = tileattn.lightning_attention(q, k, v, g=g)
    assert torch.isnan(out[:, 0, 5:]).all() and torch.isfinite(out[:, 0, :5]).all() and torch.isfinite(out[:, 1]).all()
    o1, _ = tileattn.lightning_decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, g=g[:, :, 5:6])
    assert torch.isnan(o1[:, 0]).all() and torch.isfinite(o1[:, 1]).all()
