"""Expert-parallel MoE layer (installed as ``moe_ops.distributed``).

``ExpertParallelMoE`` shards the routed experts of a ``FusedMoE`` over the ranks of a
process group and moves tokens to their experts and back through one of two
transports: ``nvlink`` (PyTorch symmetric memory on one node, no host sync) or
``all_to_all`` (``torch.distributed`` collectives: NCCL, gloo). Launch with torchrun.
"""
from . import ops  # noqa: F401  (registers torch.ops.tritonmoe.expert_parallel_moe)
from .layer import ExpertParallelMoE
from .protocol import ExpertParallelError, ExpertParallelTimeout
from .sharding import expert_range, random_fused_moe

__all__ = ["ExpertParallelError", "ExpertParallelMoE", "ExpertParallelTimeout", "expert_range",
           "random_fused_moe"]
