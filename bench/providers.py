"""Benchmark providers, discovered lazily: a provider whose package or backend is missing is skipped with a
note saying why, never an error.

Each provider builds, for a :class:`bench.measure.Case` and one input set, a callable returning the output
(differentiable w.r.t. ``Built.leaves``). With ``for_gate=True`` the callable takes and returns the
(B, H, N, D) layout so the correctness gate can compare it (layout conversions happen inside the graph);
for timing, conversions happen once, outside the timed call.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.env import on_cuda


@dataclass
class Built:
    fn: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]


class Provider:
    """Base class. ``name``: short id used in results and plots; ``ops``: which case ops it computes
    ('softmax', 'sparse', 'lightning', 'varlen', 'decode'); ``ours``: a tileattn kernel (must launch Triton
    kernels)."""

    name = "?"
    ops: tuple = ()
    ours = False
    cpu_ok = False  # usable for the CPU harness self-test (--cpu-timing)
    scale: Optional[float] = None  # softmax / linear scale convention the provider uses (None = 1/sqrt(D))

    def unavailable(self) -> Optional[str]:
        """None when usable in this process, else the reason (missing package, backend, device)."""
        return None

    def skip(self, case) -> Optional[str]:
        """None when this case can run, else why not (e.g. estimated memory)."""
        return None

    def context(self, case):
        return contextlib.nullcontext()

    def build(self, case, inp, masks, for_gate: bool) -> Built:
        raise NotImplementedError


def _free_bytes() -> int:
    if on_cuda():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return 8 << 30


def _quadratic_bytes(case, per_elem: float) -> float:
    return case.B * case.H * case.N * case.N * per_elem


# ------------------------------------------------------------------------------------------------ tileattn
class TileattnSoftmax(Provider):
    name = "tileattn"
    ops = ("softmax", "sparse")
    ours = True

    def unavailable(self):
        try:
            import tileattn  # noqa: F401
        except Exception as e:
            return f"tileattn does not import: {e}"
        return None

    def skip(self, case):
        import tileattn

        if case.op == "sparse" and not (hasattr(tileattn, "create_block_mask") or hasattr(tileattn, "BlockMask")):
            return "tileattn.create_block_mask not available yet"
        return None

    def build(self, case, inp, masks, for_gate):
        import tileattn

        q, k, v = inp.q, inp.k, inp.v
        if case.op == "sparse":
            bm = masks.tileattn(case.mask, case.N, case.H, q.device)
            return Built(lambda: tileattn.attention(q, k, v, block_mask=bm), [q, k, v])
        causal = case.causal
        return Built(lambda: tileattn.attention(q, k, v, causal=causal), [q, k, v])


class TileattnWS(TileattnSoftmax):
    """``tileattn.attention`` with the warp-specialized dense forward forced (``WARP_SPECIALIZE = "on"``: its
    tiles only); the backward is the usual one. Dense (non-causal) cases on sm_90 only."""
    name = "tileattn-ws"
    ops = ("softmax",)

    def unavailable(self):
        if not on_cuda() or torch.cuda.get_device_capability()[0] != 9:
            return "warp specialization is built for sm_90 (Hopper) only"
        return super().unavailable()

    def skip(self, case):
        from tileattn.kernels import attention as A

        if case.causal:
            return "the warp-specialized walk covers the dense (non-causal) forward only"
        if case.torch_dtype not in (torch.bfloat16, torch.float16):
            return "warp specialization: 16-bit inputs only"
        if max(case.D, case.dv) > max(A.WS_CONFIGS):
            return f"warp specialization: head dims up to {max(A.WS_CONFIGS)} only"
        return None

    @contextlib.contextmanager
    def context(self, case):
        from tileattn.kernels import attention as A

        old, A.WARP_SPECIALIZE = A.WARP_SPECIALIZE, "on"
        try:
            yield
        finally:
            A.WARP_SPECIALIZE = old


class TileattnLightning(Provider):
    name = "tileattn-lightning"
    ops = ("lightning",)
    ours = True

    def unavailable(self):
        try:
            import tileattn
        except Exception as e:
            return f"tileattn does not import: {e}"
        if not hasattr(tileattn, "lightning_attention"):
            return "tileattn.lightning_attention not available yet"
        return None

    def build(self, case, inp, masks, for_gate):
        import tileattn

        q, k, v, decay = inp.q, inp.k, inp.v, inp.decay
        scale = inp.extra.get("scale")
        return Built(lambda: tileattn.lightning_attention(q, k, v, decay, scale=scale), [q, k, v])


# ------------------------------------------------------------------------------------------------ SDPA
_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                  "math": "MATH"}


class SDPA(Provider):
    """``torch.nn.functional.scaled_dot_product_attention`` pinned to one backend with ``sdpa_kernel``.
    For 'sparse' cases it takes the dense boolean mask (only backends that accept ``attn_mask``); for 'decode'
    see :func:`_sdpa_decode`."""

    ops = ("softmax", "sparse", "decode")
    cpu_ok = True

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"sdpa-{backend}"

    def _enum(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, _SDPA_BACKENDS[self.backend], None)

    def unavailable(self):
        try:
            from torch.nn.attention import sdpa_kernel  # noqa: F401
        except Exception as e:
            return f"torch.nn.attention.sdpa_kernel missing: {e}"
        if self._enum() is None:
            return f"SDPBackend.{_SDPA_BACKENDS[self.backend]} not in this torch"
        if not on_cuda() and self.backend not in ("math", "flash"):
            return "CUDA-only backend"
        return None

    def skip(self, case):
        if case.op == "decode":
            return _sdpa_decode_skip(self.backend, case)
        if case.op == "sparse" and self.backend in ("flash", "cudnn"):
            return f"{self.backend} takes no attn_mask"
        if self.backend == "math":
            need = _quadratic_bytes(case, 12 if case.mode == "fwd" else 24)
            if need > 0.6 * _free_bytes():
                return f"math backend would need ~{need / 2**30:.0f} GiB for the N×N scores"
        if case.op == "sparse":
            need = case.H * case.N * case.N * 3  # the (1, H, N, N) bool mask and its additive float form
            if need > 0.3 * _free_bytes():
                return f"dense mask would need ~{need / 2**30:.0f} GiB"
        return None

    def context(self, case):
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([self._enum()])

    def build(self, case, inp, masks, for_gate):
        if case.op == "decode":
            return _sdpa_decode(case, inp)
        q, k, v = inp.q, inp.k, inp.v
        scale = inp.extra.get("scale")
        if case.op == "sparse":
            m = masks.dense(case.mask, case.B, case.N, case.H, q.device)
            return Built(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale), [q, k, v])
        causal = case.causal
        return Built(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale), [q, k, v])


# ------------------------------------------------------------------------------------------------ Flex
_FLEX = {}


class Flex(Provider):
    """FlexAttention compiled with ``torch.compile`` (one compile per shape), with the same masks as
    tileattn: causal / block-sparse predicates become FlexAttention block masks (block size 128). 'decode': the
    contiguous cache of L keys with ``enable_gqa``, no block mask at equal lengths, ``kv_idx < L_b`` for ragged
    ones (FlexAttention's own paged-attention helper is experimental API: not used)."""

    name = "flex"
    ops = ("softmax", "sparse", "varlen", "decode")
    gate_n = 256  # gate at a block multiple (FlexAttention's own tests use multiples of 128)

    def unavailable(self):
        if not on_cuda():
            return "FlexAttention is compiled for CUDA here (CPU timings are not the point)"
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception as e:
            return f"FlexAttention missing: {e}"
        return None

    @staticmethod
    def _compiled():
        if "fn" not in _FLEX:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            # one compile per shape / mask: the sweep needs more than dynamo's default 8 recompiles, and
            # hitting the limit must raise, never silently fall back to eager (unfused) flex_attention
            cfg = torch._dynamo.config
            cfg.cache_size_limit = max(getattr(cfg, "cache_size_limit", 8), 512)
            if hasattr(cfg, "accumulated_cache_size_limit"):
                cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
            if hasattr(cfg, "fail_on_recompile_limit_hit"):
                cfg.fail_on_recompile_limit_hit = True
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        return _FLEX["fn"]

    def skip(self, case):
        return _decode_memory(case, 1) if case.op == "decode" else None

    def build(self, case, inp, masks, for_gate):
        q, k, v = inp.q, inp.k, inp.v
        fn = self._compiled()
        bm = None
        if case.op == "decode":
            scale, gqa = inp.extra.get("scale"), case.H != case.hkv
            if case.mask:  # ragged lengths
                from torch.nn.attention.flex_attention import create_block_mask

                lens = inp.extra["cache_seqlens"]
                bm = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lens[b], case.B, None, 1, case.N,
                                       device=q.device)
            return Built(lambda: fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa), [])
        if case.op == "varlen":  # document (-causal) mask on the packed (1, H, N, D) row
            from bench.measure import varlen_mask

            bm = masks.flex(varlen_mask(case), case.N, case.H, q.device)
        elif case.op == "sparse":
            bm = masks.flex(case.mask, case.N, case.H, q.device)
        elif case.causal:
            bm = masks.flex("causal", case.N, case.H, q.device)
        scale = inp.extra.get("scale")
        return Built(lambda: fn(q, k, v, block_mask=bm, scale=scale), [q, k, v])


# ------------------------------------------------------------------------------------------------ naive
class Naive(Provider):
    """The PyTorch reference (``tileattn.reference.attention_ref``, same dtype): materialises N×N."""

    name = "naive"
    ops = ("softmax", "sparse")
    cpu_ok = True

    def skip(self, case):
        need = _quadratic_bytes(case, 16 if case.mode == "fwd" else 40)
        if case.op == "sparse":
            need += case.H * case.N * case.N
        if need > 0.6 * _free_bytes():
            return f"naive reference would need ~{need / 2**30:.0f} GiB"
        return None

    def build(self, case, inp, masks, for_gate):
        from tileattn.reference import attention_ref

        q, k, v = inp.q, inp.k, inp.v
        mask = masks.dense(case.mask, case.B, case.N, case.H, q.device) if case.op == "sparse" else None
        causal = case.causal
        scale = inp.extra.get("scale")
        return Built(lambda: attention_ref(q, k, v, causal=causal, mask=mask, scale=scale)[0], [q, k, v])


# ------------------------------------------------------------------------------------------------ varlen
def _packed(x: torch.Tensor) -> torch.Tensor:
    """(1, H, N, D) -> the (N, H, D) packed layout of ``attention_varlen`` (a view)."""
    return x[0].transpose(0, 1)


class TileattnVarlen(Provider):
    """``tileattn.attention_varlen`` on the packed documents of a 'varlen' case (cu_seqlens from the case,
    max_seqlen passed as ints). Timed without the host-side cu_seqlens check (``TILEATTN_VARLEN_CHECKS=0``,
    as under torch.compile / CUDA graphs): the benchmark's cu_seqlens are valid by construction."""

    name = "tileattn-varlen"
    ops = ("varlen",)
    ours = True

    def unavailable(self):
        try:
            import tileattn
        except Exception as e:
            return f"tileattn does not import: {e}"
        if not hasattr(tileattn, "attention_varlen"):
            return "tileattn.attention_varlen not available yet"
        return None

    def context(self, case):
        import os
        from unittest import mock

        return mock.patch.dict(os.environ, {"TILEATTN_VARLEN_CHECKS": "0"})

    def build(self, case, inp, masks, for_gate):
        import tileattn

        from bench.measure import cu_seqlens, doc_lengths

        lens = doc_lengths(case.mask, case.N)
        cu, mx = cu_seqlens(lens, inp.q.device), max(lens)
        causal, scale = case.causal, inp.extra.get("scale")

        def attn(q, k, v):
            return tileattn.attention_varlen(q, k, v, cu, cu, mx, mx, causal=causal, scale=scale)

        if for_gate:
            q, k, v = inp.q, inp.k, inp.v
            return Built(lambda: attn(_packed(q), _packed(k), _packed(v)).transpose(0, 1)[None], [q, k, v])
        req = inp.q.requires_grad
        q, k, v = [_packed(x).detach().contiguous().requires_grad_(req) for x in (inp.q, inp.k, inp.v)]
        return Built(lambda: attn(q, k, v), [q, k, v])


class PaddedVarlen(Provider):
    """The documents of a 'varlen' case right-padded to the longest one: a (ndocs, H, max_len, D) batch through
    a dense causal kernel (tileattn.attention or SDPA's flash backend). With Nq = Nk and right padding the
    causal mask keeps every real query away from the padding, so the real rows are exact (the gate compares
    only those); padded rows are computed and thrown away, which is the waste varlen avoids. Non-causal
    would need a key-padding mask: skipped."""

    ops = ("varlen",)

    def __init__(self, backend: str):
        self.backend = backend  # "tileattn" | "sdpa-flash"
        self.name = f"{backend}-padded"
        self.ours = backend == "tileattn"
        self.cpu_ok = not self.ours

    def unavailable(self):
        if self.ours:
            return TileattnSoftmax().unavailable()
        return SDPA("flash").unavailable()

    def skip(self, case):
        if not case.causal:
            return "right-padded documents need a key-padding mask without causal (not in this provider)"
        return None

    def context(self, case):
        return contextlib.nullcontext() if self.ours else SDPA("flash").context(case)

    def build(self, case, inp, masks, for_gate):
        from bench.measure import doc_lengths

        lens = doc_lengths(case.mask, case.N)
        L, scale = max(lens), inp.extra.get("scale")
        if self.ours:
            import tileattn

            def attn(q, k, v):
                return tileattn.attention(q, k, v, causal=True, scale=scale)
        else:
            def attn(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        def pad(x):  # (1, H, N, D) -> (ndocs, H, L, D), zeros after each document
            return torch.stack([F.pad(d, (0, 0, 0, L - d.shape[1])) for d in x[0].split(lens, dim=1)])

        if for_gate:
            q, k, v = inp.q, inp.k, inp.v

            def fn():
                o = attn(pad(q), pad(k), pad(v))
                return torch.cat([o[i, :, :n] for i, n in enumerate(lens)], dim=1)[None]

            return Built(fn, [q, k, v])
        req = inp.q.requires_grad
        q, k, v = [pad(x.detach()).requires_grad_(req) for x in (inp.q, inp.k, inp.v)]
        return Built(lambda: attn(q, k, v), [q, k, v])


# ------------------------------------------------------------------------------------------------ decode
def _decode_memory(case, copies: int) -> Optional[str]:
    """Skip a decode case whose K/V buffer, ``copies`` times over, would not fit in free device memory."""
    from bench.measure import set_bytes

    need = copies * set_bytes(case)
    if need > 0.9 * _free_bytes():
        return f"needs ~{need / 2**30:.0f} GiB for {copies} copies of the {set_bytes(case) / 2**30:.1f} GiB K/V cache"
    return None


def _sdpa_decode_skip(backend: str, case) -> Optional[str]:
    if case.mask and backend in ("flash", "cudnn"):
        return f"{backend} takes no attn_mask (needed for ragged cache lengths)"
    # math expands K / V to the query heads (enable_gqa) on top of the cache itself
    return _decode_memory(case, 1 + (case.H // case.hkv if backend == "math" else 0))


def _sdpa_decode(case, inp) -> Built:
    """SDPA over the contiguous cache (B, Hkv, L, D) with ``enable_gqa`` and ``is_causal=False`` (Nq = 1 sees
    every key; SDPA's causal is top-left aligned); ragged lengths as a (B, 1, 1, L) boolean key mask."""
    q, k, v = inp.q, inp.k, inp.v
    scale, gqa = inp.extra.get("scale"), case.H != case.hkv
    mask = None
    if case.mask:
        lens = inp.extra["cache_seqlens"]
        mask = (torch.arange(case.N, device=q.device) < lens[:, None]).view(case.B, 1, 1, case.N)
    return Built(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa), [])


class TileattnKVCache(Provider):
    """``tileattn.attention_with_kvcache`` on a 'decode' case (forward only): paged caches (page size
    ``bench.measure.DECODE_PAGE`` = 64, pages shuffled over the pool, :func:`bench.measure.paged_cache`) or the
    contiguous (B, Hkv, L, D) caches; capacity L, ``cache_seqlens`` from the case, default flags (bottom-right
    causal: the one query sees every cached key; the number of key splits chosen by the op, no host sync)."""

    ops = ("decode",)
    ours = True

    def __init__(self, paged: bool):
        self.paged = paged
        self.name = "tileattn-kvcache" if paged else "tileattn-kvcache-contig"

    def unavailable(self):
        try:
            import tileattn
        except Exception as e:
            return f"tileattn does not import: {e}"
        if not hasattr(tileattn, "attention_with_kvcache"):
            return "tileattn.attention_with_kvcache not available yet"
        return None

    def skip(self, case):
        return _decode_memory(case, 2 if self.paged else 1)  # paged: the pool next to the contiguous inputs

    def build(self, case, inp, masks, for_gate):
        import tileattn

        from bench.measure import DECODE_PAGE, paged_cache

        q, lens, scale = inp.q, inp.extra["cache_seqlens"], inp.extra.get("scale")
        kc, vc, table = paged_cache(inp.k, inp.v, DECODE_PAGE) if self.paged else (inp.k, inp.v, None)
        return Built(lambda: tileattn.attention_with_kvcache(q, kc, vc, lens, block_table=table, scale=scale), [])


class Copy(Provider):
    """The decode sweep's bandwidth yardstick: one device copy ``dst.copy_(src)`` of exactly the K / V bytes
    the case reads (``bench.measure.decode_kv_bytes``; src = the head of the case's K/V buffer). Its gate
    checks the copy bitwise; its row's ``gbps`` is (bytes read + bytes written) / time."""

    name = "copy"
    ops = ("decode",)
    cpu_ok = True

    def skip(self, case):
        return _decode_memory(case, 2)

    @staticmethod
    def expected(case, inp) -> torch.Tensor:
        from bench.measure import decode_kv_bytes

        kv = inp.extra["kv"]
        return kv[: decode_kv_bytes(case) // kv.element_size()]

    def build(self, case, inp, masks, for_gate):
        src = self.expected(case, inp)
        dst = torch.empty_like(src)
        return Built(lambda: dst.copy_(src), [])


def decode_providers() -> List[Provider]:
    return [Copy(), TileattnKVCache(paged=True), TileattnKVCache(paged=False)]


# ------------------------------------------------------------------------------------------------ linear
class FlaSimpleGLA(Provider):
    """fla's ``chunk_simple_gla`` (per-head scalar decay; (B, T, H, D) layout, g = log decay per step)."""

    name = "fla-simple-gla"
    ops = ("lightning",)

    def unavailable(self):
        if not on_cuda():
            return "fla kernels need CUDA"
        try:
            importlib.import_module("fla.ops.simple_gla")
        except Exception as e:
            return f"fla not importable ({type(e).__name__})"
        return None

    def build(self, case, inp, masks, for_gate):
        from fla.ops.simple_gla import chunk_simple_gla

        scale = inp.extra.get("scale") or case.D ** -0.5
        B, H, N = case.B, case.H, case.N
        g = (-inp.decay).view(1, 1, H).expand(B, N, H).contiguous()
        if for_gate:
            q, k, v = inp.q, inp.k, inp.v

            def fn():
                o = chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g=g, scale=scale)
                o = o[0] if isinstance(o, tuple) else o
                return o.transpose(1, 2)

            return Built(fn, [q, k, v])
        req = inp.q.requires_grad
        q, k, v = [x.detach().transpose(1, 2).contiguous().requires_grad_(req) for x in (inp.q, inp.k, inp.v)]

        def fn():
            o = chunk_simple_gla(q, k, v, g=g, scale=scale)
            return o[0] if isinstance(o, tuple) else o

        return Built(fn, [q, k, v])


class LightningAttnPkg(Provider):
    """OpenNLPLab ``lightning_attn`` (Lightning-2): ``lightning_attn_func(q, k, v, s)``, s = (H, 1, 1) rates,
    no softmax-style scale (scale 1)."""

    name = "lightning-attn"
    ops = ("lightning",)
    scale = 1.0

    def unavailable(self):
        if not on_cuda():
            return "lightning_attn kernels need CUDA"
        try:
            importlib.import_module("lightning_attn.ops")
        except Exception as e:
            return f"lightning_attn not importable ({type(e).__name__})"
        return None

    def build(self, case, inp, masks, for_gate):
        from lightning_attn.ops import lightning_attn_func

        q, k, v = inp.q, inp.k, inp.v
        s = inp.decay.view(-1, 1, 1).contiguous()
        return Built(lambda: lightning_attn_func(q, k, v, s), [q, k, v])


# ------------------------------------------------------------------------------------------------ registry
def all_providers() -> Dict[str, Provider]:
    ps = [TileattnSoftmax(), TileattnWS(), TileattnLightning(), SDPA("flash"), SDPA("efficient"), SDPA("cudnn"),
          SDPA("math"), Flex(), Naive(), FlaSimpleGLA(), LightningAttnPkg()]
    return {p.name: p for p in ps + [TileattnVarlen(), PaddedVarlen("tileattn"), PaddedVarlen("sdpa-flash")]
            + decode_providers()}


# which providers each sweep runs, and the op each computes there (the lightning sweep compares against
# causal softmax attention: tileattn and the SDPA flash backend)
SWEEP_PROVIDERS = {
    "softmax": [("tileattn", "softmax"), ("tileattn-ws", "softmax"), ("sdpa-flash", "softmax"),
                ("sdpa-efficient", "softmax"), ("sdpa-cudnn", "softmax"), ("sdpa-math", "softmax"), ("flex", "softmax"),
                ("naive", "softmax")],
    "sparse": [("tileattn", "sparse"), ("flex", "sparse"), ("sdpa-efficient", "sparse"), ("naive", "sparse"),
               ("tileattn", "softmax"), ("sdpa-flash", "softmax")],
    "lightning": [("tileattn-lightning", "lightning"), ("fla-simple-gla", "lightning"),
                  ("lightning-attn", "lightning"), ("tileattn", "softmax"), ("sdpa-flash", "softmax")],
}


# the varlen sweep: one packed row of mixed-length documents, against the same documents padded to a batch
# and FlexAttention with a document mask
SWEEP_PROVIDERS["varlen"] = [("tileattn-varlen", "varlen"), ("tileattn-padded", "varlen"), ("flex", "varlen"),
                             ("sdpa-flash-padded", "varlen")]


# the decode sweep: one query per sequence over a KV cache; the copy baseline first (every other row's
# bandwidth is a fraction of it, and the sweep always runs it)
SWEEP_PROVIDERS["decode"] = [("copy", "decode"), ("tileattn-kvcache", "decode"), ("tileattn-kvcache-contig", "decode"),
                             ("sdpa-flash", "decode"), ("sdpa-efficient", "decode"), ("sdpa-cudnn", "decode"),
                             ("flex", "decode"), ("sdpa-math", "decode")]


def series_name(provider: str, sweep: str, op: str) -> str:
    """Label of a provider's line in a sweep (dense / causal-softmax baselines are marked)."""
    if sweep == "sparse" and op == "softmax":
        return f"{provider} (dense)"
    if sweep == "lightning" and op == "softmax":
        return f"{provider} (causal softmax)"
    return provider
