"""Block-sparse attention masks: :class:`BlockMask`, :func:`create_block_mask`, ``BlockMask.from_layout``.

A :class:`BlockMask` describes a boolean attention mask of shape ``(B, H, q_len, kv_len)`` (True =
attend) at the granularity of ``(bs_q, bs_k)`` tiles. Every tile is classified as

- *empty*: no visible element; the kernels never visit it;
- *full*: every element visible and the tile lies entirely inside ``q_len x kv_len``; visited without an
  element mask;
- *partial*: everything else that is visible (including every visible tile that crosses the ragged end
  of ``q_len`` / ``kv_len``); visited with its element mask ``masks[mask_id]``.

Data contract (what the Triton kernels read; every index tensor is int32, contiguous, on the mask's
device; ``nQB = ceil(q_len / bs_q)``, ``nKB = ceil(kv_len / bs_k)``; ``B`` / ``H`` are 1 when the mask
broadcasts over them):

- forward lists per (b, h, query block): ``kv_num_full (B, H, nQB)``, ``kv_idx_full (B, H, nQB, nKB)``
  (the first ``kv_num_full`` entries are valid, ascending, the rest 0), ``kv_num_part``, ``kv_idx_part``
  and ``kv_mask_id_part (B, H, nQB, nKB)`` (index into ``masks``);
- transposed lists per (b, h, key block) for the backward: ``q_num_full (B, H, nKB)``,
  ``q_idx_full (B, H, nKB, nQB)``, ``q_num_part``, ``q_idx_part``, ``q_mask_id_part``;
- ``masks``: uint8 ``(M, bs_q, bs_k)``, contiguous, the deduplicated element masks of the partial blocks
  (1 = attend, 0 beyond q_len / kv_len); ``M >= 1`` (one all-zero mask when there is no partial block).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

__all__ = ["BlockMask", "create_block_mask"]

# Cap on the number of mask elements evaluated at once by create_block_mask (16M bools = 16 MiB).
_CHUNK_ELEMS = 1 << 24

_EMPTY, _PARTIAL, _FULL = 0, 1, 2

BlockSize = Union[int, Tuple[int, int]]


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _check_block_size(block_size) -> Tuple[int, int]:
    """Normalise ``block_size`` (int or ``(bs_q, bs_k)``) to two powers of two in [16, 256]."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise TypeError(f"block_size must be an int or a (bs_q, bs_k) pair, got {block_size!r}")
        sizes = tuple(block_size)
    else:
        sizes = (block_size, block_size)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"block_size must be an int or a (bs_q, bs_k) pair of ints, got {block_size!r}")
        if s < 16 or s > 256 or (s & (s - 1)) != 0:
            raise ValueError(f"block sizes must be powers of two in [16, 256], got {block_size!r}")
    return int(sizes[0]), int(sizes[1])


def _check_len(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def _check_bh(name: str, n) -> int:
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be a positive int or None (broadcast), got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1 or None (broadcast), got {n}")
    return int(n)


def _default_device(device) -> torch.device:
    """``device`` (default: CUDA when available, else CPU) in the canonical form tensors report
    (``cuda`` -> ``cuda:<current>``), so that device comparisons hold."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.empty(0, device=device).device
    _check_real_device(dev)
    return dev


# --------------------------------------------------------------------------------------------------
# deduplication of element masks
# --------------------------------------------------------------------------------------------------
_HASH_P = 2147483647  # 2^31 - 1


class _MaskTable:
    """Deduplicating store of (bs_q * bs_k)-bit element masks, kept bit-packed (bytes).

    ``add(bits)`` returns the id of each row, identical rows sharing one id and ids of earlier calls
    staying stable. Rows are matched by a two-part modular fingerprint (byte values < 2^8 times weights
    < 2^31 summed over <= 8192 bytes stay below 2^53, so there is no overflow), and every match is then
    verified byte for byte; should two different masks ever share a fingerprint, the table switches to
    exact (lexicographic ``torch.unique``) matching.
    """

    def __init__(self, nbits: int, device: torch.device):
        self.nbytes = nbits // 8
        self.device = device
        g = torch.Generator().manual_seed(0x5EED)
        self.weights = torch.randint(1, _HASH_P, (2, self.nbytes), generator=g, dtype=torch.int64).to(device)
        self.packed = torch.empty(0, self.nbytes, dtype=torch.uint8, device=device)  # (M, nbytes)
        self.keys = torch.empty(0, dtype=torch.int64, device=device)  # sorted fingerprints
        self.key_ids = torch.empty(0, dtype=torch.int64, device=device)  # id of each sorted key
        self.exact = False

    def __len__(self) -> int:
        return self.packed.shape[0]

    @staticmethod
    def pack(bits: torch.Tensor) -> torch.Tensor:
        """(P, nbits) bool -> (P, nbits // 8) uint8, bit j of byte i is element 8 i + j."""
        p = bits.shape[0]
        shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
        return (bits.reshape(p, -1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        """(M, nbytes) uint8 -> (M, nbytes * 8) uint8 of 0/1."""
        shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
        return ((packed[:, :, None] >> shifts) & 1).reshape(packed.shape[0], -1)

    def _fingerprint(self, packed: torch.Tensor) -> torch.Tensor:
        x = packed.to(torch.int64)
        h1 = (x * self.weights[0]).sum(-1) % _HASH_P
        h2 = (x * self.weights[1]).sum(-1) % _HASH_P
        return h1 * _HASH_P + h2

    def add(self, bits: torch.Tensor) -> torch.Tensor:
        """bits: (P, nbits) bool. Returns (P,) int64 ids."""
        if bits.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        packed = self.pack(bits)
        if not self.exact:
            ids = self._add_hashed(packed)
            if ids is not None:
                return ids
            self.exact = True
        return self._add_exact(packed)

    def _add_hashed(self, packed: torch.Tensor) -> Optional[torch.Tensor]:
        p = packed.shape[0]
        fp = self._fingerprint(packed)
        ufp, inv = torch.unique(fp, return_inverse=True)
        rep = torch.full((ufp.shape[0],), p, dtype=torch.int64, device=packed.device)
        rep = rep.scatter_reduce(0, inv, torch.arange(p, device=packed.device), reduce="amin")
        upacked = packed[rep]
        if not torch.equal(packed, upacked[inv]):
            return None  # fingerprint collision inside this batch
        m = len(self)
        if m:
            pos = torch.searchsorted(self.keys, ufp).clamp_(max=m - 1)
            found = self.keys[pos] == ufp
            uid = torch.where(found, self.key_ids[pos], torch.full_like(pos, -1))
            if not torch.equal(self.packed[uid[found]], upacked[found]):
                return None  # collision with a stored mask
        else:
            found = torch.zeros_like(ufp, dtype=torch.bool)
            uid = torch.full_like(ufp, -1)
        new = ~found
        n_new = int(new.sum())
        if n_new:
            uid[new] = torch.arange(m, m + n_new, device=packed.device)
            self.packed = torch.cat([self.packed, upacked[new]])
            keys = torch.cat([self.keys, ufp[new]])
            key_ids = torch.cat([self.key_ids, uid[new]])
            order = torch.argsort(keys)
            self.keys, self.key_ids = keys[order], key_ids[order]
        return uid[inv]

    def _add_exact(self, packed: torch.Tensor) -> torch.Tensor:
        m = len(self)
        allp = torch.cat([self.packed, packed])
        uniq, inv = torch.unique(allp, dim=0, return_inverse=True)
        # stored rows are distinct, so they map to distinct unique rows: reuse their ids
        lut = torch.full((uniq.shape[0],), -1, dtype=torch.int64, device=packed.device)
        lut[inv[:m]] = torch.arange(m, device=packed.device)
        new_u = torch.nonzero(lut < 0).flatten()  # unique rows not stored yet (all from this batch)
        lut[new_u] = torch.arange(m, m + new_u.shape[0], device=packed.device)
        self.packed = torch.cat([self.packed, uniq[new_u]])
        return lut[inv[m:]]

    def masks(self, bs_q: int, bs_k: int) -> torch.Tensor:
        """The stored masks as contiguous uint8 (M, bs_q, bs_k); one all-zero mask if empty."""
        if len(self) == 0:
            return torch.zeros(1, bs_q, bs_k, dtype=torch.uint8, device=self.device)
        return self.unpack(self.packed).reshape(-1, bs_q, bs_k).contiguous()


# --------------------------------------------------------------------------------------------------
# list construction
# --------------------------------------------------------------------------------------------------
def _compact_lists(sel: torch.Tensor, aux: Optional[torch.Tensor] = None):
    """Per row of ``sel`` (..., R, C) bool: the count of True entries (..., R) and the ascending column
    indices of the True entries packed to the front of a (..., R, C) int32 tensor (rest 0); with
    ``aux`` (..., R, C) also ``aux`` gathered at those columns the same way. O(n): a running count
    gives each True entry its slot, written with duplicate-free index_put (deterministic)."""
    num = sel.sum(-1, dtype=torch.int32)
    where_true = torch.nonzero(sel)  # row-major: ascending columns within each row
    slot = (sel.cumsum(-1, dtype=torch.int32) - 1)[sel].long()
    lead = tuple(where_true[:, d] for d in range(sel.dim() - 1))
    col = where_true[:, -1]
    idx = torch.zeros(sel.shape, dtype=torch.int32, device=sel.device)
    idx[lead + (slot,)] = col.to(torch.int32)
    if aux is None:
        return num.contiguous(), idx
    vals = torch.zeros(sel.shape, dtype=torch.int32, device=sel.device)
    vals[lead + (slot,)] = aux[lead + (col,)].to(torch.int32)
    return num.contiguous(), idx, vals


def _canonical_masks(part: torch.Tensor, mask_id: torch.Tensor, masks: torch.Tensor):
    """Renumber the masks by first use in row-major (b, h, q block, kv block) order and drop unused ones,
    so that ids do not depend on how the construction was chunked. Returns ``(mask_id int32 (0 where
    not partial), masks (M >= 1, bs_q, bs_k))``."""
    dev = part.device
    ids = mask_id.long()[part]  # row-major order of the partial blocks
    m = masks.shape[0]
    if ids.numel() == 0:
        return torch.zeros(part.shape, dtype=torch.int32, device=dev), torch.zeros_like(masks[:1])
    big = ids.numel()
    first = torch.full((m,), big, dtype=torch.int64, device=dev)
    first = first.scatter_reduce(0, ids, torch.arange(big, device=dev), reduce="amin")
    order = torch.argsort(first)
    n_used = int((first < big).sum())
    order = order[:n_used]
    new_of_old = torch.zeros(m, dtype=torch.int64, device=dev)
    new_of_old[order] = torch.arange(n_used, device=dev)
    out_id = torch.zeros(part.shape, dtype=torch.int32, device=dev)
    out_id[part] = new_of_old[ids].to(torch.int32)
    return out_id, masks[order].contiguous()


def _bounds_mask(rows: int, cols: int, bs_q: int, bs_k: int, device) -> torch.Tensor:
    """(bs_q, bs_k) bool, True inside the first ``rows`` x ``cols`` elements."""
    r = torch.arange(bs_q, device=device)[:, None] < rows
    c = torch.arange(bs_k, device=device)[None, :] < cols
    return r & c


def _check_real_device(dev: torch.device) -> None:
    if dev.type == "meta":
        raise ValueError("a BlockMask needs a device that holds values (cpu / cuda), not 'meta': the kernels "
                         "read its lists; build it on the device of q")


def _decode_lists(lists, n_cols: int, names=None, n_masks: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block state ``(kind int8, mask_id int32)`` of shape (B, H, R, n_cols) from one list set
    ``(num_full, idx_full, num_part, idx_part, mask_id_part)`` (R rows of n_cols blocks). With ``names``
    (the lists' names) every value the kernels dereference is validated first, vectorised: counts in
    [0, n_cols], listed indices in [0, n_cols) and unique per row over both lists, mask ids in [0, n_masks)."""
    num_f, idx_f, num_p, idx_p, mid_p = lists
    dev = idx_f.device
    kind = torch.zeros(idx_f.shape, dtype=torch.int8, device=dev)
    mask_id = torch.zeros(idx_f.shape, dtype=torch.int32, device=dev)
    hits = torch.zeros(idx_f.shape, dtype=torch.int32, device=dev) if names else None
    slot = torch.arange(n_cols, device=dev)

    def fail(bad, vals, name, want, where):
        pos = torch.nonzero(bad)[0]
        raise ValueError(f"BlockMask.{name} must hold {want}; got {int(vals[tuple(pos)])} at "
                         f"{where(pos)} (build masks with create_block_mask / BlockMask.from_layout)")

    for k, (num, idx, val) in enumerate(((num_f, idx_f, _FULL), (num_p, idx_p, _PARTIAL))):
        if names:
            bad = (num < 0) | (num > n_cols)
            if bool(bad.any()):
                fail(bad, num, names[2 * k], f"counts in [0, {n_cols}]", lambda p: f"(b, h, row) = {tuple(int(x) for x in p)}")
        b, h, i, s = torch.nonzero(slot < num[..., None]).unbind(1)
        j = idx[b, h, i, s]
        if names:
            sel = torch.stack([b, h, i, s])
            where = lambda p: f"(b, h, row, slot) = {tuple(int(x) for x in sel[:, int(p[0])])}"  # noqa: E731
            bad = (j < 0) | (j >= n_cols)
            if bool(bad.any()):
                fail(bad, j, names[2 * k + 1], f"block indices in [0, {n_cols}) in its first count entries", where)
            if val == _PARTIAL:
                m = mid_p[b, h, i, s]
                bad = (m < 0) | (m >= n_masks)
                if bool(bad.any()):
                    fail(bad, m, names[4], f"mask ids in [0, M={n_masks})", where)
            hits.index_put_((b, h, i, j.long()), torch.ones_like(j), accumulate=True)
        j = j.long()
        kind[b, h, i, j] = val
        if val == _PARTIAL:
            mask_id[b, h, i, j] = mid_p[b, h, i, s]
    if names:
        bad = hits > 1
        if bool(bad.any()):
            pos = tuple(int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"BlockMask.{names[1]} / {names[3]} must list each block at most once per row (no "
                             f"duplicates, no block both full and partial); (b, h, row, block) = {pos} is listed "
                             f"{int(hits[pos])} times (build masks with create_block_mask / BlockMask.from_layout)")
    return kind, mask_id


class BlockMask:
    """Block-sparse attention mask (see the module docstring for the data contract).

    Build one with :func:`create_block_mask` (from a predicate) or :meth:`BlockMask.from_layout` (from a
    boolean block layout); combine with ``&`` / ``|``; pass it as ``tileattn.attention(..., block_mask=bm)``.

    Attributes:
        B, H: batch and (query) head extents of the mask, 1 where it broadcasts.
        q_len, kv_len: the sequence lengths the mask was built for.
        bs_q, bs_k: block (tile) sizes; ``num_q_blocks = ceil(q_len / bs_q)``,
            ``num_kv_blocks = ceil(kv_len / bs_k)``.
        kv_num_full, kv_idx_full, kv_num_part, kv_idx_part, kv_mask_id_part: forward lists.
        q_num_full, q_idx_full, q_num_part, q_idx_part, q_mask_id_part: transposed (backward) lists.
        masks: uint8 (M, bs_q, bs_k) deduplicated element masks of the partial blocks.
    """

    _LIST_NAMES = (
        "kv_num_full", "kv_idx_full", "kv_num_part", "kv_idx_part", "kv_mask_id_part",
        "q_num_full", "q_idx_full", "q_num_part", "q_idx_part", "q_mask_id_part",
    )

    def __init__(
        self,
        *,
        q_len: int,
        kv_len: int,
        bs_q: int,
        bs_k: int,
        masks: torch.Tensor,
        kv_num_full: torch.Tensor,
        kv_idx_full: torch.Tensor,
        kv_num_part: torch.Tensor,
        kv_idx_part: torch.Tensor,
        kv_mask_id_part: torch.Tensor,
        q_num_full: torch.Tensor,
        q_idx_full: torch.Tensor,
        q_num_part: torch.Tensor,
        q_idx_part: torch.Tensor,
        q_mask_id_part: torch.Tensor,
        _trusted: bool = False,
    ):
        """Low-level constructor from already-built lists. Checks shapes, dtypes and devices, and every
        value a kernel dereferences (counts in ``[0, nKB]`` / ``[0, nQB]``, block indices in range and
        unique per row across the full and partial lists, mask ids in ``[0, M)``, forward and transposed
        lists describing the same blocks and mask ids), raising ``ValueError`` naming the offending list.
        The check is vectorised but reads every list once and syncs with the device (cost
        O(B * H * nQB * nKB)); :func:`create_block_mask` and :meth:`from_layout` build valid lists by
        construction and skip it (``_trusted`` is internal). The lists are not re-checked later: do not
        modify them in place after construction."""
        self.q_len, self.kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
        self.bs_q, self.bs_k = _check_block_size((bs_q, bs_k))
        self.num_q_blocks = -(-self.q_len // self.bs_q)
        self.num_kv_blocks = -(-self.kv_len // self.bs_k)
        self.kv_num_full, self.kv_idx_full = kv_num_full, kv_idx_full
        self.kv_num_part, self.kv_idx_part, self.kv_mask_id_part = kv_num_part, kv_idx_part, kv_mask_id_part
        self.q_num_full, self.q_idx_full = q_num_full, q_idx_full
        self.q_num_part, self.q_idx_part, self.q_mask_id_part = q_num_part, q_idx_part, q_mask_id_part
        self.masks = masks
        if kv_num_full.dim() != 3:
            raise ValueError(f"kv_num_full must be (B, H, num_q_blocks), got shape {tuple(kv_num_full.shape)}")
        self.B, self.H = int(kv_num_full.shape[0]), int(kv_num_full.shape[1])
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        want = {
            "kv_num_full": (self.B, self.H, nq), "kv_idx_full": (self.B, self.H, nq, nk),
            "kv_num_part": (self.B, self.H, nq), "kv_idx_part": (self.B, self.H, nq, nk),
            "kv_mask_id_part": (self.B, self.H, nq, nk),
            "q_num_full": (self.B, self.H, nk), "q_idx_full": (self.B, self.H, nk, nq),
            "q_num_part": (self.B, self.H, nk), "q_idx_part": (self.B, self.H, nk, nq),
            "q_mask_id_part": (self.B, self.H, nk, nq),
        }
        dev = kv_num_full.device
        for name, shape in want.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != shape:
                got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"BlockMask.{name} must be an int32 tensor of shape {shape}, got {got}")
            if t.device != dev or not t.is_contiguous():
                raise ValueError(f"BlockMask.{name} must be contiguous and on {dev}")
        if (not isinstance(masks, torch.Tensor) or masks.dtype != torch.uint8 or masks.dim() != 3
                or tuple(masks.shape[1:]) != (self.bs_q, self.bs_k) or masks.shape[0] < 1):
            raise ValueError(f"BlockMask.masks must be uint8 (M >= 1, {self.bs_q}, {self.bs_k})")
        if masks.device != dev or not masks.is_contiguous():
            raise ValueError(f"BlockMask.masks must be contiguous and on {dev}")
        _check_real_device(dev)
        self._kind_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if not _trusted:
            self._kind_cache = self._check_lists()

    def _check_lists(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validate the values of both list sets (see ``__init__``); returns the block state."""
        names = self._LIST_NAMES
        m = self.masks.shape[0]
        fwd = _decode_lists([getattr(self, n) for n in names[:5]], self.num_kv_blocks, names[:5], m)
        bwd = _decode_lists([getattr(self, n) for n in names[5:]], self.num_q_blocks, names[5:], m)
        kind_t, mid_t = (t.transpose(-1, -2) for t in bwd)
        bad = (fwd[0] != kind_t) | ((fwd[0] == _PARTIAL) & (fwd[1] != mid_t))
        if bool(bad.any()):
            b, h, i, j = (int(x) for x in torch.nonzero(bad)[0])
            what = {_EMPTY: "empty", _FULL: "full", _PARTIAL: "partial"}
            desc = [f"{what[int(kd[b, h, i, j])]}" + (f" (mask id {int(md[b, h, i, j])})"
                    if int(kd[b, h, i, j]) == _PARTIAL else "") for kd, md in (fwd, (kind_t, mid_t))]
            raise ValueError(
                f"BlockMask: the forward lists (kv_*) and the transposed lists (q_*) must describe the same "
                f"blocks; at (b={b}, h={h}, q block {i}, kv block {j}) the forward lists say {desc[0]}, the "
                f"transposed lists say {desc[1]} (build masks with create_block_mask / BlockMask.from_layout)")
        return fwd

    # ---------------------------------------------------------------------------------- builders
    @classmethod
    def _from_block_state(cls, kind: torch.Tensor, mask_id: torch.Tensor, masks: torch.Tensor,
                          q_len: int, kv_len: int, bs_q: int, bs_k: int) -> "BlockMask":
        """kind: (B, H, nQB, nKB) int (0 empty, 1 partial, 2 full); mask_id: same shape, the index into
        ``masks`` of each partial block (ignored elsewhere)."""
        full, part = kind == _FULL, kind == _PARTIAL
        mask_id, masks = _canonical_masks(part, mask_id, masks)
        kv_num_full, kv_idx_full = _compact_lists(full)
        kv_num_part, kv_idx_part, kv_mask_id_part = _compact_lists(part, mask_id)
        full_t, part_t, id_t = full.transpose(-1, -2), part.transpose(-1, -2), mask_id.transpose(-1, -2)
        q_num_full, q_idx_full = _compact_lists(full_t)
        q_num_part, q_idx_part, q_mask_id_part = _compact_lists(part_t, id_t)
        bm = cls(
            q_len=q_len, kv_len=kv_len, bs_q=bs_q, bs_k=bs_k, masks=masks.contiguous(),
            kv_num_full=kv_num_full, kv_idx_full=kv_idx_full, kv_num_part=kv_num_part,
            kv_idx_part=kv_idx_part, kv_mask_id_part=kv_mask_id_part,
            q_num_full=q_num_full, q_idx_full=q_idx_full, q_num_part=q_num_part,
            q_idx_part=q_idx_part, q_mask_id_part=q_mask_id_part, _trusted=True,
        )
        bm._kind_cache = (kind.to(torch.int8).contiguous(), mask_id)
        return bm

    @classmethod
    def from_layout(
        cls,
        layout: torch.Tensor,
        *,
        block_size: BlockSize = 128,
        q_len: Optional[int] = None,
        kv_len: Optional[int] = None,
    ) -> "BlockMask":
        """Block mask from a boolean block layout (DeepSpeed / xformers / OpenAI block-sparse style).

        Args:
            layout: bool tensor ``(B|1, H|1, nQB, nKB)`` (a 2-d ``(nQB, nKB)`` or 3-d ``(H, nQB, nKB)``
                layout gets leading 1s); True = every element of that block attends. Any device.
            block_size: int or ``(bs_q, bs_k)``, powers of two in [16, 256].
            q_len, kv_len: sequence lengths; default ``nQB * bs_q`` / ``nKB * bs_k``. Must satisfy
                ``ceil(q_len / bs_q) == nQB`` and ``ceil(kv_len / bs_k) == nKB``; elements beyond them do
                not exist (a True block on the ragged edge becomes a partial block).

        Returns:
            BlockMask on ``layout``'s device.
        """
        bs_q, bs_k = _check_block_size(block_size)
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor, got {layout.dtype}")
        if layout.dim() < 2 or layout.dim() > 4 or layout.numel() == 0:
            raise ValueError(f"layout must be (B, H, nQB, nKB) (or 2-/3-d), non-empty; got shape {tuple(layout.shape)}")
        layout = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))
        nqb, nkb = int(layout.shape[2]), int(layout.shape[3])
        q_len = nqb * bs_q if q_len is None else _check_len("q_len", q_len)
        kv_len = nkb * bs_k if kv_len is None else _check_len("kv_len", kv_len)
        if -(-q_len // bs_q) != nqb:
            raise ValueError(f"layout has {nqb} query blocks but ceil(q_len={q_len} / bs_q={bs_q}) = {-(-q_len // bs_q)}")
        if -(-kv_len // bs_k) != nkb:
            raise ValueError(f"layout has {nkb} key blocks but ceil(kv_len={kv_len} / bs_k={bs_k}) = {-(-kv_len // bs_k)}")
        dev = layout.device
        _check_real_device(dev)
        rq, rk = q_len - (nqb - 1) * bs_q, kv_len - (nkb - 1) * bs_k  # valid rows/cols of the last blocks
        edge_q = torch.zeros(nqb, dtype=torch.int64, device=dev)
        edge_k = torch.zeros(nkb, dtype=torch.int64, device=dev)
        if rq < bs_q:
            edge_q[-1] = 1
        if rk < bs_k:
            edge_k[-1] = 2
        code = (edge_q[:, None] + edge_k[None, :]).expand(layout.shape)  # 0 inside, 1/2/3 on the ragged edge
        kind = torch.where(layout, torch.where(code == 0, _FULL, _PARTIAL), _EMPTY).to(torch.int8)
        table = _MaskTable(bs_q * bs_k, dev)
        patterns = torch.stack([
            _bounds_mask(bs_q, bs_k, bs_q, bs_k, dev), _bounds_mask(rq, bs_k, bs_q, bs_k, dev),
            _bounds_mask(bs_q, rk, bs_q, bs_k, dev), _bounds_mask(rq, rk, bs_q, bs_k, dev),
        ]).reshape(4, -1)
        used = torch.unique(code[kind == _PARTIAL])
        lut = torch.zeros(4, dtype=torch.int64, device=dev)
        lut[used] = table.add(patterns[used])
        mask_id = lut[code]
        return cls._from_block_state(kind, mask_id, table.masks(bs_q, bs_k), q_len, kv_len, bs_q, bs_k)

    # ---------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.kv_num_full.device

    @property
    def block_size(self) -> Tuple[int, int]:
        return (self.bs_q, self.bs_k)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(B, H, q_len, kv_len) of the dense mask this describes (B / H = 1 when broadcast)."""
        return (self.B, self.H, self.q_len, self.kv_len)

    def block_state(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(kind, mask_id)``, both (B, H, nQB, nKB): kind int8 (0 empty, 1 partial, 2 full), mask_id
        int32 (index into ``masks`` for partial blocks, 0 elsewhere). Rebuilt from the forward lists."""
        if self._kind_cache is None:
            self._kind_cache = _decode_lists([getattr(self, n) for n in self._LIST_NAMES[:5]], self.num_kv_blocks)
        return self._kind_cache

    def layout(self) -> torch.Tensor:
        """Bool (B, H, nQB, nKB): True where the block is visited (full or partial)."""
        return self.block_state()[0] != _EMPTY

    @property
    def num_full(self) -> int:
        """Number of full blocks over all stored (b, h)."""
        return int(self.kv_num_full.sum())

    @property
    def num_partial(self) -> int:
        """Number of partial blocks over all stored (b, h)."""
        return int(self.kv_num_part.sum())

    @property
    def density(self) -> float:
        """Fraction of visited (full + partial) blocks over all blocks, averaged over B, H."""
        total = self.B * self.H * self.num_q_blocks * self.num_kv_blocks
        return (self.num_full + self.num_partial) / total

    def visited_blocks(self, batch: Optional[int] = None, heads: Optional[int] = None) -> int:
        """Total number of (query block, key block) tiles the forward visits (full + partial), summed
        over B and H. With ``batch`` / ``heads``, a mask that broadcasts over that dimension is counted
        once per batch element / head (what a launch on (batch, heads) queries visits)."""
        n = self.num_full + self.num_partial
        if batch is not None and self.B == 1:
            n *= int(batch)
        if heads is not None and self.H == 1:
            n *= int(heads)
        return n

    # ---------------------------------------------------------------------------------- conversions
    def _dense(self, b: Optional[int] = None, h: Optional[int] = None) -> torch.Tensor:
        kind, mask_id = self.block_state()
        if b is not None:
            kind, mask_id = kind[b:b + 1], mask_id[b:b + 1]
        if h is not None:
            kind, mask_id = kind[:, h:h + 1], mask_id[:, h:h + 1]
        masks = self.masks.bool()
        tiles = masks[mask_id.long()]  # (B, H, nQB, nKB, bs_q, bs_k)
        tiles = torch.where((kind == _FULL)[..., None, None], True, tiles & (kind == _PARTIAL)[..., None, None])
        b_, h_, nq, nk = kind.shape
        dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(b_, h_, nq * self.bs_q, nk * self.bs_k)
        return dense[:, :, :self.q_len, :self.kv_len].contiguous()

    def to_dense(self) -> torch.Tensor:
        """The dense mask: bool (B, H, q_len, kv_len), True = attend (for tests / small sizes: it
        materialises every element)."""
        return self._dense()

    def to(self, device) -> "BlockMask":
        """A copy on ``device`` (self when already there)."""
        device = torch.empty(0, device=device).device  # canonical ("cuda" -> "cuda:0")
        if device == self.device:
            return self
        kw = {n: getattr(self, n).to(device) for n in self._LIST_NAMES}
        bm = BlockMask(q_len=self.q_len, kv_len=self.kv_len, bs_q=self.bs_q, bs_k=self.bs_k,
                       masks=self.masks.to(device), _trusted=True, **kw)
        if self._kind_cache is not None:
            bm._kind_cache = tuple(t.to(device) for t in self._kind_cache)
        return bm

    # ---------------------------------------------------------------------------------- validation
    def check_compatible(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise ValueError unless this mask fits q (B, Hq, Nq, D) and k (B, Hkv, Nk, D): ``q_len == Nq``,
        ``kv_len == Nk``, ``self.B`` in (1, B), ``self.H`` in (1, Hq) (the mask's heads are query heads)
        and the mask on q's device."""
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            raise ValueError("block_mask.check_compatible expects q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) tensors")
        B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
        Nk = k.shape[2]
        if self.q_len != Nq or self.kv_len != Nk:
            raise ValueError(
                f"block_mask was built for q_len={self.q_len}, kv_len={self.kv_len} but q has Nq={Nq} and k has "
                f"Nk={Nk}; build it with create_block_mask(..., q_len={Nq}, kv_len={Nk})")
        if self.B not in (1, B):
            raise ValueError(f"block_mask has B={self.B}, which does not broadcast to q's batch {B} (use B=None to broadcast)")
        if self.H not in (1, Hq):
            raise ValueError(
                f"block_mask has H={self.H}, which does not broadcast to q's {Hq} heads (the mask's H counts query "
                "heads; use H=None to broadcast)")
        if self.device != q.device:
            raise ValueError(f"block_mask is on {self.device} but q is on {q.device}; use block_mask.to(q.device)")

    # ---------------------------------------------------------------------------------- combination
    def _combine(self, other: "BlockMask", op: str) -> "BlockMask":
        if not isinstance(other, BlockMask):
            return NotImplemented
        if (self.q_len, self.kv_len) != (other.q_len, other.kv_len):
            raise ValueError(f"cannot combine BlockMasks of lengths {(self.q_len, self.kv_len)} and "
                             f"{(other.q_len, other.kv_len)}")
        if self.block_size != other.block_size:
            raise ValueError(f"cannot combine BlockMasks of block sizes {self.block_size} and {other.block_size}")
        if other.device != self.device:
            raise ValueError(f"cannot combine BlockMasks on {self.device} and {other.device}")
        try:
            B = torch.broadcast_shapes((self.B,), (other.B,))[0]
            H = torch.broadcast_shapes((self.H,), (other.H,))[0]
        except RuntimeError:
            raise ValueError(f"cannot combine BlockMasks with (B, H) = {(self.B, self.H)} and {(other.B, other.H)}") from None
        bs_q, bs_k, dev = self.bs_q, self.bs_k, self.device
        nel = bs_q * bs_k
        shape = (B, H, self.num_q_blocks, self.num_kv_blocks)

        def ext(bm):  # extended id per block: 0 empty, 1 full, 2 + mask id for partial
            kind, mid = bm.block_state()
            e = torch.where(kind == _EMPTY, 0, torch.where(kind == _FULL, 1, 2 + mid.long()))
            table = torch.cat([torch.zeros(1, nel, dtype=torch.bool, device=dev),
                               torch.ones(1, nel, dtype=torch.bool, device=dev),
                               bm.masks.reshape(-1, nel).bool()])
            return e.expand(shape), table

        ea, ta = ext(self)
        eb, tb = ext(other)
        pair = ea * tb.shape[0] + eb
        upair, inv = torch.unique(pair, return_inverse=True)
        ma, mb = ta[upair // tb.shape[0]], tb[upair % tb.shape[0]]
        res = (ma & mb) if op == "and" else (ma | mb)  # (U, nel)
        cnt = res.sum(-1)
        ukind = torch.where(cnt == 0, _EMPTY, torch.where(cnt == nel, _FULL, _PARTIAL))
        table = _MaskTable(nel, dev)
        uid = torch.zeros_like(upair)
        is_part = ukind == _PARTIAL
        uid[is_part] = table.add(res[is_part])
        kind = ukind[inv].to(torch.int8)
        mask_id = uid[inv]
        return BlockMask._from_block_state(kind, mask_id, table.masks(bs_q, bs_k), self.q_len, self.kv_len,
                                           bs_q, bs_k)

    def __and__(self, other: "BlockMask") -> "BlockMask":
        """Intersection (attend where both attend); B / H broadcast."""
        return self._combine(other, "and")

    def __or__(self, other: "BlockMask") -> "BlockMask":
        """Union (attend where either attends); B / H broadcast."""
        return self._combine(other, "or")

    # ---------------------------------------------------------------------------------- display
    def __repr__(self) -> str:
        head = (f"BlockMask(B={self.B}, H={self.H}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block_size=({self.bs_q}, {self.bs_k}), blocks={self.num_q_blocks}x{self.num_kv_blocks}, "
                f"density={100 * self.density:.1f}%, full={self.num_full}, partial={self.num_partial}, "
                f"masks={self.masks.shape[0] if self.num_partial else 0}, device={self.device})")
        if self.num_q_blocks > 32 or self.num_kv_blocks > 64:
            return head
        kind = self.block_state()[0][0, 0].cpu()
        chars = {_EMPTY: ".", _PARTIAL: "+", _FULL: "#"}
        lines = ["  " + "".join(chars[int(x)] for x in row) for row in kind]
        note = "  (b=0, h=0; # full, + partial, . empty)"
        return "\n".join([head, note] + lines)


_ONES64 = int.from_bytes(b"\x01" * 8, "little")  # eight True bools viewed as one int64


def _classify_chunk(out, shape, pads, bs, table: _MaskTable, dev):
    """Classify the tiles of one evaluated chunk. ``out``: what mask_fn returned for the index tensors of
    ``shape = (Bm, Hm, rows, cols)`` (rows / cols: the int64 positions, possibly past the lengths;
    ``pads = (rows_valid, cols_valid)``: bool vectors of the in-range ones, or None when all are).
    Returns ``(kind, mask_id)`` of shape (b, h, nqc, nkc) with b in (1, Bm), h in (1, Hm) (a predicate
    that ignores b / h is classified once); partial tiles' masks are added to ``table``."""
    Bm, Hm, rows, cols = shape
    rows_valid, cols_valid = pads
    bs_q, bs_k = bs
    R, C = rows.shape[0], cols.shape[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"mask_fn must return a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.bool:
        raise TypeError(f"mask_fn must return a bool tensor, got {out.dtype}")
    if out.device != dev:
        raise ValueError(f"mask_fn returned a tensor on {out.device}, expected {dev} (the mask's device)")
    full_shape = (Bm, Hm, R, C)
    ok_shape = out.dim() <= 4
    if ok_shape:
        out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
        try:
            ok_shape = torch.broadcast_shapes(tuple(out.shape), full_shape) == full_shape
        except RuntimeError:
            ok_shape = False
    if not ok_shape:
        raise ValueError(f"mask_fn returned shape {tuple(out.shape)}, which does not broadcast to (B, H, rows, cols) "
                         f"= {full_shape}; it must broadcast its index arguments")
    cb, ch = out.shape[0], out.shape[1]
    out = out.expand(cb, ch, R, C)
    if rows_valid is not None:
        out = out & rows_valid.view(1, 1, -1, 1)
    if cols_valid is not None:
        out = out & cols_valid.view(1, 1, 1, -1)
    out = out.contiguous()
    nqc, nkc = R // bs_q, C // bs_k
    try:
        words = out.view(torch.uint8).view(torch.int64)
    except RuntimeError:  # storage offset not 8-byte aligned
        words = out.clone().view(torch.uint8).view(torch.int64)
    # 8 bools per int64 word: a tile is empty iff its max word is 0, all-visible iff its min word is all ones
    words = words.view(cb, ch, nqc, bs_q, nkc, bs_k // 8)
    w_max, w_min = words.amax(dim=(3, 5)), words.amin(dim=(3, 5))
    kind = torch.where(w_max == 0, _EMPTY, torch.where(w_min == _ONES64, _FULL, _PARTIAL)).to(torch.int8)
    mask_id = torch.zeros(kind.shape, dtype=torch.int32, device=dev)
    part = torch.nonzero(kind == _PARTIAL)
    if part.shape[0]:
        pb, ph, pq, pk = part.unbind(1)
        tiles = out.view(cb, ch, nqc, bs_q, nkc, bs_k).permute(0, 1, 2, 4, 3, 5)
        mask_id[pb, ph, pq, pk] = table.add(tiles[pb, ph, pq, pk].reshape(-1, bs_q * bs_k)).to(torch.int32)
    return kind, mask_id


def _band_block_mask(band, Bm: int, Hm: int, q_len: int, kv_len: int, bs_q: int, bs_k: int, dev) -> "BlockMask":
    """Closed-form construction for a band predicate ``lo <= kv_idx - q_idx <= hi`` (None = unbounded),
    e.g. causal / sliding window: within a block, ``kv - q`` takes every value of an interval, so blocks
    are classified from their corners and only the distinct partial-block patterns are evaluated."""
    big = 1 << 62
    lo = -big if band[0] is None else int(band[0])
    hi = big if band[1] is None else int(band[1])
    nqb, nkb = -(-q_len // bs_q), -(-kv_len // bs_k)
    r0 = torch.arange(nqb, device=dev) * bs_q
    c0 = torch.arange(nkb, device=dev) * bs_k
    rv = (r0 + bs_q).clamp(max=q_len) - r0  # valid rows / cols per block
    cv = (c0 + bs_k).clamp(max=kv_len) - c0
    d_min = c0[None, :] - (r0 + rv - 1)[:, None]  # range of kv - q over the valid part of each block
    d_max = (c0 + cv - 1)[None, :] - r0[:, None]
    visible = (d_max >= lo) & (d_min <= hi) & (lo <= hi)  # lo > hi: an empty band
    full = (d_min >= lo) & (d_max <= hi) & (rv == bs_q)[:, None] & (cv == bs_k)[None, :]
    kind = torch.where(full, _FULL, torch.where(visible, _PARTIAL, _EMPTY)).to(torch.int8)
    mask_id = torch.zeros(nqb, nkb, dtype=torch.int64, device=dev)
    table = _MaskTable(bs_q * bs_k, dev)
    pi, pj = torch.nonzero(kind == _PARTIAL).unbind(1)
    if pi.numel():
        # a partial block's pattern depends only on (c0 - r0, valid rows, valid cols)
        key = ((c0[pj] - r0[pi] + q_len) * (bs_q + 1) + rv[pi]) * (bs_k + 1) + cv[pj]
        ukey, inv = torch.unique(key, return_inverse=True)
        first = torch.full((ukey.shape[0],), pi.shape[0], dtype=torch.int64, device=dev)
        first = first.scatter_reduce(0, inv, torch.arange(pi.shape[0], device=dev), reduce="amin")
        ui, uj = pi[first], pj[first]
        r = torch.arange(bs_q, device=dev)
        c = torch.arange(bs_k, device=dev)
        uid = torch.empty(ukey.shape[0], dtype=torch.int64, device=dev)
        step = max(1, _CHUNK_ELEMS // (bs_q * bs_k))
        for s in range(0, ukey.shape[0], step):
            bi, bj = ui[s:s + step], uj[s:s + step]
            d = (c0[bj][:, None, None] + c[None, None, :]) - (r0[bi][:, None, None] + r[None, :, None])
            ok = (d >= lo) & (d <= hi) & (r[None, :, None] < rv[bi][:, None, None]) & (c[None, None, :] < cv[bj][:, None, None])
            uid[s:s + step] = table.add(ok.reshape(ok.shape[0], -1))
        mask_id[pi, pj] = uid[inv]
    shape = (Bm, Hm, nqb, nkb)
    return BlockMask._from_block_state(kind.expand(shape), mask_id.expand(shape), table.masks(bs_q, bs_k),
                                       q_len, kv_len, bs_q, bs_k)


# --------------------------------------------------------------------------------------------------
# create_block_mask
# --------------------------------------------------------------------------------------------------
def create_block_mask(
    mask_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    B: Optional[int],
    H: Optional[int],
    q_len: int,
    kv_len: int,
    *,
    block_size: BlockSize = 128,
    device=None,
) -> BlockMask:
    """Build a :class:`BlockMask` by evaluating a mask predicate (FlexAttention ``mask_mod`` contract).

    Args:
        mask_fn: ``mask_fn(b, h, q_idx, kv_idx) -> bool tensor``, True = attend. Called with int64 index
            tensors of shapes ``(B, 1, 1, 1)``, ``(1, H, 1, 1)``, ``(1, 1, R, 1)``, ``(1, 1, 1, C)`` (a
            chunk of R query rows and C key columns) and must return a bool tensor broadcastable to
            ``(B, H, R, C)``. Only indices inside ``[0, q_len) x [0, kv_len)`` are passed (ragged block
            edges are padded with clamped indices whose result is discarded). See ``tileattn.masks`` for
            ready-made predicates.
        B, H: batch size and number of query heads the mask varies over, or None to broadcast (stored as
            1; ``mask_fn`` then sees index 0).
        q_len, kv_len: query / key sequence lengths.
        block_size: int or ``(bs_q, bs_k)``; powers of two in [16, 256]. Must match the kernels' tiles.
        device: where the predicate is evaluated and the mask lives; default CUDA when available, else CPU.

    Evaluated eagerly (no torch.compile), chunked so that at most ~16M mask elements exist at a time
    (never the whole ``q_len x kv_len`` mask); identical element masks of partial blocks are stored once.
    Predicates from ``tileattn.masks`` that describe a band (``causal``, ``sliding_window`` and their
    ``and_masks``) are classified in closed form instead (identical result, O(blocks) work).

    Returns:
        BlockMask with B = B or 1, H = H or 1.
    """
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable, got {type(mask_fn).__name__}")
    Bm, Hm = _check_bh("B", B), _check_bh("H", H)
    q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
    bs_q, bs_k = _check_block_size(block_size)
    dev = _default_device(device)
    need = getattr(mask_fn, "_tileattn_min_len", 0)
    if need > max(q_len, kv_len):
        raise ValueError(f"mask_fn refers to token position {need - 1} (e.g. a longformer global index), outside "
                         f"the sequence (q_len={q_len}, kv_len={kv_len})")
    band = getattr(mask_fn, "_tileattn_band", None)
    if band is not None:  # tileattn.masks causal / sliding_window: closed form, same result
        return _band_block_mask(band, Bm, Hm, q_len, kv_len, bs_q, bs_k, dev)
    nqb, nkb = -(-q_len // bs_q), -(-kv_len // bs_k)
    nel = bs_q * bs_k
    # chunk: kc key blocks x qc query blocks, with Bm * Hm * (qc * bs_q) * (kc * bs_k) <= cap (>= 1 tile)
    per_tile = Bm * Hm * nel
    kc = max(1, min(nkb, _CHUNK_ELEMS // per_tile))
    qc = max(1, min(nqb, _CHUNK_ELEMS // (per_tile * kc)))

    b_idx = torch.arange(Bm, device=dev).view(Bm, 1, 1, 1)
    h_idx = torch.arange(Hm, device=dev).view(1, Hm, 1, 1)
    kind = torch.empty(Bm, Hm, nqb, nkb, dtype=torch.int8, device=dev)
    mask_id = torch.zeros(Bm, Hm, nqb, nkb, dtype=torch.int32, device=dev)
    table = _MaskTable(nel, dev)

    for q0 in range(0, nqb, qc):
        q1 = min(nqb, q0 + qc)
        rows = torch.arange(q0 * bs_q, q1 * bs_q, device=dev)
        q_idx = rows.clamp(max=q_len - 1).view(1, 1, -1, 1)
        for k0 in range(0, nkb, kc):
            k1 = min(nkb, k0 + kc)
            cols = torch.arange(k0 * bs_k, k1 * bs_k, device=dev)
            kv_idx = cols.clamp(max=kv_len - 1).view(1, 1, 1, -1)
            out = mask_fn(b_idx, h_idx, q_idx, kv_idx)
            pads = (rows < q_len if q1 * bs_q > q_len else None, cols < kv_len if k1 * bs_k > kv_len else None)
            ck, cm = _classify_chunk(out, (Bm, Hm, rows, cols), pads, (bs_q, bs_k), table, dev)
            kind[:, :, q0:q1, k0:k1] = ck  # ck / cm may be size 1 over B / H: broadcast
            mask_id[:, :, q0:q1, k0:k1] = cm
    return BlockMask._from_block_state(kind, mask_id, table.masks(bs_q, bs_k), q_len, kv_len, bs_q, bs_k)
