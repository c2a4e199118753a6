"""Search tile configurations of the grouped GEMMs and write the table the op reads.

For each (model, T bucket) this times ``moe_ops.pipeline.fused_experts_impl`` with
explicit tiles, uniform routing, replayed from a CUDA graph with L2 flushed between
calls (``triton.testing.do_bench``, median), in three phases:

    1. gate_up: candidates from BLOCK_M x BLOCK_N x BLOCK_K x GROUP_M x warps x stages,
       pruned (BLOCK_M <= max(16, next_pow2(2*T*K/E)), shared memory, GROUP_M only
       when an expert spans several row blocks, warps by tile area), sampled down to
       --max-configs with the heuristic and the legal LARGE_T_SEEDS always in; down
       fixed at the heuristic.
    2. down, given the chosen gate_up BLOCK_M (both stages walk one alignment).
    3. variants of the winners the sample does not cover, each kept only where it is
       faster: weight tiles through a tensor descriptor (B_DESC, per stage), down's A
       tiles through one over h in block order (A_DESC), and
       GROUP_M=8 (blocks of one hot expert share its weight tiles through L2) timed
       under Zipf(--zipf-s) routing, kept if it is faster there and no more than 2%
       slower under uniform routing.

Each candidate's output is compared with the heuristic tiles' output (relative L2
<= 1e-2) before it is timed; a candidate that fails to compile or launch (out of shared
memory) or disagrees is recorded and skipped. The winners go to --out in the
``moe_ops.tile_table`` format (entries merged into an existing table of the same GPU,
written after every cell); every candidate's time goes to ``<out stem>.tunelog.jsonl``.
The search stops at --budget-s and keeps what it has. Run from the checkout root::

    python -m tools.tune --models mixtral-8x7b --tokens 1 8 32 128 --budget-s 540
    python -m tools.tune --models deepseek-v3 qwen3-30b-a3b --out moe_ops/tile_tables/nvidia-h100-80gb-hbm3.json

Without CUDA it runs shrunk configs through the Triton interpreter with a few
candidates: a check of the code path, not a tuning. ``tools/check_heuristic.py`` times
the heuristic tiles against a finished table.
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from moe_ops.dtypes import BY_NAME  # noqa: E402
from moe_ops.fp8 import quantize_weight, tile_key  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from moe_ops.reference import fused_experts_reference, rel_l2  # noqa: E402
from moe_ops.tile_table import TABLE_DIR, entry_key, make_entry, read_entries, write_entries  # noqa: E402
from moe_ops.tiles import TileConfig, has_tma, heuristic_tile  # noqa: E402
from tools.cli import log, on_gpu, slug  # noqa: E402
from tools.tile_space import block_m_choices, candidate_tiles, sample, seeds  # noqa: E402
from tools.timing import Timer  # noqa: E402
from tools.workloads import (MODELS, TOKEN_COUNTS, layer_config,  # noqa: E402
                             random_expert_weights, random_routing)

AGREE_TOL = 1e-2
CPU_NOTICE = ("NO CUDA: shrunk configs through the Triton interpreter: this checks the code "
              "path; the timings are NOT performance and no table written here is for use.")


# ------------------------------------------------- what tune and check_heuristic share

def cell_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments of every per-cell tool: cells, dtype, table, timing."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"config names (default {' '.join(MODELS)}; CPU mixtral-8x7b)")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"T buckets (default {TOKEN_COUNTS}; CPU 1 5)")
    p.add_argument("--dtype", choices=sorted(BY_NAME), default="bfloat16")
    p.add_argument("--out", default=None,
                   help="table path (default moe_ops/tile_tables/<gpu slug>.json)")
    p.add_argument("--warmup-ms", type=float, default=10)
    p.add_argument("--rep-ms", type=float, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_cells(args, gpu: bool) -> None:
    """Fill in the default models and T buckets (a few shrunk ones on a CPU)."""
    args.models = args.models or (MODELS if gpu else ["mixtral-8x7b"])
    args.tokens = args.tokens or (TOKEN_COUNTS if gpu else [1, 5])


def device_and_table(out: str | None, gpu: bool) -> tuple[torch.device, str, Path]:
    """(device, its name as tables record it, the table path: --out or the GPU's own)."""
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name() if gpu else "cpu"
    return device, name, Path(out) if out else TABLE_DIR / f"{slug(name)}.json"


def tile_timer(args) -> Timer:
    """CUDA-graph replays timed by do_bench; on a CPU one call (its output was just checked)."""
    return Timer(args.warmup_ms, args.rep_ms, cpu_reps=1, cpu_warmup=0)


def fmt_tile(t: TileConfig) -> str:
    """A tile in one short column-aligned line, for the logs."""
    return (f"M{t.BLOCK_M:<3d} N{t.BLOCK_N:<3d} K{t.BLOCK_K:<3d} G{t.GROUP_M} "
            f"w{t.num_warps} s{t.num_stages}" + (" desc" if t.B_DESC else "")
            + (" a-desc" if t.A_DESC else "") + (" a-fp8" if t.A_FP8 else ""))


# ---------------------------------------------------------------------- the search

class Budget:
    """A wall-clock deadline for the whole search."""

    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()

    def spent(self) -> bool:
        return time.time() >= self.deadline


def time_if_agrees(label: str, record: dict, output, reference, timer: Timer) -> float:
    """ms of ``output()`` if its result agrees with ``reference()`` (rel L2 <= AGREE_TOL), else
    inf; ``record`` gets rel_l2, status ("ok", "wrong", "failed") and ms or the error."""
    try:
        err = rel_l2(output(), reference())
        record["rel_l2"] = err
        if not err <= AGREE_TOL:
            record["status"] = "wrong"
            log(f"{label}: WRONG (rel L2 {err:.1e})")
            return math.inf
        ms = timer.replayed(output)
        record.update(status="ok", ms=ms)
        log(f"{label}: {ms:.4f} ms")
        return ms
    except Exception as exc:  # out of shared memory, a descriptor the backend can not build
        record.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        log(f"{label}: FAILED {type(exc).__name__}")
        return math.inf


def search(stage: str, candidates: list[TileConfig], run, reference_of,
           timer: Timer, budget: Budget, tag: str) -> tuple[TileConfig | None, float, list[dict], bool]:
    """Time each candidate that agrees with ``reference_of(candidate)``; (best, best ms, log,
    complete)."""
    results, best, best_ms = [], None, math.inf
    for n, tile in enumerate(candidates):
        if budget.spent():
            log(f"{tag} {stage}: budget spent after {n}/{len(candidates)} candidates")
            return best, best_ms, results, False
        record = {"stage": stage, "config": tile.as_dict()}
        ms = time_if_agrees(f"{tag} {stage} {fmt_tile(tile)}", record, lambda: run(tile),
                            lambda: reference_of(tile), timer)
        if ms < best_ms:
            best, best_ms = tile, ms
        results.append(record)
    return best, best_ms, results, True


def time_variant(tag: str, label: str, gu: TileConfig, down: TileConfig, run, reference,
                 timer: Timer, records: list) -> float:
    """ms of ``run(gu, down)`` if it agrees with ``reference(gu, down)``, else inf; logged
    either way."""
    record = {"stage": "variant", "variant": label, "gate_up": gu.as_dict(), "down": down.as_dict()}
    ms = time_if_agrees(f"{tag} variant {label}", record, lambda: run(gu, down),
                        lambda: reference(gu, down), timer)
    records.append(record)
    return ms


def refine(tag, best_gu, best_down, best_ms, run, reference, run_zipf, timer, budget):
    """Phase 3: the descriptor and skew variants of the winners; returns
    (gate_up, down, ms, log). ``run``/``run_zipf`` map a pair of tiles to an output;
    variants under uniform routing must agree with ``reference(gu, down)``, as in phases 1-2."""
    records: list = []
    log(f"{tag} variants of the winners ({best_ms:.4f} ms):")
    for label, field, stage in (("gate_up B_DESC", "B_DESC", "gate_up"),
                                ("down B_DESC", "B_DESC", "down"), ("down A_DESC", "A_DESC", "down")):
        if budget.spent() or getattr(best_gu if stage == "gate_up" else best_down, field):
            continue
        gu, down = ((replace(best_gu, **{field: True}), best_down) if stage == "gate_up"
                    else (best_gu, replace(best_down, **{field: True})))
        ms = time_variant(tag, label, gu, down, run, reference, timer, records)
        if ms < best_ms:
            best_gu, best_down, best_ms = gu, down, ms

    if run_zipf is not None and 1 in (best_gu.GROUP_M, best_down.GROUP_M) and not budget.spent():
        gu8, down8 = replace(best_gu, GROUP_M=8), replace(best_down, GROUP_M=8)
        zipf_out = run_zipf(best_gu, best_down)
        zipf_reference = lambda *_: zipf_out  # noqa: E731  (GROUP_M leaves the numerics alone)
        zipf_ms = time_variant(tag, "Zipf, as chosen", best_gu, best_down, run_zipf,
                               zipf_reference, timer, records)
        zipf8_ms = time_variant(tag, "Zipf, GROUP_M=8", gu8, down8, run_zipf,
                                zipf_reference, timer, records)
        if zipf8_ms < zipf_ms:
            uniform8_ms = time_variant(tag, "uniform, GROUP_M=8", gu8, down8, run, reference,
                                       timer, records)
            if uniform8_ms <= 1.02 * best_ms:
                best_gu, best_down, best_ms = gu8, down8, uniform8_ms
    return best_gu, best_down, best_ms, records


def tune_cell(cfg, num_tokens, weights, dtype, device, args, budget, gen):
    """The three phases at one (model, T); returns (gate_up tile, down tile, log record).

    ``weights`` is (w_gate_up, w_down, w_gate_up_scale, w_down_scale), the scales None for
    float experts. fp8 tiles with and without fp8 activations compute different numbers:
    a candidate is compared with the heuristic tiles run with its own A_FP8 flags."""
    e, k = cfg.num_experts, cfg.top_k
    h, i = cfg.hidden_size, cfg.intermediate_size
    w_gate_up, w_down, gate_up_scale, down_scale = weights
    fp8 = args.fp8
    timer = tile_timer(args)
    x = torch.randn(num_tokens, h, device=device, generator=gen).to(dtype)
    topk_weights, topk_ids = random_routing(num_tokens, e, k, 0.0, device, gen)
    zipf_weights, zipf_ids = random_routing(num_tokens, e, k, args.zipf_s, device, gen)
    tag = f"[{cfg.name} T={num_tokens}]"

    heur_gu = heuristic_tile("gate_up", e, h, i, num_tokens, k, dtype, has_tma(device), fp8)
    heur_down = heuristic_tile("down", e, h, i, num_tokens, k, dtype, has_tma(device), fp8)
    scales = dict(w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)

    def run(gate_up_tile, down_tile):
        return fused_experts_impl(x, topk_weights, topk_ids, w_gate_up, w_down,
                                  gate_up_tile=gate_up_tile, down_tile=down_tile, **scales)

    def run_zipf(gate_up_tile, down_tile):
        return fused_experts_impl(x, zipf_weights, zipf_ids, w_gate_up, w_down,
                                  gate_up_tile=gate_up_tile, down_tile=down_tile, **scales)

    baseline = run(heur_gu, heur_down)
    baselines = {(heur_gu.A_FP8, heur_down.A_FP8): baseline}

    def reference(gu, down):
        """The heuristic tiles' output with gu's and down's A_FP8 flags."""
        flags = (gu.A_FP8, down.A_FP8)
        if flags not in baselines:
            baselines[flags] = run(replace(heur_gu, A_FP8=flags[0]), replace(heur_down, A_FP8=flags[1]))
        return baselines[flags]

    if num_tokens <= args.check_max_t:
        err = rel_l2(baseline, fused_experts_reference(
            x, topk_weights, topk_ids, w_gate_up, w_down, gate_up_scale, down_scale,
            (heur_gu.A_FP8, heur_down.A_FP8)))
        log(f"{tag} heuristic tiles vs reference: rel L2 {err:.2e}")
        if not err <= 2e-2:
            raise SystemExit(f"{tag} the heuristic tiles disagree with the reference "
                             f"(rel L2 {err:.2e}): fix the kernels before tuning")
    heur_ms = timer.replayed(lambda: run(heur_gu, heur_down))
    log(f"{tag} heuristic {fmt_tile(heur_gu)} / {fmt_tile(heur_down)}: {heur_ms:.4f} ms")

    elem = x.element_size()
    block_ms = block_m_choices(num_tokens, k, e, fp8)
    gu_space = candidate_tiles("gate_up", num_tokens, k, e, elem, block_ms, fp8)
    gu_cands = sample(gu_space, [heur_gu] + seeds("gate_up", num_tokens, k, e, block_ms, bool(fp8)),
                      args.max_configs, args.seed)
    log(f"{tag} gate_up: {len(gu_cands)} of {len(gu_space)} pruned candidates")
    best_gu, gu_ms, gu_log, gu_done = search(
        "gate_up", gu_cands, lambda t: run(t, replace(heur_down, BLOCK_M=t.BLOCK_M)),
        lambda t: reference(t, heur_down), timer, budget, tag)
    record = {"model": cfg.name, "T": num_tokens, "heuristic_ms": heur_ms,
              "candidates": gu_log, "complete": False}
    if best_gu is None or not gu_done:
        return None, None, record

    down_space = candidate_tiles("down", num_tokens, k, e, elem, [best_gu.BLOCK_M], fp8)
    down_keep = replace(heur_down, BLOCK_M=best_gu.BLOCK_M)
    down_cands = sample(down_space, [down_keep] + seeds("down", num_tokens, k, e, [best_gu.BLOCK_M],
                                                        bool(fp8)),
                        args.max_down_configs, args.seed)
    log(f"{tag} down (BLOCK_M={best_gu.BLOCK_M}): {len(down_cands)} of {len(down_space)} candidates")
    best_down, down_ms, down_log, down_done = search(
        "down", down_cands, lambda t: run(best_gu, t), lambda t: reference(best_gu, t), timer,
        budget, tag)
    record["candidates"] += down_log
    if best_down is None or not down_done:
        return best_gu, None, record
    if down_ms >= heur_ms:  # within noise of the heuristic: keep what the op would pick anyway
        best_gu, best_down, down_ms = heur_gu, heur_down, heur_ms
    best_gu, best_down, down_ms, variant_log = refine(
        tag, best_gu, best_down, down_ms, run, reference,
        run_zipf if args.zipf_s > 0 else None, timer, budget)
    record["candidates"] += variant_log
    record.update(complete=True, tuned_ms=down_ms, gate_up=best_gu.as_dict(), down=best_down.as_dict())
    log(f"{tag} chose gate_up {fmt_tile(best_gu)}, down {fmt_tile(best_down)}: {down_ms:.4f} ms "
        f"(heuristic {heur_ms:.4f} ms, {heur_ms / down_ms:.2f}x)")
    return best_gu, best_down, record


# --------------------------------------------------------------------------- main

def parse_args(argv=None, gpu: bool = True):
    """The tuner's arguments; CPU defaults are a few shrunk cells and candidates."""
    p = cell_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=540,
                   help="stop searching after this many seconds and write what is done")
    p.add_argument("--max-configs", type=int, default=None,
                   help="gate_up candidates per cell (default 32; CPU 2)")
    p.add_argument("--max-down-configs", type=int, default=None,
                   help="down candidates per cell (default 20; CPU 2)")
    p.add_argument("--check-max-t", type=int, default=128,
                   help="check the heuristic tiles against the reference up to this T")
    p.add_argument("--zipf-s", type=float, default=1.2,
                   help="skew of the routing GROUP_M=8 is timed under (0: skip that check)")
    p.add_argument("--fp8", choices=["block", "channel"], default=None,
                   help="tune fp8 experts of this scheme (--dtype: the activations')")
    args = p.parse_args(argv)
    resolve_cells(args, gpu)
    args.max_configs = args.max_configs or (32 if gpu else 2)
    args.max_down_configs = args.max_down_configs or (20 if gpu else 2)
    return args


@torch.no_grad()
def main(argv=None) -> None:
    """Tune every cell within the budget, merging the winners into the table after each."""
    gpu = on_gpu()
    args = parse_args(argv, gpu)
    budget = Budget(args.budget_s)
    dtype = BY_NAME[args.dtype]
    device, gpu_name, out = device_and_table(args.out, gpu)
    log_path = out.with_name(out.stem + ".tunelog.jsonl")
    if not gpu:
        log(CPU_NOTICE)
    try:
        entries = read_entries(out, gpu_name)
    except ValueError as exc:  # another GPU's table
        raise SystemExit(f"{exc}: pass another --out") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"tuning on {gpu_name}; table {out} ({len(entries)} entries already); budget {args.budget_s:.0f} s")
    done = 0
    for name in args.models:
        if budget.spent():
            break
        cfg = layer_config(name, gpu)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        weights = random_expert_weights(cfg, dtype, device, gen)
        if args.fp8:
            (gu8, gu_scale), (down8, down_scale) = (quantize_weight(w, args.fp8) for w in weights)
            weights = (gu8, down8, gu_scale, down_scale)
        else:
            weights = (*weights, None, None)
        for t in args.tokens:
            if budget.spent():
                log(f"budget spent: stopping before {cfg.name} T={t}")
                break
            best_gu, best_down, record = tune_cell(cfg, t, weights, dtype, device, args, budget, gen)
            record.update(gpu=gpu_name, dtype=tile_key(dtype, args.fp8), torch=torch.__version__,
                          triton=triton.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for stage, tile in (("gate_up", best_gu), ("down", best_down)):
                if tile is not None:
                    entry = make_entry(stage, e, h, i, tile_key(dtype, args.fp8), t, tile.as_dict())
                    entries[entry_key(entry)] = entry
            done += best_down is not None
            if best_gu is not None:
                write_entries(out, gpu_name, entries)
            if gpu:
                torch.cuda.empty_cache()
        del weights
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    log(f"{done} cells tuned; {len(entries)} entries in {out}; candidate log {log_path}; "
        f"{args.budget_s - budget.left():.0f} s")


if __name__ == "__main__":
    main()
