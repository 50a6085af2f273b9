"""Seeded differential fuzz test (cases from tests/fuzzer.py, references from the README's semantics).

CI runs a small budget (``CI_CASES`` seeds, one test each); ``pytest -m fuzz`` runs a large one
(``TILEATTN_FUZZ_CASES``, default 500, from ``TILEATTN_FUZZ_SEED``, default 10000), as does
``python scripts/fuzz.py --cases N``. A failure's first line is the command that replays it.
"""
import os

import pytest

import fuzzer

CI_CASES = 36


@pytest.mark.parametrize("seed", [f"seed{s}" for s in range(CI_CASES)])
def test_fuzz_ci(seed):
    fuzzer.run(int(seed[4:]))


@pytest.mark.fuzz
def test_fuzz_large():
    start = int(os.environ.get("TILEATTN_FUZZ_SEED", "10000"))
    n = int(os.environ.get("TILEATTN_FUZZ_CASES", "500"))
    failures = []
    for s in range(start, start + n):
        try:
            fuzzer.run(s)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0] + " | " + " ".join(str(e).splitlines()[1:3]))
    assert not failures, f"{len(failures)}/{n} fuzz cases failed:\n" + "\n".join(failures)
