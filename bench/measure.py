"""One measurement: the case description, FLOP rules, the correctness gate, timing and peak memory.

Timing on CUDA is ``triton.testing.do_bench`` (warm-up, L2 flush between runs, median with p20/p80) over
several rotated input sets, so no run finds its inputs in cache. Peak memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` around one call on one input set.
Before a provider is timed it must pass the correctness gate: at a small size (B=1, H=2, N=257), its output
(and gradients, for bwd modes) against a float64 PyTorch reference under the flash-attention rule
``err <= 2 * err(same-dtype PyTorch) + floor`` (``tests/helpers.py``). Decode cases gate at B=3, Hkv=2 with the
case's GQA group (Hq=8 for the sweep's 32 / 8), N=257 keys (forward only); the decode sweep's copy baseline is checked bitwise instead.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.env import REPO, env_info, on_cuda, timestamp

MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _load_helpers():
    """``tests/helpers.py`` (rel_err, FLOOR): the tolerance rule the tests use, loaded by path."""
    spec = importlib.util.spec_from_file_location("_tileattn_test_helpers", os.path.join(REPO, "tests", "helpers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


helpers = _load_helpers()


# ------------------------------------------------------------------------------------------------ case
@dataclass(frozen=True)
class Case:
    """One benchmark configuration. ``op``: 'softmax' | 'sparse' | 'lightning' | 'varlen' | 'decode'; Nq = Nk = N
    except for 'decode'. ``mask``: for 'sparse', ``kind:param`` (``random:0.1`` = random block layout of density
    0.1, ``window:512`` = causal sliding window of 512 keys); for 'varlen', ``docs:<seed>`` = the N tokens of the
    (B=1) row packed from documents of mixed lengths (:func:`doc_lengths`); for 'decode', the cache lengths
    (:func:`decode_lengths`: empty = every sequence holds N keys, ``ragged:<seed>`` = mixed lengths up to N);
    empty otherwise. 'decode': one new query (Nq = 1) per sequence over a KV cache of N keys, ``H`` query heads
    and ``Hkv`` key / value heads (GQA), forward only."""

    op: str
    B: int
    H: int
    N: int
    D: int
    dtype: str = "bf16"
    causal: bool = False
    mode: str = "fwd"
    mask: str = ""
    Dv: Optional[int] = None
    Hkv: Optional[int] = None  # key / value heads ('decode'; None = H)

    @property
    def dv(self) -> int:
        return self.Dv or self.D

    @property
    def hkv(self) -> int:
        return self.Hkv or self.H

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def small(self, n: Optional[int] = None) -> "Case":
        """The correctness-gate version of this case (same flags, small shape; N not a block multiple unless
        ``n`` says otherwise)."""
        n = n or (257 if self.op != "sparse" else 520)
        if self.op == "decode":  # several sequences, 2 kv heads with the case's GQA group size, forward only
            return replace(self, B=3, H=2 * (self.H // self.hkv), Hkv=2, N=n, mode="fwd")
        return replace(self, B=1, H=2, N=n, mode="fwdbwd" if self.mode != "fwd" else "fwd")

    def key(self) -> tuple:
        return (self.op, self.dtype, self.D, self.dv, self.causal, self.mask, self.H // self.hkv)


# ------------------------------------------------------------------------------------------------ FLOPs
SOFTMAX_RULE = "FLOPs = 4·B·H·N²·D (fwd); bwd ×2.5; fwd+bwd ×3.5; causal ×0.5; block-sparse × block density"
LINEAR_RULE = "linear-attn FLOPs = 4·B·H·N·D·Dv (fwd: kᵀv state update + q·S per token); bwd ×2; fwd+bwd ×3"
VARLEN_RULE = ("varlen: the softmax rule with B=1, N = packed tokens and density Σ len_i² / N² "
               "(useful FLOPs only: padded providers get no credit for their padding)")
DECODE_RULE = ("decode: FLOPs = 4·Hq·Nq·D·Σ_b L_b (= 4·B·Hq·Nq·L·D at equal lengths); bandwidth = K/V bytes read / "
               "time, bytes = Σ_b L_b·Hkv·(D + Dv)·bytes per element (every cached key and value once; q, out, "
               "block table not counted); fraction = that / copy bandwidth, copy bandwidth = 2·bytes / time of one "
               "device copy of the same number of bytes in the same run (read + write)")
_SOFTMAX_MODE = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
_LINEAR_MODE = {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0}


def softmax_flops(B, H, N, D, Dv, mode, causal=False, density=1.0) -> float:
    """FlashAttention convention: 2·B·H·Nq·Nk·(D + Dv) forward (= 4·B·H·N²·D for Dv = D)."""
    f = 2.0 * B * H * N * N * (D + Dv) * _SOFTMAX_MODE[mode]
    if causal:
        f *= 0.5
    return f * density


def linear_flops(B, H, N, D, Dv, mode) -> float:
    """Recurrent-form count (independent of the chunk size a kernel picks; chunked kernels do more)."""
    return 4.0 * B * H * N * D * Dv * _LINEAR_MODE[mode]


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    decay: Optional[torch.Tensor] = None  # (H,) rates for lightning
    extra: Dict[str, object] = field(default_factory=dict)


def make_inputs(case: Case, device, requires_grad: bool, seed: int = 0) -> Inputs:
    if case.op == "decode":
        return decode_inputs(case, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=case.torch_dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = rnd(case.B, case.H, case.N, case.D), rnd(case.B, case.H, case.N, case.D), rnd(case.B, case.H, case.N, case.dv)
    decay = None
    if case.op == "lightning":
        # TransNormerLLM / ALiBi-style per-head rates 2^(-8 (h+1) / H)
        decay = torch.tensor([2.0 ** (-8.0 * (h + 1) / case.H) for h in range(case.H)], device=device,
                             dtype=torch.float32)
    return Inputs(q, k, v, decay)


def set_bytes(case: Case) -> int:
    el = torch.tensor([], dtype=case.torch_dtype).element_size()
    if case.op == "decode":
        return case.B * case.hkv * case.N * (case.D + case.dv) * el
    return case.B * case.H * case.N * (2 * case.D + case.dv) * el


# ------------------------------------------------------------------------------------------------ varlen
def doc_lengths(mask: str, N: int) -> List[int]:
    """Document lengths of a 'varlen' case; they sum to N. ``docs:<seed>``: lengths drawn log-uniformly in
    [lo, hi] with lo = min(128, max(1, N // 32)) and hi = min(4096, max(lo, N // 4)) (at N = 16k: 128 … 4096),
    the last one cut to the remainder, then shuffled; deterministic in (seed, N)."""
    kind, _, param = mask.partition(":")
    if kind not in ("docs", "docs-causal"):
        raise ValueError(f"unknown varlen mask {mask!r} (expected docs:<seed>)")
    if N < 1:
        raise ValueError(f"varlen needs N >= 1 packed tokens, got {N}")
    rng = random.Random(f"{param}/{N}")
    lo = min(128, max(1, N // 32))
    hi = min(4096, max(lo, N // 4))
    lens, left = [], N
    while left > 0:
        n = min(left, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
        lens.append(n)
        left -= n
    rng.shuffle(lens)
    return lens


def doc_density(mask: str, N: int) -> float:
    """Σ len_i² / N²: the fraction of the N×N score matrix a packed document mask keeps (before causal)."""
    return sum(n * n for n in doc_lengths(mask, N)) / float(N * N)


def cu_seqlens(lens: Sequence[int], device) -> torch.Tensor:
    """int32 (len(lens) + 1,) cumulative lengths starting at 0 (FlashAttention's varlen convention)."""
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lens), dtype=torch.int64).cumsum(0).to(torch.int32)
    return out.to(device)


def varlen_mask(case: "Case") -> str:
    """The :class:`MaskCache` name of a varlen case's mask on the packed row: ``docs:<seed>`` (same document)
    or ``docs-causal:<seed>`` (same document and causal)."""
    return ("docs-causal:" if case.causal else "docs:") + case.mask.partition(":")[2]


# ------------------------------------------------------------------------------------------------ decode
DECODE_PAGE = 64  # page size of the paged-cache provider


def decode_lengths(mask: str, B: int, L: int) -> List[int]:
    """Cache length of each of the B sequences of a 'decode' case of cache length L. ``""``: all L.
    ``ragged:<seed>``: uniform in [1, L], one of them exactly L (the capacity is used); deterministic in
    (seed, B, L)."""
    if L < 1 or B < 1:
        raise ValueError(f"decode needs B >= 1 sequences and a cache length L >= 1, got B={B}, L={L}")
    if mask == "":
        return [L] * B
    kind, _, seed = mask.partition(":")
    if kind != "ragged":
        raise ValueError(f"unknown decode cache lengths {mask!r} (expected '' or ragged:<seed>)")
    rng = random.Random(f"{seed}/{B}/{L}")
    lens = [rng.randint(1, L) for _ in range(B)]
    lens[rng.randrange(B)] = L
    return lens


def decode_kv_bytes(case: Case) -> int:
    """K / V bytes a decode step reads: Σ_b L_b·Hkv·(D + Dv)·element size (:data:`DECODE_RULE`)."""
    el = torch.tensor([], dtype=case.torch_dtype).element_size()
    return sum(decode_lengths(case.mask, case.B, case.N)) * case.hkv * (case.D + case.dv) * el


def decode_inputs(case: Case, device, seed: int = 0) -> Inputs:
    """q (B, Hq, 1, D) and contiguous caches k (B, Hkv, L, D) / v (B, Hkv, L, Dv) of capacity L, drawn on the
    device (a 128k cache at B=64 is 32 GiB: no host round trip), both views of one buffer
    ``extra['kv']`` (what the copy baseline moves); ``extra['cache_seqlens']`` (B,) int32."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, hkv, L, D, dv = case.B, case.hkv, case.N, case.D, case.dv
    kw = dict(generator=g, device=device, dtype=case.torch_dtype)
    q = torch.randn(B, case.H, 1, D, **kw)
    kv = torch.randn(B * hkv * L * (D + dv), **kw)
    k = kv[: B * hkv * L * D].view(B, hkv, L, D)
    v = kv[B * hkv * L * D:].view(B, hkv, L, dv)
    lens = torch.tensor(decode_lengths(case.mask, B, L), dtype=torch.int32, device=device)
    return Inputs(q, k, v, extra={"kv": kv, "cache_seqlens": lens})


def paged_cache(k: torch.Tensor, v: torch.Tensor, page: int, seed: int = 0):
    """The contiguous caches (B, Hkv, L, D) rewritten as a paged pool (num_pages, page, Hkv, D) of
    ceil(L / page) pages per sequence, pages shuffled over the pool (a serving engine's free list after some
    traffic). Returns (k_pool, v_pool, block_table (B, pages) int32). Copied one sequence at a time, so the
    extra memory is one sequence's worth."""
    B, hkv, L, _ = k.shape
    P = -(-L // page)
    g = torch.Generator(device="cpu").manual_seed(1000 + seed)
    table = torch.randperm(B * P, generator=g).view(B, P)
    pools = []
    for x in (k, v):
        pool = x.new_zeros(B * P, page, hkv, x.shape[-1])
        for b in range(B):
            xb = torch.nn.functional.pad(x[b], (0, 0, 0, P * page - L))  # (Hkv, P·page, D)
            pool[table[b].to(x.device)] = xb.view(hkv, P, page, -1).permute(1, 2, 0, 3)
        pools.append(pool)
    return pools[0], pools[1], table.to(device=k.device, dtype=torch.int32)


def decode_metrics(case: Case, ms: float, copy: bool) -> dict:
    """Row fields of a timed decode case: ``kv_bytes``, ``gbps`` (K/V bytes read / time; for the copy
    baseline: bytes read + written / time, its copy bandwidth)."""
    nbytes = decode_kv_bytes(case)
    return {"kv_bytes": nbytes, "gbps": (2 if copy else 1) * nbytes / (ms * 1e-3) / 1e9}


def decode_fractions(rows: Sequence[dict]) -> None:
    """Set ``copy_gbps`` and ``bw_frac`` = gbps / copy_gbps on every timed decode row, from the copy row of the
    same configuration (left None where the copy did not run)."""
    def cfg(r):
        return tuple(r.get(k) for k in ("dtype", "B", "H", "Hkv", "N", "D", "Dv", "mask"))

    copies = {cfg(r): r["gbps"] for r in rows
              if r.get("sweep") == "decode" and r.get("provider") == "copy" and r.get("status") == "ok"}
    for r in rows:
        if r.get("sweep") == "decode" and r.get("status") == "ok" and r.get("gbps"):
            c = copies.get(cfg(r))
            r["copy_gbps"] = c
            r["bw_frac"] = r["gbps"] / c if c else None


# ------------------------------------------------------------------------------------------------ masks
class MaskCache:
    """Masks of a sparse case, built once per (mask, N, H, device) and shared by the providers:
    the predicate ``fn(b, h, q_idx, kv_idx)``, its dense bool form, tileattn and FlexAttention block masks."""

    BLOCK = 128

    def __init__(self):
        self._c: Dict[tuple, object] = {}

    def clear(self):
        self._c.clear()

    def _get(self, key, build):
        if key not in self._c:
            self._c[key] = build()
        return self._c[key]

    def predicate(self, mask: str, N: int, H: int, device) -> Callable:
        kind, _, param = mask.partition(":")
        if kind == "random":
            density = float(param)

            def build():
                nb = -(-N // self.BLOCK)
                g = torch.Generator(device="cpu").manual_seed(1234 + N)
                layout = torch.rand(H, nb, nb, generator=g) < density
                layout[:, torch.arange(nb), torch.arange(nb)] = True  # every query block sees a key block
                return layout.to(device)

            layout = self._get(("layout", mask, N, H, str(device)), build)
            bs = self.BLOCK

            def fn(b, h, q_idx, kv_idx):
                return layout[h, q_idx // bs, kv_idx // bs]

            fn.layout = layout
            return fn
        if kind == "window":
            w = int(param)

            def fn(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)

            return fn
        if kind == "causal":
            return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        if kind in ("docs", "docs-causal"):  # packed documents (varlen): a document id per token
            def build_ids():
                lens = torch.tensor(doc_lengths(mask, N))
                return torch.repeat_interleave(torch.arange(len(lens)), lens).to(device)

            doc = self._get(("doc_ids", param, N, str(device)), build_ids)
            if kind == "docs":
                return lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]
            return lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        raise ValueError(f"unknown mask {mask!r} (expected random:<density>, window:<size>, causal, "
                         "docs:<seed> or docs-causal:<seed>)")

    def dense(self, mask: str, B: int, N: int, H: int, device) -> torch.Tensor:
        """(1, H, N, N) bool, True = attend (materialised: small sizes or the SDPA-with-mask provider)."""
        def build():
            fn = self.predicate(mask, N, H, device)
            ar = torch.arange(N, device=device)
            out = fn(torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                     torch.arange(H, device=device).view(1, H, 1, 1), ar.view(1, 1, N, 1), ar.view(1, 1, 1, N))
            return out.expand(1, H, N, N)
        return self._get(("dense", mask, N, H, str(device)), build)

    def tileattn(self, mask: str, N: int, H: int, device):
        import tileattn

        def build():
            fn = self.predicate(mask, N, H, device)
            if hasattr(fn, "layout") and hasattr(tileattn, "BlockMask"):
                return tileattn.BlockMask.from_layout(fn.layout[None], block_size=self.BLOCK, q_len=N, kv_len=N)
            return tileattn.create_block_mask(fn, None, H if hasattr(fn, "layout") else None, N, N,
                                              block_size=self.BLOCK, device=device)
        return self._get(("tileattn", mask, N, H, str(device)), build)

    def flex(self, mask: str, N: int, H: int, device):
        from torch.nn.attention.flex_attention import create_block_mask

        def build():
            fn = self.predicate(mask, N, H, device)
            return create_block_mask(fn, None, H if hasattr(fn, "layout") else None, N, N, device=device,
                                     BLOCK_SIZE=self.BLOCK)
        return self._get(("flex", mask, N, H, str(device)), build)

    def density(self, mask: str, N: int, H: int, device) -> float:
        """Block density (visited blocks / all blocks) of the mask at this size."""
        try:
            return float(self.tileattn(mask, N, H, device).density)
        except Exception:
            d = self.dense(mask, 1, N, H, device)
            nb = -(-N // self.BLOCK)
            pad = nb * self.BLOCK - N
            dd = torch.nn.functional.pad(d.float(), (0, pad, 0, pad))
            blocks = dd.view(1, H, nb, self.BLOCK, nb, self.BLOCK).amax(dim=(3, 5))
            return float(blocks.mean())


MASKS = MaskCache()


# ------------------------------------------------------------------------------------------------ launches
@contextlib.contextmanager
def count_triton_launches():
    """Record the names of the Triton kernels launched inside the block (JITFunction.run and the
    interpreter's InterpretedFunction.run are wrapped). Yields a list that fills with names."""
    names: List[str] = []
    patched = []
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except Exception:
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except Exception:
        pass
    for cls in classes:
        orig = cls.__dict__.get("run")
        if orig is None:
            continue

        def wrapped(self, *args, __orig=orig, **kwargs):
            fn = getattr(self, "fn", None)
            names.append(getattr(fn, "__name__", None) or getattr(self, "__name__", "?"))
            return __orig(self, *args, **kwargs)

        cls.run = wrapped
        patched.append((cls, orig))
    try:
        yield names
    finally:
        for cls, orig in patched:
            cls.run = orig


# ------------------------------------------------------------------------------------------------ gate
@dataclass
class GateResult:
    ok: bool
    raised: bool = False  # the provider raised (unsupported config or a bug), as opposed to a wrong answer
    err: float = float("nan")  # worst err / tol ratio over the checked tensors
    detail: str = ""
    kernels: Tuple[str, ...] = ()


def _reference(case: Case, inp: Inputs, upcast: bool):
    from tileattn import reference as R

    if case.op == "lightning":
        out, _ = R.linear_attention_quadratic_ref(inp.q, inp.k, inp.v, inp.decay, scale=inp.extra.get("scale"),
                                                  upcast=upcast)
        return out
    if case.op == "decode":  # contiguous caches, per-sequence lengths; Nq = 1 sees every cached key
        out, _ = R.attention_kvcache_ref(inp.q, inp.k, inp.v, inp.extra["cache_seqlens"], causal=case.causal,
                                         scale=inp.extra.get("scale"), upcast=upcast)
        return out
    if case.op == "varlen":  # per document, on the packed (N, H, D) layout
        cu = cu_seqlens(doc_lengths(case.mask, case.N), inp.q.device)
        packed = [x[0].transpose(0, 1) for x in (inp.q, inp.k, inp.v)]
        out, _ = R.attention_varlen_ref(*packed, cu, cu, causal=case.causal, scale=inp.extra.get("scale"),
                                        upcast=upcast)
        return out.transpose(0, 1)[None]
    mask = None
    if case.op == "sparse":
        mask = MASKS.dense(case.mask, case.B, case.N, case.H, inp.q.device)
    out, _ = R.attention_ref(inp.q, inp.k, inp.v, causal=case.causal, mask=mask, upcast=upcast)
    return out


def gate(provider, case: Case, device, small: Optional[Case] = None) -> GateResult:
    """Run ``provider`` at ``small`` (default: the small version of ``case``) and compare to the float64
    reference (output, and dq/dk/dv when the case has a backward). Records which Triton kernels launched."""
    small = case.small(getattr(provider, "gate_n", None)) if small is None else small
    with_bwd = small.mode != "fwd"
    inp = make_inputs(small, device, requires_grad=with_bwd, seed=17)
    if provider.scale is not None:
        inp.extra["scale"] = provider.scale
    try:
        with provider.context(small), count_triton_launches() as names:
            built = provider.build(small, inp, MASKS, for_gate=True)
            out = built.fn()
            do = torch.randn_like(out) if with_bwd else None
            grads = torch.autograd.grad(out, [inp.q, inp.k, inp.v], do) if with_bwd else ()
    except Exception as e:  # an unsupported config or a broken provider: not timed
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return GateResult(False, raised=True, detail=f"gate raised {type(e).__name__}: {msg}")
    kernels = tuple(sorted(set(names)))
    expected = getattr(provider, "expected", None)
    if expected is not None:  # a data-movement baseline (the decode sweep's copy): bitwise what it moves
        want = expected(small, inp)
        ok = tuple(out.shape) == tuple(want.shape) and torch.equal(out, want)
        return GateResult(ok, err=0.0 if ok else float("inf"), detail="bitwise copy" if ok else "copy differs",
                          kernels=kernels)
    worst, lines = 0.0, []
    ref64 = _reference(small, inp, upcast=True)
    ref_lp = _reference(small, inp, upcast=False)
    checks = [("out", out, ref64, ref_lp)]
    if with_bwd:
        g64 = torch.autograd.grad(ref64, [inp.q, inp.k, inp.v], do.double())
        glp = torch.autograd.grad(ref_lp, [inp.q, inp.k, inp.v], do.to(ref_lp.dtype))
        checks += [(n, g, a, b) for n, g, a, b in zip(("dq", "dk", "dv"), grads, g64, glp)]
    for name, got, r64, rlp in checks:
        if got.shape != r64.shape:
            return GateResult(False, detail=f"{name}: shape {tuple(got.shape)} != {tuple(r64.shape)}", kernels=kernels)
        err = helpers.rel_err(got.detach().float(), r64.detach())
        base = helpers.rel_err(rlp.detach().float(), r64.detach())
        tol = 2.0 * base + helpers.FLOOR.get(small.torch_dtype, 1e-3)
        worst = max(worst, err / tol)
        lines.append(f"{name} {err:.2e}/{tol:.2e}")
    ok = worst <= 1.0
    return GateResult(ok, err=worst, detail=", ".join(lines), kernels=kernels)


# ------------------------------------------------------------------------------------------------ timing
def _sync():
    if on_cuda():
        torch.cuda.synchronize()


def bench_ms(fn: Callable, grad_to_none: Sequence[torch.Tensor] = (), warmup: int = 25, rep: int = 100
             ) -> Tuple[float, float, float]:
    """(median, p20, p80) milliseconds. CUDA: ``triton.testing.do_bench`` (L2 flushed between runs). CPU:
    wall clock over a few runs (only for the harness self-test; not a kernel benchmark)."""
    if on_cuda():
        import triton.testing

        res = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                                      quantiles=[0.5, 0.2, 0.8])
        return float(res[0]), float(res[1]), float(res[2])
    fn()
    times = []
    t_end = time.perf_counter() + rep / 1000.0
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 20):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory():
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def n_rotation_sets(case: Case, max_sets: int = 4) -> int:
    """Enough input sets that their total exceeds ~4x the L2 cache (1 when one set already does)."""
    l2 = 50 << 20
    if on_cuda():
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2
    return max(1, min(max_sets, math.ceil(4 * l2 / max(1, set_bytes(case)))))


def measure(provider, case: Case, device, warmup: int = 25, rep: int = 100) -> dict:
    """Time and measure one (provider, case). Returns the row fields ``ms, ms_p20, ms_p80, peak_mem_mb,
    extra_mem_mb, sets``. Raises on failure (the caller records OOM / errors)."""
    bwd = case.mode != "fwd"
    res: dict = {}
    with provider.context(case):
        # set 0: warm-up (compiles / autotunes), then peak memory of one call (fwd) or one fwd+bwd step
        inp0 = make_inputs(case, device, requires_grad=bwd, seed=0)
        built0 = provider.build(case, inp0, MASKS, for_gate=False)
        out = built0.fn()
        if bwd:
            out.backward(torch.randn_like(out))
        del out
        for t in built0.leaves:
            t.grad = None
        _sync()
        if on_cuda():
            free_memory()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = built0.fn()
            if bwd:
                out.backward(torch.randn_like(out))
            del out
            _sync()
            peak = torch.cuda.max_memory_allocated()
            res["peak_mem_mb"] = peak / 2**20
            res["extra_mem_mb"] = (peak - base) / 2**20
            for t in built0.leaves:
                t.grad = None
        else:
            res["peak_mem_mb"] = res["extra_mem_mb"] = None
        sets = [built0] + [provider.build(case, make_inputs(case, device, requires_grad=bwd, seed=s), MASKS,
                                          for_gate=False) for s in range(1, n_rotation_sets(case))]
        res["sets"] = len(sets)
        leaves = [t for b in sets for t in b.leaves]
        i = [0]
        if case.mode == "fwd":
            fns = [b.fn for b in sets]

            def step():
                i[0] = (i[0] + 1) % len(fns)
                fns[i[0]]()
        elif case.mode == "bwd":
            outs = [b.fn() for b in sets]
            dos = [torch.randn_like(o) for o in outs]

            def step():
                i[0] = (i[0] + 1) % len(outs)
                outs[i[0]].backward(dos[i[0]], retain_graph=True)
        else:
            fns = [b.fn for b in sets]
            probe = fns[0]()
            do = torch.randn_like(probe)
            del probe

            def step():
                i[0] = (i[0] + 1) % len(fns)
                fns[i[0]]().backward(do)

        ms, p20, p80 = bench_ms(step, leaves, warmup=warmup, rep=rep)
        res.update(ms=ms, ms_p20=p20, ms_p80=p80)
    return res


def base_row(provider_name: str, case: Case, sweep: str) -> dict:
    row = {"sweep": sweep, "op": case.op, "provider": provider_name, "mode": case.mode, "dtype": case.dtype, "B": case.B,
           "H": case.H, "Hkv": case.Hkv, "N": case.N, "D": case.D, "Dv": case.dv, "causal": case.causal, "mask": case.mask,
           "density": None, "ms": None, "ms_p20": None, "ms_p80": None, "tflops": None, "flops": None,
           "flop_rule": "", "peak_mem_mb": None, "extra_mem_mb": None, "sets": None, "status": "",
           "note": "", "gate_err": None, "kernels": ""}
    row.update(env_info())
    row["time"] = timestamp()
    return row


def case_flops(case: Case, density: Optional[float]) -> Tuple[float, str]:
    """FLOPs of a case and the rule used (softmax rule for 'softmax' / 'sparse', linear rule for 'lightning',
    the softmax rule at density Σ len_i² / N² for 'varlen', :data:`DECODE_RULE` for 'decode')."""
    if case.op == "lightning":
        return linear_flops(case.B, case.H, case.N, case.D, case.dv, case.mode), LINEAR_RULE
    if case.op == "decode":  # Nq = 1 query per sequence over its L_b cached keys
        keys = sum(decode_lengths(case.mask, case.B, case.N))
        return 2.0 * case.H * keys * (case.D + case.dv), DECODE_RULE
    if case.op == "varlen":
        d = doc_density(case.mask, case.N) if density is None else density
        return softmax_flops(case.B, case.H, case.N, case.D, case.dv, case.mode, case.causal, d), VARLEN_RULE
    d = 1.0 if density is None else density
    return softmax_flops(case.B, case.H, case.N, case.D, case.dv, case.mode, case.causal, d), SOFTMAX_RULE

