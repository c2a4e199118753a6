"""What a new user reads first: the README's CPU examples run exactly as written, and every
command, module and file it names exists; so do the package docstring's pointers."""
import importlib.util
import itertools
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
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# A CPU example is marked by its first line, which the user must run first: the
# interpreter has to be on before torch, triton or moe_ops is imported.
CPU_MARKER = 'import os; os.environ["TRITON_INTERPRET"] = "1"'
CPU_EXAMPLES = [block for block in PYTHON_BLOCKS if block.startswith(CPU_MARKER)]
# Folders the commands create (git-ignored).
RUN_OUTPUTS = {"benchmarks/results-cpu-interpreter/"}
TOP_LEVEL = {"moe_ops", "distributed", "tests", "benchmarks", "tools", ".ci"}
ROOT_FILES = {"README.md", "LICENSE", "Makefile", "pyproject.toml"}


def test_readme_has_cpu_examples_for_the_ops_the_module_and_the_hf_patch():
    assert len(CPU_EXAMPLES) >= 4
    covered = "\n".join(CPU_EXAMPLES)
    for api in ("torch.ops.tritonmoe.fused_moe", "torch.ops.tritonmoe.route",
                "torch.ops.tritonmoe.fused_experts", "FusedMoE.from_config", "patch_hf_model"):
        assert api in covered, api
    for example in CPU_EXAMPLES:  # real model sizes would take the interpreter minutes
        assert "shrink(" in example or "MixtralConfig(" in example, example


def test_every_example_that_sets_the_interpreter_starts_with_it():
    for block in PYTHON_BLOCKS:
        if "TRITON_INTERPRET" in block:
            assert block.startswith(CPU_MARKER), block
        else:  # the others are GPU examples
            assert "cuda" in block, block


@pytest.mark.parametrize("index", range(len(CPU_EXAMPLES)))
def test_readme_cpu_example_runs(index, tmp_path):
    try:  # a GPU host's numpy may be one the interpreter (which the examples set) rejects
        check_versions(torch.__version__, triton.__version__, numpy.__version__, interpreter=True)
    except ImportError as unsupported:
        pytest.skip(f"the CPU examples cannot run on this install: {unsupported}")
    if "transformers" in CPU_EXAMPLES[index]:
        pytest.importorskip("transformers")
    # The example must switch the interpreter on itself; it runs against this checkout.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", CPU_EXAMPLES[index]], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_two_commands_are_make_targets():
    assert re.search(r"```bash\nmake bench\b.*\nmake test\b", README), "the two commands"
    targets = re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), flags=re.M)
    assert {"bench", "test"} <= set(targets)


def test_every_module_the_readme_runs_exists():
    modules = set(re.findall(r"\bpython3? -m ([\w.]*\w)", README))
    modules |= set(re.findall(r"\btorchrun\b[^\n`]*? -m ([\w.]*\w)", README))
    assert {"benchmarks.bench_moe", "benchmarks.bench_ep", "tools.tune"} <= modules
    missing = [name for name in sorted(modules) if importlib.util.find_spec(name) is None]
    assert not missing, missing


def _expand_braces(path: str) -> list[str]:
    """``a_{x,y}.{md,json}`` -> every combination, as a shell would expand it."""
    parts = re.split(r"(\{[^{}]*\})", path)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _named_paths(text: str) -> set[str]:
    """Repository paths in code spans, code blocks and links: tokens that start with a
    top-level folder of the checkout, or are one of its root files."""
    fenced = re.compile(r"```[\w ]*\n(.*?)```", flags=re.S)
    prose = fenced.sub(" ", text)
    tokens = re.findall(r"[\w.{},/-]+", " ".join(
        fenced.findall(text) + re.findall(r"`([^`]+)`", prose)
        + re.findall(r"\]\(([^)]+)\)", prose)))
    named = set()
    for token in tokens:
        token = token.rstrip(".,")
        if token in ROOT_FILES or (token.split("/")[0] in TOP_LEVEL and "/" in token):
            named.update(_expand_braces(token))
    return named


def test_every_file_the_readme_names_exists():
    named = _named_paths(README)
    assert "benchmarks/results/moe_nvidia-h200_uniform.md" in named
    # Results-table rows name files relative to benchmarks/results/.
    for row in re.findall(r"^\| `([^`|]+)`", README, flags=re.M):
        for path in _expand_braces(row.split()[0]):
            if not path.split("/")[0] in TOP_LEVEL:
                named.add(f"benchmarks/results/{path}")
    outputs = set(re.findall(r"--out\s+([^\s`|]+)", README))  # what a command will write
    missing = [path for path in sorted(named - RUN_OUTPUTS - outputs)
               if not (REPO_ROOT / path).exists()]
    assert not missing, missing


def test_package_docstring_points_to_files_and_sections_that_exist():
    named = re.findall(r"[\w./-]+\.md|[\w]+/[\w/]*", moe_ops.__doc__)
    assert named
    package_dir = Path(moe_ops.__file__).parent
    for name in named:
        assert (REPO_ROOT / name).exists() or (package_dir / name).exists(), name
    headings = re.findall(r"^#+ (.+)$", README, flags=re.M)
    for section in re.findall(r'under\s+"([^"]+)"', moe_ops.__doc__):
        section = " ".join(section.split())  # the docstring may wrap it
        assert any(heading.startswith(section) for heading in headings), section
