"""The README's several-node launch, run in CI as two torchrun invocations on one host
(gloo, two processes each): every one of the four ranks matches the single-process layer."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(ON_GPU, reason="the CPU (gloo) rendition of a two-node launch")
def test_two_nodes_of_two_ranks_match_the_single_process_layer():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
         f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
         "-m", "tools.ep_check", "--models", "mixtral-8x7b", "--tokens", "9"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            node.kill()
    text = "\n".join(outputs)
    assert all(node.returncode == 0 for node in nodes), text[-4000:]
    for rank in range(4):
        assert f"rank {rank}/4 ok: mixtral-8x7b" in text, text[-4000:]
