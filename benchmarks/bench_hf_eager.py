"""Whole Hugging Face models, eager: transformers' own experts against ``moe_ops.patch_hf_model``.

Reruns the comparison of ``benchmarks/results/anchors-h200-2026-12-02/hf_eager.md``:

    qwen3-30b-a3b   Qwen3-MoE, the real Qwen3-30B-A3B config but 4 decoder layers
                    (hidden 2048, 128 experts, top-8, expert width 768)
    mixtral-8x7b    Mixtral, the real 8x7B widths, 2 decoder layers

Random weights built from the config (nothing downloaded), bf16, ``model(input_ids,
use_cache=False)`` on one sequence of T tokens, CUDA-event median of --iters calls after
--warmup calls, eager (no torch.compile, no CUDA graphs). Systems:

    hf_eager, hf_batched_mm, hf_grouped_mm   transformers' experts implementations, chosen
                                             with ``model.set_experts_implementation``
    tritonmoe_patch                          the same model after ``moe_ops.patch_hf_model``

A system that cannot run (batched_mm runs out of memory at T=2048: it materialises
per-token expert weights; an implementation this transformers lacks) gets a row with the
reason. Each row also gives the relative L2 distance of its last-token logits from
hf_eager's. Then the host time of one eager ``moe_ops.FusedMoE`` forward at T=1
(Qwen3-30B-A3B layer): --host-calls calls timed with time.perf_counter, no
synchronisation inside the loop. Writes ``hf_eager_<gpu>.{json,md}`` to --out. Run from
the checkout root::

    python -m benchmarks.bench_hf_eager
    python -m benchmarks.bench_hf_eager --models mixtral-8x7b --tokens 1 32

Without CUDA it runs tiny float32 models through the Triton interpreter, a few calls
each: a check of the code path whose numbers are not performance.
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402

import moe_ops  # noqa: E402
from benchmarks.run_info import command_line, default_out_dir, device_label, utc_now  # noqa: E402
from moe_ops.reference import rel_l2  # noqa: E402
from tools.cli import log, on_gpu, slug  # noqa: E402
from tools.timing import median_event_ms, median_wall_ms  # noqa: E402
from tools.workloads import layer_config  # noqa: E402

HF_IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]
SYSTEMS = [f"hf_{impl}" for impl in HF_IMPLEMENTATIONS] + ["tritonmoe_patch"]


@dataclass(frozen=True)
class HFModel:
    """A transformers model class, its real config and the layers kept of it."""

    config_class: str
    model_class: str
    layers: int
    config: dict
    tiny: dict  # overrides for the interpreter on a CPU (one layer)


HF_MODELS = {
    "qwen3-30b-a3b": HFModel(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", 4,
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
             moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
             head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
             max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=False),
        dict(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
             num_experts_per_tok=2)),
    "mixtral-8x7b": HFModel(
        "MixtralConfig", "MixtralForCausalLM", 2,
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
             rms_norm_eps=1e-5, tie_word_embeddings=False),
        dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_attention_heads=4,
             num_key_value_heads=2)),
}


def build_model(name: str, gpu: bool, dtype: torch.dtype, device: torch.device):
    """The model with random weights (its own init), built on ``device`` in ``dtype``."""
    spec = HF_MODELS[name]
    layers = spec.layers if gpu else 1
    config = getattr(transformers, spec.config_class)(
        **(spec.config if gpu else {**spec.config, **spec.tiny}), num_hidden_layers=layers)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), layers


def forward_ms(fn, gpu: bool, iters: int, warmup: int) -> float:
    """CUDA-event median on a GPU, wall-clock median on a CPU."""
    return (median_event_ms if gpu else median_wall_ms)(fn, iters=iters, warmup=warmup)


def time_system(model, system: str, input_ids, reference, args, gpu: bool):
    """(row, last-token logits or None): ms of ``model(input_ids)`` or why not, and the
    logits' distance from ``reference`` (hf_eager's logits; None for hf_eager itself)."""
    row = dict(system=system, ms=None, rel_l2_vs_hf_eager=None, note="")
    try:
        if system.startswith("hf_"):
            model.set_experts_implementation(system.removeprefix("hf_"))
        logits = model(input_ids, use_cache=False).logits[:, -1]
        row["ms"] = forward_ms(lambda: model(input_ids, use_cache=False), gpu, args.iters, args.warmup)
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
    except (AttributeError, ValueError, RuntimeError) as exc:  # an implementation not offered here
        row["note"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    else:
        if reference is not None:
            row["rel_l2_vs_hf_eager"] = rel_l2(logits, reference)
        return row, logits
    finally:
        if gpu:
            torch.cuda.empty_cache()
    return row, None


def fused_moe_host_us(gpu: bool, dtype: torch.dtype, device: torch.device, calls: int) -> float:
    """Host µs per eager ``FusedMoE`` forward at T=1 (Qwen3-30B-A3B): ``calls`` calls,
    no synchronisation inside the loop, so the GPU is never what is timed."""
    moe = moe_ops.FusedMoE.from_config(layer_config("qwen3-30b-a3b", gpu), dtype=dtype, device=device)
    x = torch.randn(1, moe.config.hidden_size, dtype=dtype, device=device)
    moe(x)  # compile and fill the caches outside the loop
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        moe(x)
    host_s = time.perf_counter() - start
    if gpu:
        torch.cuda.synchronize()
    return host_s / calls * 1e6


def markdown(result: dict) -> str:
    """The rows as hf_eager.md lays them out, then the host time."""
    s = result["stamp"]
    lines = [f"# Whole Hugging Face models, eager: {s['device']}", ""]
    if s["mode"] != "gpu":
        lines += ["**CPU run through the Triton interpreter on tiny float32 models: these "
                  "numbers are not performance.**", ""]
    lines += [f"- torch {s['torch']}, Triton {s['triton']}, transformers {s['transformers']}, "
              f"{s['date']}", f"- command: `{s['command']}`", f"- {s['method']}", "",
              "| model | layers | T | system | ms | rel L2 vs hf_eager | note |",
              "|---|---:|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        err = f"{r['rel_l2_vs_hf_eager']:.1e}" if r["rel_l2_vs_hf_eager"] is not None else "-"
        lines.append(f"| {r['model']} | {r['layers']} | {r['T']} | {r['system']} | {ms} | "
                     f"{err} | {r['note']} |")
    host = result["host"]
    lines += ["", f"Host time per eager `FusedMoE` forward at T=1 ({host['config']}, "
              f"{host['calls']} calls, time.perf_counter, no synchronisation inside the loop): "
              f"{host['us_per_call']:.0f} us."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None, gpu: bool = True):
    """The benchmark's arguments; on a CPU, tiny token counts and a few calls."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(HF_MODELS), default=list(HF_MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 2048] if gpu else [1, 4])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS)
    p.add_argument("--iters", type=int, default=20 if gpu else 1)
    p.add_argument("--warmup", type=int, default=3 if gpu else 0)
    p.add_argument("--host-calls", type=int, default=500 if gpu else 2)
    p.add_argument("--out", type=Path, default=default_out_dir(gpu))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    """Time every (model, system, T), then the host time; write JSON and markdown."""
    gpu = on_gpu()
    args = parse_args(argv, gpu)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter computes bf16 wrongly
    if not gpu:
        log("NO CUDA: tiny float32 models through the Triton interpreter; the numbers are NOT "
            "performance.")
    torch.manual_seed(args.seed)
    rows = []
    with torch.no_grad():
        for name in args.models:
            model, layers = build_model(name, gpu, dtype, device)
            inputs = {t: torch.randint(0, model.config.vocab_size, (1, t), device=device)
                      for t in args.tokens}
            references = {}
            for system in [s for s in SYSTEMS if s in args.systems]:
                if system == "tritonmoe_patch":
                    moe_ops.patch_hf_model(model)
                for t, input_ids in inputs.items():
                    row, logits = time_system(model, system, input_ids, references.get(t), args, gpu)
                    if system == "hf_eager" and logits is not None:
                        references[t] = logits
                    rows.append(dict(model=name, layers=layers, T=t, **row))
                    shown = f"{row['ms']:9.3f} ms" if row["ms"] is not None else "       --"
                    log(f"{name:14s} T={t:<5d} {system:16s}{shown}  {row['note']}")
            del model, inputs, references
            if gpu:
                torch.cuda.empty_cache()
        host_us = fused_moe_host_us(gpu, dtype, device, args.host_calls)
    log(f"FusedMoE host time at T=1: {host_us:.0f} us per call")

    gpu_name = device_label(gpu)
    timing = (f"CUDA-event median of {args.iters} calls after {args.warmup} warm-ups" if gpu
              else f"wall-clock median of {args.iters} calls after {args.warmup} warm-ups (CPU)")
    stamp = dict(device=gpu_name, mode="gpu" if gpu else "cpu-interpreter", date=utc_now(),
                 torch=torch.__version__, triton=triton.__version__,
                 transformers=transformers.__version__,
                 command=command_line("python", "benchmarks.bench_hf_eager", argv),
                 method=f"random weights, {str(dtype).removeprefix('torch.')}, "
                        f"model(input_ids, use_cache=False) on one sequence of T tokens, eager; "
                        f"{timing}")
    result = dict(stamp=stamp, rows=rows,
                  host=dict(config="qwen3-30b-a3b" if gpu else "qwen3-30b-a3b shrunk",
                            calls=args.host_calls, us_per_call=host_us))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hf_eager_{slug(gpu_name)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {path.with_suffix('')}.{{json,md}}")
    return path


if __name__ == "__main__":
    main()
