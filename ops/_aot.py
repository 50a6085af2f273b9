"""Ahead-of-time compilation of the shipped kernel configs, and their resource usage (no GPU needed).

Every kernel module under ``tileattn.kernels`` that defines ``aot_specs() -> list[KernelSpec]`` is compiled
for each arch in ``spec.archs`` with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.
Registers and stack (spill) bytes come from ``cuobjdump --dump-resource-usage`` on the cubin, shared memory
from the compiled kernel's metadata, and tensor-core use from the PTX (``mma.sync`` / ``wgmma``).

Shared by ``scripts/kernel_report.py``, ``python -m bench`` and the tests. It must run in a process where
``TRITON_INTERPRET`` is off (the interpreter replaces ``@triton.jit`` functions by interpreted ones that
cannot be compiled); :func:`run_report` checks and says so.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "SHARED_LIMITS",
    "discover_modules",
    "collect_specs",
    "compile_spec",
    "parse_resource_usage",
    "run_report",
    "failures",
    "format_table",
]

# Maximum dynamic shared memory per block (opt-in), bytes: A100 163 KB, H100 227 KB.
SHARED_LIMITS: Dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def discover_modules() -> Tuple[List[str], Dict[str, str]]:
    """Names of the ``tileattn.kernels`` modules that define ``aot_specs()``, and import errors by module."""
    import tileattn.kernels as pkg

    names, errors = [], {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        full = f"{pkg.__name__}.{info.name}"
        try:
            mod = importlib.import_module(full)
        except Exception as e:  # a kernel module that does not import is a failure of the report
            errors[full] = f"{type(e).__name__}: {e}"
            continue
        if callable(getattr(mod, "aot_specs", None)):
            names.append(full)
    return names, errors


def _load_specs(module: str) -> list:
    return list(importlib.import_module(module).aot_specs())


def collect_specs(modules: Sequence[str], filt: Optional[str] = None,
                  first_per_module: bool = False) -> List[dict]:
    """One job per (spec, arch): ``{"module", "index", "name", "arch", "tags", ...}``. ``filt`` keeps jobs
    whose ``module.name`` contains the substring (or any of a list of substrings); ``first_per_module`` keeps the first spec of each module."""
    jobs = []
    for module in modules:
        specs = _load_specs(module)
        kept = 0
        for i, spec in enumerate(specs):
            full = f"{module.rsplit('.', 1)[-1]}.{spec.name}"
            if filt and not any(f in full for f in ([filt] if isinstance(filt, str) else filt)):
                continue
            if first_per_module and kept >= 1:
                break
            kept += 1
            for arch in spec.archs:
                jobs.append({"module": module, "index": i, "name": spec.name, "arch": int(arch),
                             "num_warps": spec.num_warps, "num_stages": spec.num_stages,
                             "tags": dict(spec.tags)})
    return jobs


def _tool(name: str) -> Optional[str]:
    """Path of a CUDA binary Triton ships (``triton/backends/nvidia/bin``), else from PATH."""
    try:
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    except Exception:
        pass
    return shutil.which(name)


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """Parse ``cuobjdump --dump-resource-usage`` output into ``{function: {"REG": .., "STACK": .., ...}}``."""
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        if current is not None:
            for key, val in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line):
                out[current][key] = int(val)
    return out


def _cubin_resources(cubin: bytes, tmpdir: str) -> Tuple[Dict[str, int], Optional[str]]:
    tool = _tool("cuobjdump")
    if tool is None:
        return {}, "cuobjdump not found"
    path = os.path.join(tmpdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    if res.returncode != 0:
        return {}, f"cuobjdump failed: {res.stderr.strip()[:200]}"
    funcs = parse_resource_usage(res.stdout)
    if not funcs:
        return {}, "cuobjdump printed no function"
    # one kernel per cubin; take the largest register count if several functions appear
    return max(funcs.values(), key=lambda d: d.get("REG", 0)), None


def _sass(cubin: bytes, tmpdir: str) -> Optional[str]:
    """``cuobjdump -sass`` listing of a cubin, or None if unavailable."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    path = os.path.join(tmpdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    res = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def _spill_instructions(sass: Optional[str]) -> Optional[int]:
    """Number of local-memory load/store instructions (STL/LDL) in the SASS, or None if unavailable."""
    return None if sass is None else len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass))


def tensor_core_kind(ptx: str) -> str:
    """``"wgmma"`` (Hopper warpgroup MMA), ``"mma"`` (mma.sync), or ``"-"`` from a kernel's PTX."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "-"


def compile_spec(spec, arch: int, sass: bool = False) -> dict:
    """AOT-compile one :class:`tileattn.kernels.utils.KernelSpec` for ``sm_<arch>`` and return a row:
    registers, stack (spill) bytes, local bytes, shared memory (bytes) and its limit, tensor-core kind,
    compile seconds, ``spills`` / ``smem_over`` flags and ``error`` (None when it compiled). With ``sass``,
    also ``loops``: the per-iteration study of every main loop (:func:`tileattn._sass.analyse`), with the
    nominal MMA FLOPs of one iteration taken from ``spec.tags["iter_flops"]`` when the spec gives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    row = {"name": spec.name, "arch": f"sm_{arch}", "num_warps": spec.num_warps,
           "num_stages": spec.num_stages, "tags": dict(spec.tags), "regs": None, "stack": None,
           "local": None, "spill_instr": None, "shared": None, "shared_limit": SHARED_LIMITS.get(arch),
           "tensor_cores": None, "compile_s": None, "spills": False, "smem_over": False, "error": None}
    fn = spec.fn
    if not isinstance(fn, JITFunction):
        row["error"] = (f"{type(fn).__name__} is not a triton JITFunction: AOT compilation needs TRITON_INTERPRET "
                        "unset before tileattn is imported")
        return row
    signature = dict(spec.signature)
    for k in spec.constexprs:
        signature.setdefault(k, "constexpr")
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        row["error"] = f"signature lacks arguments {missing}"
        return row
    signature = {a: signature[a] for a in fn.arg_names}
    # pointers are 16-byte aligned at run time (torch allocations): give the compiler the same hint
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if signature[a].startswith("*")}
    # plus whatever else the spec says the JIT specialises as a multiple of 16 (e.g. strides)
    for name in getattr(spec, "divisible_16", ()):
        attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", int(arch), 32)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                kernel = triton.compile(ASTSource(fn, signature, dict(spec.constexprs), attrs),
                                        target=target, options=options)
            except (TypeError, AssertionError, KeyError):
                # an attrs format this Triton version does not take: compile without the alignment hint
                kernel = triton.compile(ASTSource(fn, signature, dict(spec.constexprs)), target=target,
                                        options=options)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["shared"] = int(getattr(kernel.metadata, "shared", 0) or 0)
    row["tensor_cores"] = tensor_core_kind(kernel.asm.get("ptx", ""))
    with tempfile.TemporaryDirectory() as tmp:
        res, err = _cubin_resources(kernel.asm["cubin"], tmp)
        if err:
            row["error"] = err
        else:
            row["regs"], row["stack"], row["local"] = res.get("REG"), res.get("STACK", 0), res.get("LOCAL", 0)
            row["spills"] = bool(row["stack"] or row["local"])
            listing = _sass(kernel.asm["cubin"], tmp) if (sass or row["spills"]) else None
            row["spill_instr"] = _spill_instructions(listing) if row["spills"] else 0
            if row["spills"] and listing is not None:
                from tileattn._sass import spills_in_loops

                row["spill_instr_in_loops"] = spills_in_loops(listing)
            if sass and listing is not None:
                from tileattn._sass import analyse

                row["loops"] = analyse(listing, spec.num_warps, spec.tags.get("iter_flops"))
    if row["shared_limit"] is not None and row["shared"] > row["shared_limit"]:
        row["smem_over"] = True
    return row


def _job(module: str, index: int, arch: int, sass: bool = False) -> dict:
    spec = _load_specs(module)[index]
    row = compile_spec(spec, arch, sass)
    row["module"] = module.rsplit(".", 1)[-1]
    return row


def run_report(filt: Optional[str] = None, jobs: Optional[int] = None, first_per_module: bool = False,
               modules: Optional[Sequence[str]] = None, progress=None, sass: bool = False,
               archs: Optional[Sequence[int]] = None) -> List[dict]:
    """Compile every shipped config (or the filtered / first-per-module subset) and return one row per
    (spec, arch), in a stable order. ``modules``: full module names (default: all discovered).
    ``jobs``: worker processes (default: CPU count, at most 8; 1 = in this process).
    ``progress(done, total, row)`` is called after each compile. Import errors of kernel modules come back
    as rows with an ``error``."""
    if _interpreter_on():
        raise RuntimeError("the kernel report needs TRITON_INTERPRET unset (it compiles real JITFunctions); "
                           "run it in a process started without TRITON_INTERPRET")
    rows: List[dict] = []
    if modules is None:
        modules, errors = discover_modules()
        for mod, err in errors.items():
            rows.append({"module": mod.rsplit(".", 1)[-1], "name": "<import>", "arch": "-", "error": err,
                         "spills": False, "smem_over": False})
    todo = collect_specs(modules, filt, first_per_module)
    if archs:
        todo = [j for j in todo if j["arch"] in archs]
    jobs = jobs or min(8, os.cpu_count() or 1)
    results: List[Optional[dict]] = [None] * len(todo)
    if jobs <= 1 or len(todo) <= 1:
        for i, j in enumerate(todo):
            results[i] = _job(j["module"], j["index"], j["arch"], sass)
            if progress:
                progress(i + 1, len(todo), results[i])
    else:
        import multiprocessing as mp

        # spawn: workers import tileattn fresh (no interpreter state, no CUDA context inherited)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_job, j["module"], j["index"], j["arch"], sass): i for i, j in enumerate(todo)}
            done = 0
            from concurrent.futures import as_completed

            for fut in as_completed(futs):
                i = futs[fut]
                try:
                    results[i] = fut.result()
                except Exception as e:
                    j = todo[i]
                    results[i] = {"module": j["module"].rsplit(".", 1)[-1], "name": j["name"],
                                  "arch": f"sm_{j['arch']}", "error": f"{type(e).__name__}: {e}",
                                  "spills": False, "smem_over": False}
                done += 1
                if progress:
                    progress(done, len(todo), results[i])
    rows.extend(r for r in results if r is not None)
    return rows


def failures(rows: Sequence[dict]) -> List[str]:
    """Human-readable reasons the report fails (spills, shared memory over the limit, compile errors)."""
    out = []
    for r in rows:
        where = f"{r.get('module')}.{r.get('name')} [{r.get('arch')}]"
        if r.get("error"):
            out.append(f"{where}: {r['error']}")
        if r.get("spills"):
            out.append(f"{where}: spills ({r.get('stack')} B stack, {r.get('local')} B local, "
                       f"{r.get('spill_instr')} STL/LDL, {r.get('spill_instr_in_loops')} inside main loops)")
        if r.get("smem_over"):
            out.append(f"{where}: shared memory {r.get('shared')} B > limit {r.get('shared_limit')} B")
    return out


def _fmt_tags(tags: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in tags.items())


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the report rows."""
    head = ["module", "config", "arch", "warps", "stages", "regs", "spill/stack B", "smem KB", "limit KB",
            "TC", "compile s", "status"]
    lines = []
    for r in rows:
        status = "ok"
        if r.get("error"):
            status = "ERROR"
        elif r.get("spills"):
            status = "SPILLS"
        elif r.get("smem_over"):
            status = "SMEM>LIMIT"
        name = r.get("name", "")
        if r.get("tags"):
            name = f"{name} ({_fmt_tags(r['tags'])})"
        stack = r.get("stack")
        if stack is not None and r.get("local"):
            stack = f"{stack}+{r['local']}L"
        lines.append([
            str(r.get("module", "")), name, str(r.get("arch", "")), str(r.get("num_warps", "")),
            str(r.get("num_stages", "")), "" if r.get("regs") is None else str(r["regs"]),
            "" if stack is None else str(stack),
            "" if r.get("shared") is None else f"{r['shared'] / 1024:.1f}",
            "" if r.get("shared_limit") is None else f"{r['shared_limit'] // 1024}",
            str(r.get("tensor_cores") or ""), "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
            status,
        ])
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    return "\n".join(out)
