"""One way to run: the checkout's own moe_ops (with moe_ops.distributed) in this process and
in spawned ranks, never a top-level ``distributed``; the public functions document themselves."""
import inspect
import multiprocessing
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import moe_ops

REPO_ROOT = Path(__file__).resolve().parents[1]


def _where_a_spawned_rank_imports_from(queue):
    import moe_ops.distributed  # noqa: F401  (what the expert-parallel ranks import)

    queue.put((moe_ops.__file__, moe_ops.distributed.__file__))


def test_a_spawned_rank_imports_the_checkouts_moe_ops_distributed():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    rank = context.Process(target=_where_a_spawned_rank_imports_from, args=(queue,))
    rank.start()
    package, distributed = queue.get(timeout=120)
    rank.join(timeout=60)
    assert Path(package).resolve() == REPO_ROOT / "moe_ops" / "__init__.py"
    assert Path(distributed).resolve() == REPO_ROOT / "distributed" / "__init__.py"


def test_the_checkout_runs_without_an_install():
    """From the checkout root, with nothing on PYTHONPATH, python -c finds moe_ops.distributed;
    the distribution never installs a top-level ``distributed`` (dask's name)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    script = "import moe_ops.distributed, moe_ops; print(moe_ops.__file__)"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == REPO_ROOT / "moe_ops" / "__init__.py"
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "distributed" not in config["packages"]
    assert config["package-dir"] == {"moe_ops.distributed": "distributed"}
    assert (REPO_ROOT / "moe_ops" / "distributed").resolve() == REPO_ROOT / "distributed"


def test_public_functions_document_their_arguments():
    for function in (moe_ops.route, moe_ops.fused_experts, moe_ops.fused_moe):
        names = list(inspect.signature(function).parameters)
        assert names[0] == "hidden_states" and "args" not in names
        doc = inspect.getdoc(function)
        assert "Returns" in doc and f"tritonmoe::{function.__name__}" in doc
    assert "top_k" in inspect.getdoc(moe_ops.route) and "w_gate_up" in inspect.getdoc(moe_ops.fused_experts)
