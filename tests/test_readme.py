"""What a new user reads first: the README's CPU examples run, the package docstring's
pointers exist."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import triton

import moe_ops
from moe_ops.versions import check_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()
CPU_EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S)
                if block.startswith("# CPU")]


def test_readme_has_cpu_examples_for_the_ops_and_the_module():
    assert len(CPU_EXAMPLES) == 2
    assert "tritonmoe.fused_moe" in CPU_EXAMPLES[0] and "FusedMoE.from_config" in CPU_EXAMPLES[1]
    assert all("shrink(" in example for example in CPU_EXAMPLES)


@pytest.mark.parametrize("index", range(len(CPU_EXAMPLES)))
def test_readme_cpu_example_runs(index, tmp_path):
    try:  # a GPU host's numpy may be one the interpreter (which the examples set) rejects
        check_versions(torch.__version__, triton.__version__, numpy.__version__, interpreter=True)
    except ImportError as unsupported:
        pytest.skip(f"the CPU examples cannot run on this install: {unsupported}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the example sets it
    done = subprocess.run([sys.executable, "-c", CPU_EXAMPLES[index]], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_package_docstring_points_to_files_that_exist():
    named = re.findall(r"[\w./-]+\.md|[\w]+/[\w/]*", moe_ops.__doc__)
    assert named
    package_dir = Path(moe_ops.__file__).parent
    for name in named:
        assert (REPO_ROOT / name).exists() or (package_dir / name).exists(), name
