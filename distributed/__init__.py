"""Expert-parallel MoE layer (installed as ``moe_ops.distributed``).

Experts sharded over ranks with all-to-all dispatch and combine; filled in by the
expert-parallel issue. Nothing here yet.
"""
