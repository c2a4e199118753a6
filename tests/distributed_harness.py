"""Run a function on W processes of one process group and collect what each rank did.

On a machine with at least W GPUs (and no interpreter) the group is NCCL, one GPU per
rank; elsewhere gloo on the CPU with the Triton interpreter. Every run has a deadline:
a rank that has not reported by then counts as hung and every process is killed.

``TRITONMOE_TEST_SHARED_GPU=1`` puts every rank on cuda:0 of a one-GPU machine, over
gloo, with symmetric memory allowed on one device: the nvlink transport's protocol
(flags, headers, time-outs, graphs) then runs compiled on a real GPU, its ranks
time-sliced (correctness only: no NVLink, no speed). Select the nvlink tests
(``-k nvlink``): the others expect NCCL.
"""
from __future__ import annotations

import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_ops.interpreter import interpreter_active

NO_MULTICAST = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
                "NVSHMEM_DISABLE_NVLS": "1"}


def shared_gpu() -> bool:
    return os.environ.get("TRITONMOE_TEST_SHARED_GPU", "0") not in ("", "0")


def use_gpus(world_size: int) -> bool:
    return (not interpreter_active() and torch.cuda.is_available()
            and (shared_gpu() or torch.cuda.device_count() >= world_size))


def _worker(rank, world_size, fn, args, init_file, results, group_timeout_s):
    os.environ.update(NO_MULTICAST)
    try:
        if use_gpus(world_size) and shared_gpu():
            os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
            torch.cuda.set_device(0)
            backend, device = "gloo", torch.device("cuda", 0)
        elif use_gpus(world_size):
            torch.cuda.set_device(rank)
            backend, device = "nccl", torch.device("cuda", rank)
        else:
            backend, device = "gloo", torch.device("cpu")
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size,
                                timeout=timedelta(seconds=group_timeout_s))
        results.put((rank, "ok", fn(rank, world_size, device, *args)))
    except BaseException as error:  # reported to the parent, which decides
        results.put((rank, "error", f"{type(error).__name__}: {error}",
                     traceback.format_exc()))
    finally:
        # Flush the report, then exit without destroy_process_group: after a failed
        # collective it can block; the exit closes the group for the peers too.
        results.close()
        results.join_thread()
        os._exit(0)


def run_on_ranks(fn, world_size: int, *args, deadline_s: float = 600.0,
                 group_timeout_s: float = 60.0) -> list[tuple]:
    """fn(rank, world_size, device, *args) on every rank: [(status, value, traceback)]
    by rank; status is "ok" (value = fn's result), "error" (value = "Type: message"),
    "died" (the process ended without a report: NCCL's watchdog aborts a rank whose
    collective timed out) or "hung" (still running at the deadline, then killed).
    Skips the test on a GPU host with fewer than world_size GPUs: its CPU ranks would
    need the interpreter, which a GPU host's numpy may not suit."""
    if torch.cuda.is_available() and not use_gpus(world_size):
        pytest.skip(f"{world_size} ranks need {world_size} GPUs here "
                    "(gloo ranks on the CPU need the Triton interpreter)")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(rank, world_size, fn, args, init_file,
                                                   results, group_timeout_s))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        reports = {}
        end = time.monotonic() + deadline_s
        while len(reports) < world_size and time.monotonic() < end:
            try:
                rank, status, *rest = results.get(timeout=1.0)
                reports[rank] = (status, *rest) if status == "error" else (status, rest[0], "")
            except queue_module.Empty:
                if not any(proc.is_alive() for proc in procs):
                    break
        for rank, proc in enumerate(procs):
            proc.join(timeout=5)
            if rank not in reports:
                reports[rank] = (("hung", None, "") if proc.is_alive() else
                                 ("died", f"exit code {proc.exitcode}", ""))
            if proc.is_alive():
                proc.kill()
    return [reports[rank] for rank in range(world_size)]


def assert_all_ok(reports: list[tuple]) -> list:
    """The values of a run where every rank succeeded; else fail showing each rank."""
    bad = [(rank, r) for rank, r in enumerate(reports) if r[0] != "ok"]
    assert not bad, "\n".join(f"rank {rank}: {r[0]} {r[1]}\n{r[2]}" for rank, r in bad)
    return [r[1] for r in reports]
