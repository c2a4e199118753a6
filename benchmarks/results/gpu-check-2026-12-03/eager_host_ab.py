"""A/B of FusedMoE eager per-call time, this tree against an older one in .ab/old
(`mkdir -p .ab/old && git archive 02898d4 | tar -x -C .ab/old`), each in its own process:
loop_ms = 200 calls then a sync (median of 5), host_ms = enqueue time per call while the
GPU sleeps (so the host side alone). Run from the repo root: python <this file>."""
import json, os, subprocess, sys

CHILD = r'''
import time, json, torch
import moe_ops
from moe_ops import FusedMoE
out = {}
for name in ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"]:
    cfg = moe_ops.get_config(name)
    moe = FusedMoE.from_config(cfg, dtype=torch.bfloat16, device="cuda")
    for T in (1, 32):
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            for _ in range(30): moe(x)
            torch.cuda.synchronize()
            best = []
            for rep in range(5):
                t0 = time.perf_counter()
                for _ in range(200): moe(x)
                torch.cuda.synchronize()
                best.append((time.perf_counter() - t0) / 200 * 1e3)
            # host only: enqueue time while the GPU is kept busy by a long sleep
            torch.cuda._sleep(int(2e9))
            t0 = time.perf_counter()
            for _ in range(100): moe(x)
            host = (time.perf_counter() - t0) / 100 * 1e3
            torch.cuda.synchronize()
        out[f"{name} T={T}"] = dict(loop_ms=sorted(best)[2], host_ms=host)
print("RESULT " + json.dumps(out))
'''
res = {}
for label, root in (("old", ".ab/old"), ("new", ".")):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        print(label, "FAILED", p.stderr[-3000:]); continue
    res[label] = json.loads(line[0][7:])
for k in res.get("new", {}):
    o, n = res.get("old", {}).get(k, {}), res["new"][k]
    print(f"{k:24s} loop old {o.get('loop_ms', float('nan')):.4f} new {n['loop_ms']:.4f} | "
          f"host old {o.get('host_ms', float('nan')):.4f} new {n['host_ms']:.4f} ms/call")
