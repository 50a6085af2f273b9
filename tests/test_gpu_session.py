"""The GPU-session tooling that runs without a GPU: stage arguments of ``scripts/gpu_session.sh`` and the
per-test timeout of ``tests/conftest.py`` (TILEATTN_TEST_TIMEOUT; the offline GPU image has no
pytest-timeout). The ``check`` stage itself runs offline in ``.ci/run``."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_session.sh")


@pytest.mark.parametrize("args", [[], ["out"], ["out", "bench"], ["out", "check", "extra"]],
                         ids=["none", "no-stage", "unknown-stage", "too-many"])
def test_bad_stage_arguments_fail_before_install(tmp_path, args):
    res = subprocess.run(["bash", SCRIPT, *[str(tmp_path / a) if a == "out" else a for a in args]],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: bash scripts/gpu_session.sh OUT STAGE" in res.stderr
    assert "install" not in res.stdout


def _pytest_with_timeout(tmp_path, value):
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_t.py").write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n\n"
                                        "def test_fast():\n    pass\n")
    env = dict(os.environ, TILEATTN_TEST_TIMEOUT=value)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_per_test_timeout(tmp_path):
    res = _pytest_with_timeout(tmp_path, "1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "exceeded TILEATTN_TEST_TIMEOUT=1 s" in res.stdout and "1 failed, 1 passed" in res.stdout


def test_bad_timeout_value_stops_the_run(tmp_path):
    res = _pytest_with_timeout(tmp_path, "soon")
    assert res.returncode != 0 and "TILEATTN_TEST_TIMEOUT must be a whole number of seconds" in res.stderr
