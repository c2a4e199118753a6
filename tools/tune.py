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
``moe_ops/tiles.py`` format (entries merged into an existing table of the same GPU,
written after every cell); every candidate's time goes to ``<out stem>.tunelog.jsonl``.
The search stops at --budget-s and keeps what it has.

    python -m tools.tune --models mixtral-8x7b --tokens 1 8 32 128 --budget-s 540
    python -m tools.tune --models deepseek-v3 qwen3-30b-a3b --out moe_ops/tile_tables/nvidia-h100-80gb-hbm3.json
    python -m tools.tune --check-heuristic --out /tmp/h.json   # heuristic vs table, per cell

Without CUDA it runs shrunk configs through the Triton interpreter with a few
candidates: a check of the code path, not a tuning.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from tools.runtime import ON_GPU, capture_graph, random_expert_weights, rel_l2  # noqa: E402  (before triton: may switch the interpreter on)

import triton  # noqa: E402

from moe_ops.configs import MoEConfig, get_config, shrink  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from moe_ops.reference import fused_experts_reference  # noqa: E402
from moe_ops.tiles import TABLE_DIR, TileConfig, get_tile_config, has_tma, heuristic_tile  # noqa: E402

DEFAULT_MODELS = ["mixtral-8x7b", "deepseek-v3", "qwen2-57b-a14b", "qwen3-30b-a3b"]
DEFAULT_TOKENS = [1, 8, 32, 128, 512, 2048, 8192]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SMEM_LIMIT = 200 * 1024  # bytes; H100/H200 allow 227 KiB per block, keep headroom
AGREE_TOL = 1e-2


def log(msg: str) -> None:
    print(msg, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _next_pow2(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, n))))


# ------------------------------------------------------------------ search space

def block_m_choices(num_tokens: int, top_k: int, num_experts: int) -> list[int]:
    """BLOCK_M <= max(16, next_pow2(2*T*K/E)), and no smaller than a quarter of that cap."""
    cap = min(128, max(16, _next_pow2(2 * num_tokens * top_k / num_experts)))
    return [bm for bm in (16, 32, 64, 128) if cap // 4 <= bm <= cap]


def candidate_tiles(stage: str, num_tokens: int, top_k: int, num_experts: int,
                    elem_bytes: int, block_ms: list[int]) -> list[TileConfig]:
    """The pruned cross product for one stage (gate_up loads two weight tiles per step),
    weights through pointers and through a descriptor (B_DESC)."""
    rows_per_expert = num_tokens * top_k / num_experts
    weight_tiles = 2 if stage == "gate_up" else 1
    out = []
    for bm, desc in ((bm, desc) for bm in block_ms for desc in (False, True)):
        for bn in (32, 64, 128, 256):
            if bn == 256 and bm < 64:
                continue  # small T: keep programs many, so enough of them stream the weights
            for bk in (64, 128):
                for group_m in (1, 8):
                    if group_m == 8 and rows_per_expert < 2 * bm:
                        continue  # one row block per expert: nothing to group
                    for warps in (4, 8):
                        area = bm * bn
                        if (warps == 8 and area < 64 * 128) or (warps == 4 and area > 128 * 128):
                            continue
                        for stages in (3, 4, 5):
                            smem = stages * (bm * bk + weight_tiles * bn * bk) * elem_bytes
                            if smem > SMEM_LIMIT:
                                continue
                            out.append(TileConfig(bm, bn, bk, group_m, warps, stages, B_DESC=desc))
    return out


# Large-T shapes that Hopper GEMMs are known to like (128-row blocks, 8 warps, 64-wide
# K steps, weights or A through tensor descriptors), always timed where they are legal,
# whatever the sample draws.
LARGE_T_SEEDS = {
    "gate_up": [TileConfig(128, 128, 64, 8, 8, 3, B_DESC=True),
                TileConfig(128, 128, 64, 8, 8, 4, B_DESC=True),
                TileConfig(128, 64, 64, 8, 8, 4, B_DESC=True),
                TileConfig(64, 128, 64, 8, 8, 4, B_DESC=True),
                TileConfig(64, 128, 64, 8, 4, 4, B_DESC=True),
                TileConfig(128, 128, 64, 8, 8, 3)],
    "down": [TileConfig(128, 256, 64, 8, 8, 3, B_DESC=True, A_DESC=True),
             TileConfig(128, 128, 64, 8, 8, 4, B_DESC=True, A_DESC=True),
             TileConfig(128, 256, 64, 8, 8, 3)],
}


def seeds(stage: str, num_tokens: int, top_k: int, num_experts: int,
          block_ms: list[int]) -> list[TileConfig]:
    """The LARGE_T_SEEDS of ``stage`` whose BLOCK_M is allowed and whose GROUP_M has
    several row blocks per expert to group (down: BLOCK_M set to ``block_ms[0]``)."""
    rows_per_expert = num_tokens * top_k / num_experts
    out = []
    for tile in LARGE_T_SEEDS[stage]:
        if stage == "down":
            tile = replace(tile, BLOCK_M=block_ms[0])
        if tile.BLOCK_M in block_ms and rows_per_expert >= 2 * tile.BLOCK_M:
            out.append(tile)
    return out


def sample(candidates: list[TileConfig], keep: list[TileConfig], limit: int, seed: int) -> list[TileConfig]:
    """``keep`` first (duplicates dropped), then a seeded shuffle of the rest, ``limit`` in
    all (more only if ``keep`` alone is longer)."""
    keep = list(dict.fromkeys(keep))
    rest = [c for c in candidates if c not in keep]
    random.Random(seed).shuffle(rest)
    return keep + rest[: max(0, limit - len(keep))]


# ----------------------------------------------------------------------- timing

def time_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (CPU: one wall-clock call).

    Replay, not eager calls: an eager forward spends a few hundred microseconds in
    Python, which at small T would hide the kernels whose tiles are being compared.
    """
    if not ON_GPU:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    graph, _ = capture_graph(fn)
    try:
        return triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms,
                                       return_mode="median")
    finally:
        del graph


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()

    def spent(self) -> bool:
        return time.time() >= self.deadline


def search(stage: str, candidates: list[TileConfig], run, reference: torch.Tensor,
           args, budget: Budget, tag: str) -> tuple[TileConfig | None, float, list[dict], bool]:
    """Time each candidate that agrees with ``reference``; (best, best ms, log, complete)."""
    results, best, best_ms = [], None, math.inf
    for n, tile in enumerate(candidates):
        if budget.spent():
            log(f"{tag} {stage}: budget spent after {n}/{len(candidates)} candidates")
            return best, best_ms, results, False
        record = {"stage": stage, "config": tile.as_dict()}
        try:
            err = rel_l2(run(tile), reference)
            record["rel_l2"] = err
            if not err <= AGREE_TOL:
                record["status"] = "wrong"
                log(f"{tag} {stage} {_fmt(tile)}  WRONG (rel L2 {err:.1e} vs heuristic)")
            else:
                ms = time_ms(lambda: run(tile), args.warmup_ms, args.rep_ms)
                record.update(status="ok", ms=ms)
                mark = ""
                if ms < best_ms:
                    best, best_ms, mark = tile, ms, "  *"
                log(f"{tag} {stage} {_fmt(tile)}  {ms:.4f} ms{mark}")
        except Exception as exc:  # out of shared memory, PTXAS failure, bad launch
            record.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            log(f"{tag} {stage} {_fmt(tile)}  FAILED {type(exc).__name__}")
        results.append(record)
    return best, best_ms, results, True


def _fmt(t: TileConfig) -> str:
    return (f"M{t.BLOCK_M:<3d} N{t.BLOCK_N:<3d} K{t.BLOCK_K:<3d} G{t.GROUP_M} "
            f"w{t.num_warps} s{t.num_stages}" + (" desc" if t.B_DESC else "")
            + (" a-desc" if t.A_DESC else ""))


# ------------------------------------------------------------------------ table

def load_table(path: Path, gpu: str) -> dict:
    """Existing entries of ``path`` keyed by (stage, E, H, I, dtype, T), if it is this GPU's."""
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    if table.get("gpu") != gpu:
        raise SystemExit(f"{path} holds a table for {table.get('gpu')!r}, not {gpu!r}: "
                         f"pass another --out")
    return {(e["stage"], e["E"], e["H"], e["I"], e["dtype"], e["T"]): e for e in table["entries"]}


def write_table(path: Path, gpu: str, entries: dict) -> None:
    """The ``moe_ops/tiles.py`` format, entries sorted for stable diffs."""
    ordered = [entries[k] for k in sorted(entries, key=lambda k: (k[1], k[2], k[3], k[4], k[5], k[0]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpu": gpu, "entries": ordered}, indent=1) + "\n")
    tmp.replace(path)


def entry(stage: str, cfg: MoEConfig, dtype: torch.dtype, num_tokens: int, tile: TileConfig) -> dict:
    return {"stage": stage, "E": cfg.num_experts, "H": cfg.hidden_size,
            "I": cfg.intermediate_size, "dtype": str(dtype).replace("torch.", ""),
            "T": num_tokens, "config": tile.as_dict()}


# ------------------------------------------------------------------------- main

def make_routing(num_tokens: int, num_experts: int, top_k: int, zipf_s: float, device, gen):
    """(topk_weights, topk_ids) of random logits N(0, 1) + log popularity, where the
    popularity is uniform (zipf_s = 0) or Zipf(zipf_s) over a random ranking of experts."""
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen)
    if zipf_s > 0:
        rank = torch.randperm(num_experts, device=device, generator=gen).float() + 1
        logits -= zipf_s * rank.log()
    topk_ids = logits.topk(top_k, dim=1).indices.to(torch.int32).contiguous()
    topk_weights = torch.softmax(torch.randn(num_tokens, top_k, device=device, generator=gen), dim=1)
    return topk_weights, topk_ids


def time_variant(tag: str, label: str, gu: TileConfig, down: TileConfig, run, reference,
                 args, log_records: list) -> float:
    """ms of ``run(gu, down)`` if it agrees with ``reference``, else inf; logged either way."""
    record = {"stage": "variant", "variant": label, "gate_up": gu.as_dict(), "down": down.as_dict()}
    try:
        err = rel_l2(run(gu, down), reference)
        record["rel_l2"] = err
        if not err <= AGREE_TOL:
            record["status"] = "wrong"
            log(f"{tag} variant {label}: WRONG (rel L2 {err:.1e})")
            ms = math.inf
        else:
            ms = time_ms(lambda: run(gu, down), args.warmup_ms, args.rep_ms)
            record.update(status="ok", ms=ms)
            log(f"{tag} variant {label}: {ms:.4f} ms")
    except Exception as exc:  # a descriptor the backend can not build, out of shared memory
        record.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        log(f"{tag} variant {label}: FAILED {type(exc).__name__}")
        ms = math.inf
    log_records.append(record)
    return ms


def refine(tag, best_gu, best_down, best_ms, run, reference, run_zipf, args, budget):
    """Phase 3: the descriptor and skew variants of the winners; returns
    (gate_up, down, ms, log). ``run``/``run_zipf`` map a pair of tiles to an output;
    variants under uniform routing must agree with ``reference``, as in phases 1-2."""
    records: list = []
    log(f"{tag} variants of the winners ({best_ms:.4f} ms):")
    for label, field, stage in (("gate_up B_DESC", "B_DESC", "gate_up"),
                                ("down B_DESC", "B_DESC", "down"), ("down A_DESC", "A_DESC", "down")):
        if budget.spent() or getattr(best_gu if stage == "gate_up" else best_down, field):
            continue
        gu, down = ((replace(best_gu, **{field: True}), best_down) if stage == "gate_up"
                    else (best_gu, replace(best_down, **{field: True})))
        ms = time_variant(tag, label, gu, down, run, reference, args, records)
        if ms < best_ms:
            best_gu, best_down, best_ms = gu, down, ms

    if run_zipf is not None and 1 in (best_gu.GROUP_M, best_down.GROUP_M) and not budget.spent():
        gu8, down8 = replace(best_gu, GROUP_M=8), replace(best_down, GROUP_M=8)
        zipf_reference = run_zipf(best_gu, best_down)
        zipf_ms = time_variant(tag, "Zipf, as chosen", best_gu, best_down, run_zipf,
                               zipf_reference, args, records)
        zipf8_ms = time_variant(tag, "Zipf, GROUP_M=8", gu8, down8, run_zipf,
                                zipf_reference, args, records)
        if zipf8_ms < zipf_ms:
            uniform8_ms = time_variant(tag, "uniform, GROUP_M=8", gu8, down8, run, reference,
                                       args, records)
            if uniform8_ms <= 1.02 * best_ms:
                best_gu, best_down, best_ms = gu8, down8, uniform8_ms
    return best_gu, best_down, best_ms, records


def tune_cell(cfg, num_tokens, weights, dtype, device, args, budget, gen):
    """The three phases at one (model, T); returns (gate_up tile, down tile, log record)."""
    e, k = cfg.num_experts, cfg.top_k
    h, i = cfg.hidden_size, cfg.intermediate_size
    w_gate_up, w_down = weights
    x = torch.randn(num_tokens, h, device=device, generator=gen).to(dtype)
    topk_weights, topk_ids = make_routing(num_tokens, e, k, 0.0, device, gen)
    zipf_weights, zipf_ids = make_routing(num_tokens, e, k, args.zipf_s, device, gen)
    tag = f"[{cfg.name} T={num_tokens}]"

    heur_gu = heuristic_tile("gate_up", e, h, i, num_tokens, k, dtype, has_tma(device))
    heur_down = heuristic_tile("down", e, h, i, num_tokens, k, dtype, has_tma(device))

    def run(gate_up_tile, down_tile):
        return fused_experts_impl(x, topk_weights, topk_ids, w_gate_up, w_down,
                                  gate_up_tile=gate_up_tile, down_tile=down_tile)

    def run_zipf(gate_up_tile, down_tile):
        return fused_experts_impl(x, zipf_weights, zipf_ids, w_gate_up, w_down,
                                  gate_up_tile=gate_up_tile, down_tile=down_tile)

    baseline = run(heur_gu, heur_down)
    if num_tokens <= args.check_max_t:
        err = rel_l2(baseline, fused_experts_reference(x, topk_weights, topk_ids, w_gate_up, w_down))
        log(f"{tag} heuristic tiles vs reference: rel L2 {err:.2e}")
        if not err <= 2e-2:
            raise SystemExit(f"{tag} the heuristic tiles disagree with the reference "
                             f"(rel L2 {err:.2e}): fix the kernels before tuning")
    heur_ms = time_ms(lambda: run(heur_gu, heur_down), args.warmup_ms, args.rep_ms)
    log(f"{tag} heuristic {_fmt(heur_gu)} / {_fmt(heur_down)}: {heur_ms:.4f} ms")

    elem = x.element_size()
    gu_space = candidate_tiles("gate_up", num_tokens, k, e, elem, block_m_choices(num_tokens, k, e))
    gu_cands = sample(gu_space, [heur_gu] + seeds("gate_up", num_tokens, k, e, block_m_choices(num_tokens, k, e)),
                      args.max_configs, args.seed)
    log(f"{tag} gate_up: {len(gu_cands)} of {len(gu_space)} pruned candidates")
    best_gu, gu_ms, gu_log, gu_done = search(
        "gate_up", gu_cands, lambda t: run(t, replace(heur_down, BLOCK_M=t.BLOCK_M)),
        baseline, args, budget, tag)
    record = {"model": cfg.name, "T": num_tokens, "heuristic_ms": heur_ms,
              "candidates": gu_log, "complete": False}
    if best_gu is None or not gu_done:
        return None, None, record

    down_space = candidate_tiles("down", num_tokens, k, e, elem, [best_gu.BLOCK_M])
    down_keep = replace(heur_down, BLOCK_M=best_gu.BLOCK_M)
    down_cands = sample(down_space, [down_keep] + seeds("down", num_tokens, k, e, [best_gu.BLOCK_M]),
                        args.max_down_configs, args.seed)
    log(f"{tag} down (BLOCK_M={best_gu.BLOCK_M}): {len(down_cands)} of {len(down_space)} candidates")
    best_down, down_ms, down_log, down_done = search(
        "down", down_cands, lambda t: run(best_gu, t), baseline, args, budget, tag)
    record["candidates"] += down_log
    if best_down is None or not down_done:
        return best_gu, None, record
    if down_ms >= heur_ms:  # within noise of the heuristic: keep what the op would pick anyway
        best_gu, best_down, down_ms = heur_gu, heur_down, heur_ms
    best_gu, best_down, down_ms, variant_log = refine(
        tag, best_gu, best_down, down_ms, run, baseline,
        run_zipf if args.zipf_s > 0 else None, args, budget)
    record["candidates"] += variant_log
    record.update(complete=True, tuned_ms=down_ms, gate_up=best_gu.as_dict(), down=best_down.as_dict())
    log(f"{tag} chose gate_up {_fmt(best_gu)}, down {_fmt(best_down)}: {down_ms:.4f} ms "
        f"(heuristic {heur_ms:.4f} ms, {heur_ms / down_ms:.2f}x)")
    return best_gu, best_down, record


def check_heuristic(args, gpu: str, out: Path) -> None:
    """Time the heuristic tiles against the table's (the lookup) in every cell, no search:
    how far an untuned GPU of this kind would land from its tuned numbers. One JSON line
    per cell goes to ``<out stem>.heuristic.jsonl``."""
    dtype, device = DTYPES[args.dtype], torch.device("cuda" if ON_GPU else "cpu")
    path = out.with_name(out.stem + ".heuristic.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    for name in args.models:
        cfg = get_config(name) if ON_GPU else shrink(name)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        e, k, h, i = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
        w_gate_up, w_down = random_expert_weights(cfg, dtype, device, gen)
        for t in args.tokens:
            x = torch.randn(t, h, device=device, generator=gen).to(dtype)
            topk_weights, topk_ids = make_routing(t, e, k, 0.0, device, gen)
            tiles = {"heuristic": [heuristic_tile(s, e, h, i, t, k, dtype, has_tma(device))
                                   for s in ("gate_up", "down")],
                     "table": [get_tile_config(s, e, h, i, t, k, dtype, device) for s in ("gate_up", "down")]}
            ms = {}
            for kind, (gu, dn) in tiles.items():
                def run(gu=gu, dn=dn):
                    return fused_experts_impl(x, topk_weights, topk_ids, w_gate_up, w_down,
                                              gate_up_tile=gu, down_tile=dn)
                ms[kind] = time_ms(run, args.warmup_ms, args.rep_ms)
            log(f"[{cfg.name} T={t}] heuristic {ms['heuristic']:.4f} ms, table {ms['table']:.4f} ms: "
                f"heuristic/table {ms['heuristic'] / ms['table']:.3f}")
            with path.open("a") as f:
                f.write(json.dumps({"model": cfg.name, "T": t, "gpu": gpu, "ms": ms,
                                    **{kind: [tl.as_dict() for tl in v] for kind, v in tiles.items()}}) + "\n")
        if ON_GPU:
            torch.cuda.empty_cache()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"T buckets (default {DEFAULT_TOKENS}; CPU 1 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--out", default=None,
                   help="table path (default moe_ops/tile_tables/<gpu slug>.json)")
    p.add_argument("--budget-s", type=float, default=540,
                   help="stop searching after this many seconds and write what is done")
    p.add_argument("--max-configs", type=int, default=None,
                   help="gate_up candidates per cell (default 32; CPU 2)")
    p.add_argument("--max-down-configs", type=int, default=None,
                   help="down candidates per cell (default 20; CPU 2)")
    p.add_argument("--warmup-ms", type=float, default=10)
    p.add_argument("--rep-ms", type=float, default=50)
    p.add_argument("--check-max-t", type=int, default=128,
                   help="check the heuristic tiles against the reference up to this T")
    p.add_argument("--zipf-s", type=float, default=1.2,
                   help="skew of the routing GROUP_M=8 is timed under (0: skip that check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-heuristic", action="store_true",
                   help="no search: time the heuristic tiles against the table's in every cell")
    args = p.parse_args(argv)
    args.models = args.models or (DEFAULT_MODELS if ON_GPU else ["mixtral-8x7b"])
    args.tokens = args.tokens or (DEFAULT_TOKENS if ON_GPU else [1, 5])
    args.max_configs = args.max_configs or (32 if ON_GPU else 2)
    args.max_down_configs = args.max_down_configs or (20 if ON_GPU else 2)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    dtype = DTYPES[args.dtype]
    device = torch.device("cuda" if ON_GPU else "cpu")
    gpu = torch.cuda.get_device_name() if ON_GPU else "cpu"
    out = Path(args.out) if args.out else TABLE_DIR / f"{slug(gpu)}.json"
    log_path = out.with_name(out.stem + ".tunelog.jsonl")
    if not ON_GPU:
        log("NO CUDA: shrunk configs through the Triton interpreter, a few candidates: "
            "this checks the code path; the timings are NOT performance and the table is "
            "not for use.")
    if args.check_heuristic:
        check_heuristic(args, gpu, out)
        return
    entries = load_table(out, gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"tuning on {gpu}; table {out} ({len(entries)} entries already); budget {args.budget_s:.0f} s")
    torch.set_grad_enabled(False)
    done = 0
    for name in args.models:
        if budget.spent():
            break
        cfg = get_config(name) if ON_GPU else shrink(name)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        weights = random_expert_weights(cfg, dtype, device, gen)
        for t in args.tokens:
            if budget.spent():
                log(f"budget spent: stopping before {cfg.name} T={t}")
                break
            best_gu, best_down, record = tune_cell(cfg, t, weights, dtype, device, args, budget, gen)
            record.update(gpu=gpu, dtype=args.dtype, torch=torch.__version__,
                          triton=triton.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            dtype_name = args.dtype
            if best_gu is not None:
                entries[("gate_up", e, h, i, dtype_name, t)] = entry("gate_up", cfg, dtype, t, best_gu)
            if best_down is not None:
                entries[("down", e, h, i, dtype_name, t)] = entry("down", cfg, dtype, t, best_down)
                done += 1
            if best_gu is not None:
                write_table(out, gpu, entries)
            if ON_GPU:
                torch.cuda.empty_cache()
        del weights
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()
    log(f"{done} cells tuned; {len(entries)} entries in {out}; candidate log {log_path}; "
        f"{args.budget_s - budget.left():.0f} s")


if __name__ == "__main__":
    main()
