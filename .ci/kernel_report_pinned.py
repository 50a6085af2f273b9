"""CI: run ``scripts/kernel_report.py`` under a pinned Triton and fail on any problem not listed as known.

    PYTHONPATH=.ci-triton36 python .ci/kernel_report_pinned.py 3.6.0 .ci/triton36-known-spills.txt [report args]

Checks that ``import triton`` in this process (and so in the report's spawned workers, which inherit
PYTHONPATH) is the pinned version and prints it, runs the report (its table goes to the log), then compares
its failures with KNOWN_FILE: one ``module.config [arch]`` per line (``#`` comments), spills the pinned
Triton is known to produce. Exit 1 on any compile error, shared-memory overflow or spill not in the list,
and on a listed config that was compiled and no longer fails (delete its line: the list only shrinks). A listed
config may spill only outside its main loops (see ``tileattn._sass.spills_in_loops``). An empty or missing
list means zero problems are allowed.
"""
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _known(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {ln.split("#", 1)[0].strip() for ln in f} - {""}


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    want, known_file, report_args = argv[0], argv[1], argv[2:]
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    print(f"kernel report under triton {triton.__version__} ({os.path.dirname(triton.__file__)})", flush=True)
    if triton.__version__ != want:
        print(f"error: expected triton {want} first on the path, got {triton.__version__}", file=sys.stderr)
        return 1
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import kernel_report

    with tempfile.TemporaryDirectory() as tmp:
        jpath = os.path.join(tmp, "report.json")
        rc = kernel_report.main(report_args + ["--json", jpath])
        if rc not in (0, 1) or not os.path.exists(jpath):
            print(f"error: kernel_report.py exited {rc} without a report", file=sys.stderr)
            return 1
        with open(jpath) as f:
            doc = json.load(f)
    if doc.get("triton") != want:
        print(f"error: the report ran under triton {doc.get('triton')}, not {want}", file=sys.stderr)
        return 1
    known = _known(known_file)
    failing = {}
    for msg in doc["failures"]:
        where, why = msg.split(": ", 1)
        failing.setdefault(where, []).append(why)
    # a listed config may spill only outside its main loops (loop-invariant values around the loops,
    # reloaded once per program / outer step): a spill inside a main loop costs every iteration
    unexpected = [f"{w}: {why}" for w, whys in failing.items() for why in whys
                  if w not in known or not why.startswith("spills") or not why.endswith(", 0 inside main loops)")]
    compiled = {f"{r.get('module')}.{r.get('name')} [{r.get('arch')}]" for r in doc["rows"]}
    stale = sorted((known & compiled) - set(failing))  # a --filter / --module run checks only its configs
    for w in sorted(set(failing) & known):
        print(f"KNOWN (listed in {os.path.relpath(known_file, REPO)}): {w}: {'; '.join(failing[w])}")
    for msg in unexpected:
        print(f"NEW FAILURE under triton {want}: {msg}")
    for w in stale:
        print(f"STALE: {w} is listed as known but no longer fails: delete its line from {known_file}")
    print(f"triton {want}: {len(doc['rows'])} compiles, {len(unexpected)} new failures, "
          f"{len(set(failing) & known)} known spills, {len(stale)} stale entries, {doc.get('seconds')} s")
    return 1 if unexpected or stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
