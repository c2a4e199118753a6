"""Supported versions: declared in pyproject.toml, checked at import with a clear error."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moe_ops.versions import INTERPRETER_NUMPY_BELOW, MIN_TORCH, MIN_TRITON, check_versions

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def dotted(version):
    return ".".join(map(str, version))


def test_pyproject_declares_the_checked_floors():
    project = PYPROJECT["project"]
    assert f"torch>={dotted(MIN_TORCH)}" in project["dependencies"]
    assert f"triton>={dotted(MIN_TRITON)}" in project["dependencies"]
    assert project["optional-dependencies"]["cpu"] == [f"numpy<{dotted(INTERPRETER_NUMPY_BELOW)}"]
    assert all("numpy<" not in dep for dep in project["dependencies"])  # GPU installs are free


@pytest.mark.parametrize("torch_version, triton_version, match", [
    ("2.6.0+cu124", "3.2.0", r"needs torch>=2\.11, found torch 2\.6\.0\+cu124"),
    ("2.11.0", "3.3.1", r"needs triton>=3\.6, found triton 3\.3\.1"),
    ("2.10.0a0+git1234", "3.6.0", r"needs torch>=2\.11"),
])
def test_old_versions_fail_naming_the_version_needed(torch_version, triton_version, match):
    with pytest.raises(ImportError, match=match):
        check_versions(torch_version, triton_version)


def test_numpy_2_4_fails_only_under_the_interpreter():
    with pytest.raises(ImportError, match=r"interpreter .* needs numpy<2\.4, found numpy 2\.4\.0"):
        check_versions("2.13.0+cpu", "3.6.0", "2.4.0", interpreter=True)
    check_versions("2.11.0", "3.6.0", "2.4.0", interpreter=False)
    check_versions("2.13.0+cpu", "3.6.0", "2.3.5", interpreter=True)


def test_supported_versions_pass():
    check_versions("2.11.0+cu130", "3.6.0")
    check_versions("2.13.0+cpu", "3.7.1", "2.4.0", interpreter=True)  # not known to be broken


def test_import_checks_the_installed_versions():
    """`import moe_ops` runs the check: a too-old triton stops the import with its message."""
    script = ("import sys, triton; triton.__version__ = '3.2.0'\n"
              "try:\n    import moe_ops\nexcept ImportError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "moe_ops needs triton>=3.6, found triton 3.2.0 (torch 2.11 and later ship it)"
