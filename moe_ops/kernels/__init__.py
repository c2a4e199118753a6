"""Triton kernels of the MoE forward, one file per stage in data-flow order:
route -> align -> grouped_gemm (gate_up, then down) -> combine."""
