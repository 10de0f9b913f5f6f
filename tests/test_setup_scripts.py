"""scripts/test-deps.sh: what `make test` runs first. Present packages pass; a missing one is named, with the
command that installs it, where the script cannot install it itself (not root)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "test-deps.sh"


def test_everything_present_passes_quietly():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "missing" not in result.stderr


def test_a_missing_package_is_named_with_its_install_command_when_not_root(tmp_path):
    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None:
        pytest.skip("needs root to run the script as another user")
    env = {**os.environ, "ONEVLM_TEST_APT_PACKAGES": "dcmtk onevlm-no-such-package"}
    result = subprocess.run([runuser, "-u", "nobody", "--", "bash", str(SCRIPT)], capture_output=True, text=True,
                            timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "test-deps: missing Debian package(s): onevlm-no-such-package" in result.stderr
    assert "sudo apt-get install --no-install-recommends onevlm-no-such-package" in result.stderr
    assert "dcmtk" not in result.stderr.split("missing Debian package(s):")[1].splitlines()[0]
