"""``ExpertParallelMoE``: a MoE layer whose routed experts are sharded over the ranks of
a process group.

One forward, in the order the data moves (W ranks, this rank r, its tokens x [T, H]):

    route       top-k of every token over all E experts (router replicated)
    plan        which ranks own each token's experts (``plan``): its rows reserved in
                each owner's receive buffer (``nvlink``) or packed into send blocks
    dispatch    each token once to every owner rank, this one included, with its ids in
                that rank's numbering and its weights (a transport: ``all_to_all`` or
                ``nvlink``)
    shared      the shared expert of this rank's tokens, while the dispatch travels
    experts     the received rows through this rank's experts: one partial sum per row
                (tiles and grids sized for about T tokens: a capacity-sized receive
                buffer is mostly empty rows, skipped; over nvlink only the filled rows,
                counted on the device, are read)
    send back   each partial row to its token's rank (``nvlink``: the token's rank
                pulls it in the combine)
    combine     out[t] = the owners' partials + shared (one kernel)

The expert computation is ``moe_ops.pipeline.fused_experts_impl`` on the local shard
(with its fp8 scales for fp8 experts): ids a rank does not own arrive as -1 and are
skipped by its kernels.

What the dispatch overlaps: the shared expert (main stream) always; over ``nvlink``
(its push on a side stream) also the receiver's ranking and alignment and its fused
gate+up. The receiver waits only until every rank's ids and weights are in (they move
first), aligns its rows while the rows still land, and each gate_up tile waits for the
flags of the sources of its own rows (``moe_ops.kernels.landing``): tiles whose rows
are in compute while the others' travel, the weights read once. fp8 experts whose tiles
read e4m3 activations quantise the received rows in one launch before gate_up: its
programs wait for their rows' flags instead, and gate_up follows once all are done
(weight-only fp8 tiles, those of decode, read the rows in place and start as float
ones do). What the early start costs is a flag check per gate_up tile (or quantisation
program) and source (``benchmarks.ep_receiver``, "landing").
(An earlier ``overlap=True`` computed the own tokens apart, reading the local experts'
weights twice; measured slower in 22 of 24 cells on 2 x H200, it is gone.)

Every exchange carries the layer's id, its call count and the sender's status
(``protocol``, which also says where and when each failure raises); whatever fails, a
rank finishes the forward's exchanges, so the ranks stay in step.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import triton
from torch import nn

from moe_ops.configs import MoEConfig, get_config
from moe_ops.module import FusedMoE, shared_expert_output
from moe_ops.pipeline import fused_experts_impl
from moe_ops.profiling import stage_range
from moe_ops.routing import Routing, route
from moe_ops.interpreter import BLOCKS, interpreter_active
from moe_ops.fp8 import scheme_of
from moe_ops.validation import FLOAT_DTYPES, check_expert_weights

from . import protocol as P
from .all_to_all import AllToAllTransport
from .kernels import combine_partials_kernel
from .nvlink import NVLinkTransport, nvlink_available
from .sharding import (EXPERT_TENSORS, REPLICATED_TENSORS, check_ranks_agree, draw_experts,
                       expert_range, layer_description, replicated_shell, weight_format)

TRANSPORTS = ("auto", "nvlink", "all_to_all")

_LAYERS: dict[int, "weakref.ref[ExpertParallelMoE]"] = {}
_next_id = 0  # above every id this process has used; ids are agreed by the group


def layer_by_id(layer_id: int) -> "ExpertParallelMoE":
    layer = _LAYERS.get(layer_id)
    layer = layer() if layer is not None else None
    if layer is None:
        raise RuntimeError(f"tritonmoe::expert_parallel_moe: no live layer with id {layer_id}")
    return layer


def _experts_error(hidden_size, router_weight, w_gate_up, w_down, w_gate_up_scale, w_down_scale):
    """(type name, message) when this rank's expert weights (and fp8 scales) do not fit
    its hidden size, dtype (the router's) and device, else None: the layer gathers it, so
    that every rank raises it."""
    hidden_like = torch.empty(0, hidden_size, dtype=router_weight.dtype,
                              device=router_weight.device)
    # The layer keeps contiguous copies: only a copy's layout matters.
    contiguous = [None if t is None else t.contiguous()
                  for t in (w_gate_up, w_down, w_gate_up_scale, w_down_scale)]
    try:
        check_expert_weights(hidden_like, *contiguous)
    except (TypeError, ValueError) as error:
        return (type(error).__name__, f"its {weight_format(w_gate_up, w_gate_up_scale)} experts "
                f"do not fit its {router_weight.dtype} router and hidden states: {error}")
    return None


def rank_in(group) -> int:
    """This process's rank in ``group``; a clear error where it is not a member."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member "
                         "of the process group it was given; build the layer only on its "
                         "members (dist.new_group is called by every process, the layer by "
                         "the members)")
    return rank


class ExpertParallelMoE(nn.Module):
    """Routed experts sharded over ``group`` (default: the world), router and shared
    expert replicated. ``forward(x [..., H]) -> [..., H]`` gives each rank what a
    single-process ``FusedMoE`` gives for its own tokens; every rank of the group must
    call it, with any number of tokens (0 included).

    fp8 experts (``FusedMoE.quantize_experts``, ``from_config(weight_dtype=
    torch.float8_e4m3fn, scheme="block" | "channel")``) are supported: each rank keeps the
    rows ``expert_range`` of ``w_gate_up``, ``w_down`` and of their float32 scales
    ``w_gate_up_scale``, ``w_down_scale`` (dim 0 is the expert in both scale layouts,
    ``moe_ops.fp8``), and runs them for its own and the received tokens. Tokens travel in
    the hidden dtype (bfloat16 or float16), which the router and shared expert keep.
    The ranks check at construction that they hold one config, hidden dtype and expert
    format (dtype and fp8 scheme), and that each rank's experts and scales fit its hidden
    states; any mismatch raises the same error on every rank.

    Args:
        moe: the whole layer, the same weights on every rank; only this rank's shard
            ``expert_range`` of its routed experts (and of their fp8 scales) is kept
            (copied).
        transport: ``"nvlink"`` (one node, symmetric memory, needs
            ``max_tokens_per_rank``), ``"all_to_all"`` (``torch.distributed``
            collectives on the group's backend) or ``"auto"`` (nvlink when every rank
            is on one node with peer access and ``max_tokens_per_rank`` is given).
        max_tokens_per_rank: fixes the buffers and split sizes: no host synchronisation
            and CUDA-graph capturable. Without it ``all_to_all`` exchanges the counts
            once per forward (a small collective the host waits for).
        timeout: seconds a forward waits for its peers before it raises
            ``ExpertParallelTimeout`` (and tells them); ``None``: the process group's
            time-out. See ``moe_ops.distributed.all_to_all`` for which waits it bounds.

    Every forward carries the layer's id and call count (``protocol``): it returns the
    right output on every rank or fails on every rank. Where a failure raises (at once,
    or through ``check()`` when CUDA tensors and fixed buffers keep the host out) is
    written in ``protocol``; ``reset()`` makes a failed layer usable again. Over ``nvlink``
    gate+up starts on the received rows as they land (module docstring); setting
    ``early_gate_up = False`` makes it wait for all of them (the benchmark compares both).
    With ``max_tokens_per_rank`` a rank's expert tiles follow its own token count, and
    peers may send it far more (ranks with uneven batches, as under data-parallel
    attention): ``uneven_batches`` (default True) launches a second tile set, taken on
    the device where the slots routed here run far past its own count's, for float and
    fp8 experts (``moe_ops.pipeline``: two or three more launches, 5-14 us at T=1 on an
    H200; without them such a forward's expert compute runs 4.5-10x slower); set it
    False where every rank always runs about as many tokens as the others.
    """

    def __init__(self, moe: FusedMoE, group=None, transport: str = "auto",
                 max_tokens_per_rank: int | None = None, *, timeout: float | None = None,
                 _local_experts=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialised "
                               "(torchrun, then dist.init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = rank_in(self.group)
        self.world_size = dist.get_world_size(self.group)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        config = moe.config
        self.config = config
        global _next_id
        experts = (tuple(getattr(moe, name) for name in EXPERT_TENSORS)
                   if _local_experts is None else tuple(_local_experts))
        replicated = {name: getattr(moe, name) for name in REPLICATED_TENSORS}
        description = layer_description(config, moe.router_weight.dtype, replicated, transport,
                                        max_tokens_per_rank,
                                        weight_format(experts[0], experts[2]))
        description["_layer_id"] = _next_id
        description["_error"] = _experts_error(config.hidden_size, moe.router_weight,
                                               *experts)
        gathered = check_ranks_agree(self.group, description)
        # The layer's id, the same on every rank (they build their layers collectively).
        self.layer_id = max(g["_layer_id"] for g in gathered)
        _next_id = self.layer_id + 1
        self.expert_range = expert_range(config.num_experts, self.world_size, self.rank)
        first, last = self.expert_range.start, self.expert_range.stop

        def keep(tensor):
            return None if tensor is None else nn.Parameter(tensor.detach(), requires_grad=False)

        self.router_weight = keep(moe.router_weight)
        self.register_buffer("score_bias", moe.score_bias)
        self.shared_gate_up = keep(moe.shared_gate_up)
        self.shared_down = keep(moe.shared_down)
        self.shared_gate = keep(moe.shared_gate)
        # This rank's experts: rows first:last of the weights and of their fp8 scales
        # (dim 0 is the expert in both scale layouts); from_config drew only these.
        if _local_experts is None:
            experts = tuple(None if t is None else t[first:last].clone() for t in experts)
        for name, tensor in zip(EXPERT_TENSORS, experts):
            self.register_parameter(name, keep(None if tensor is None else tensor.contiguous()))

        self.early_gate_up = True  # gate+up as rows land (module docstring; benchmarks turn it off)
        self.uneven_batches = True  # see the class docstring
        self.timeout = timeout
        # Call count and failure record (protocol.STATE_WORDS int64): an op argument that
        # the op mutates, so that compilers keep and order every call.
        self.register_buffer("protocol_state", P.new_state(self.router_weight.device),
                             persistent=False)
        self._failed: str | None = None  # a failure every rank raised: no more exchanges
        # Read the state after each forward and raise there: free on CPU. On CUDA it would
        # be a host sync (and impossible under graph capture): check() does it instead.
        self._raise_after_forward = self.router_weight.device.type == "cpu"
        self.set_transport(transport, max_tokens_per_rank)
        _LAYERS[self.layer_id] = weakref.ref(self, lambda _, key=self.layer_id: _LAYERS.pop(key, None))

    def set_transport(self, transport: str = "auto", max_tokens_per_rank: int | None = None) -> None:
        """Choose the transport and buffer size (see the class docstring); collective:
        every rank calls it with the same arguments. NVLink workspaces are shared by
        the layers of one (group, max_tokens_per_rank, hidden, top_k, dtype)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if max_tokens_per_rank is not None and (not isinstance(max_tokens_per_rank, int)
                                                or max_tokens_per_rank < 1):
            raise ValueError(f"max_tokens_per_rank must be a positive int or None, "
                             f"got {max_tokens_per_rank!r}")
        device = self.router_weight.device
        if transport == "auto":
            transport = ("nvlink" if max_tokens_per_rank is not None
                         and nvlink_available(self.group, device) else "all_to_all")
        if transport == "nvlink":
            if max_tokens_per_rank is None:
                raise ValueError("transport='nvlink' needs max_tokens_per_rank (its symmetric "
                                 "buffers are sized once)")
            if device.type != "cuda":
                raise ValueError(f"transport='nvlink' needs CUDA tensors, the layer is on {device}")
            self.transport = NVLinkTransport(self.group, self.rank, self.world_size,
                                             max_tokens_per_rank, self.config.hidden_size,
                                             self.config.top_k, self.router_weight.dtype, device,
                                             timeout=self.timeout)
        else:
            self.transport = AllToAllTransport(self.group, self.rank, self.world_size,
                                               max_tokens_per_rank, self.config.hidden_size,
                                               self.router_weight.dtype, device, self.timeout)
        self.max_tokens_per_rank = max_tokens_per_rank

    @classmethod
    def from_config(cls, name_or_config: str | MoEConfig, group=None, dtype=torch.float32,
                    device=None, transport: str = "auto", max_tokens_per_rank: int | None = None,
                    *, seed: int = 0, timeout: float | None = None,
                    weight_dtype: torch.dtype | None = None, scheme: str = "block"
                    ) -> "ExpertParallelMoE":
        """A random layer that allocates only this rank's experts; router and shared
        weights are drawn identically on every rank. ``weight_dtype=torch.float8_e4m3fn``
        quantises the experts with ``scheme`` ("block" or "channel"), as
        ``FusedMoE.from_config`` does (``dtype`` then bfloat16 or float16). The whole
        layer is ``moe_ops.distributed.random_fused_moe(config, seed, dtype, device,
        weight_dtype, scheme)``."""
        config = get_config(name_or_config)
        group = group if group is not None else dist.group.WORLD
        rank = rank_in(group)
        experts = expert_range(config.num_experts, dist.get_world_size(group), rank)
        return cls(replicated_shell(config, seed, dtype, device), group, transport,
                   max_tokens_per_rank, timeout=timeout,
                   _local_experts=draw_experts(config, seed, experts, dtype, device,
                                               weight_dtype, scheme))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., H]: routed experts (over all ranks) plus the shared expert."""
        if not isinstance(hidden_states, torch.Tensor):
            return self.forward_impl(hidden_states)  # takes part, then raises naming it
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1]) if hidden_states.dim() >= 1 else hidden_states
        if not torch.compiler.is_compiling():
            # A rejected input still takes part in the exchange (a meta or foreign-device
            # tensor would never reach the op's real implementation).
            error = self._input_error(flat)
            if error is not None:
                self.forward_impl(flat, self.protocol_state)
        out = torch.ops.tritonmoe.expert_parallel_moe(flat, self.protocol_state, self.layer_id)
        return out.reshape(shape)

    # -- the contract: failures, check, reset ----------------------------------------

    def check(self) -> None:
        """Raise ``ExpertParallelError`` if a forward of this layer failed since the last
        ``check`` (or is failed until ``reset``): the call to make after CUDA-graph
        replays, and after forwards with fixed buffers on CUDA, whose failures only turn
        the outputs into NaN. Reads the layer's device state: a host sync. Local: every
        rank that checks sees the same failure."""
        values = self.protocol_state.tolist()
        if self._failed is not None:
            raise P.ExpertParallelError(self._failed)
        if values[P.CODE]:
            P.clear_reported(self.protocol_state)
            record = self.transport.failure_record() if values[P.CODE] == P.SHARED else None
            raise P.failure(values, self.layer_id, self.rank, record=record)

    def reset(self) -> None:
        """Make a failed layer usable again. Collective: every rank of the group calls it
        (after the failure was raised there). Finishes and waits for the exchanges failed
        forwards left in flight (up to the group's time-out), checks that every rank
        resets this same layer, and restarts the call count at 0."""
        self.transport.reset()
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, self.layer_id, group=self.group)
        if any(other != self.layer_id for other in gathered):
            raise P.ExpertParallelError(
                f"ExpertParallelMoE.reset: the ranks reset different layers {gathered}")
        self.protocol_state.zero_()
        self._failed = None

    def _input_error(self, x) -> Exception | None:
        try:
            self.check_input(x)
        except (ValueError, TypeError) as error:
            return error
        return None

    def _raise_failure(self, values: list[int]) -> None:
        """Raise a failure every rank raises now; a sticky one ends the exchanges."""
        error = P.failure(values, self.layer_id, self.rank)
        if P.is_sticky(values):
            self._failed = str(error)
        P.clear_reported(self.protocol_state)
        raise error

    # -- the op body -------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Metadata checks of one forward's hidden states [T, H] (run by the op's real
        implementation, which takes part in the exchange with a rejected input)."""
        H = self.config.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != H:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"hidden_states must be [..., hidden={H}] for this layer, got {shape}")
        if x.dtype != self.router_weight.dtype or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"hidden_states has dtype {x.dtype}, expected the layer's "
                            f"{self.router_weight.dtype}")
        if x.device != self.router_weight.device:
            raise ValueError(f"hidden_states is on {x.device}, expected the layer's device "
                             f"{self.router_weight.device} (rank {self.rank})")
        C = self.max_tokens_per_rank
        if C is not None and x.shape[0] > C:
            raise ValueError(f"hidden_states has {x.shape[0]} tokens, more than "
                             f"max_tokens_per_rank={C}")

    def forward_impl(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The forward of x [T, H] (contiguous); see the module docstring. ``state`` is the
        layer's protocol state (the op passes it; the compiler may pass a copy)."""
        state = self.protocol_state if state is None else state
        if self._failed is not None:
            raise P.ExpertParallelError(self._failed)
        device, transport = self.router_weight.device, self.transport
        call = P.Call(self.layer_id, state, fixed=self.max_tokens_per_rank is not None)
        rejected = self._input_error(x)
        if rejected is not None:  # take part with no tokens, telling the peers
            call.status = P.INPUT
            x = torch.empty(0, self.config.hidden_size, dtype=self.router_weight.dtype,
                            device=device)
        transport.order.enter(device)
        try:
            out = self._exchange_and_compute(x.contiguous(), call)
        except BaseException as error:
            if not call.everyone_raised:
                call.status = call.status or P.FAILED
                try:
                    transport.abort(call, self.config.hidden_size, self.config.top_k,
                                    self.router_weight.dtype, device)
                except Exception:  # noqa: BLE001  (the original error says more)
                    pass
            capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if (isinstance(error, P.ExpertParallelError) and not capturing
                    and P.is_sticky(state.tolist())):
                self._failed = str(error)  # every rank raised it (or timed out): refuse now
            if rejected is not None:
                raise rejected from None
            raise
        finally:
            transport.order.exit(device)
        if rejected is not None:
            if self._raise_after_forward:
                P.clear_reported(state)
            raise rejected
        if self._raise_after_forward:  # every rank sees the failure in this forward
            values = state.tolist()
            if values[P.POISON]:
                self._raise_failure(values)
        return out

    def _exchange_and_compute(self, x: torch.Tensor, call: P.Call) -> torch.Tensor:
        transport, c = self.transport, self.config
        W, C = self.world_size, self.max_tokens_per_rank
        h = transport.header_rows
        T = x.shape[0]

        with stage_range("plan"):
            topk_weights, topk_ids, _ = route(
                x, self.router_weight, Routing(**c.routing_kwargs()),
                None if self.score_bias is None else self.score_bias.float())
            plan = transport.plan(x, topk_weights, topk_ids, len(self.expert_range), call=call)
            if C is None:
                send_rows, recv_rows = transport.exchange_counts(call, plan.counts.long())
            else:
                send_rows = recv_rows = call.send_rows = call.recv_rows = [C + h] * W
        pending = transport.dispatch(x, topk_weights, topk_ids, plan, send_rows, recv_rows,
                                     call=call)

        scales = dict(w_gate_up_scale=self.w_gate_up_scale, w_down_scale=self.w_down_scale)
        shared = shared_expert_output(x, self.shared_gate_up, self.shared_down, self.shared_gate)

        received = transport.receive(pending, call=call, early=self.early_gate_up)
        # Rows without a token are unrouted: tiles for the tokens this rank expects (about
        # its own T; with counts exchanged, the rows received), those rows' partials never
        # written, the rows past ``received.rows`` (where the transport knows them) not
        # even read.
        rows = received.x.shape[0]
        partials = fused_experts_impl(
            received.x, received.weights, received.ids, self.w_gate_up, self.w_down, **scales,
            tile_tokens=max(T, 1) if C is not None else rows, skip_unrouted=True,
            num_rows=received.rows,
            out=transport.partials_out(rows, c.hidden_size, x.dtype, x.device),
            landing=received.landing, second_tiles=self.uneven_batches)
        back = transport.receive_back(
            transport.send_back(partials, send_rows, recv_rows, call=call), call=call)

        out = torch.empty_like(x)
        with stage_range("combine"):
            if T:
                block_t, block_h = BLOCKS.combine_t, BLOCKS.combine_h
                pull = back.peer_bases is not None
                grid = (triton.cdiv(T, block_t), triton.cdiv(c.hidden_size, block_h))
                combine_partials_kernel[grid](
                    back.back, back.peer_bases if pull else plan.rows,  # bases unread without PULL
                    plan.rows, shared.contiguous() if shared is not None else x, call.state,
                    out, T, c.hidden_size, WORLD=W, HAS_SHARED=shared is not None, PULL=pull,
                    BLOCK_T=block_t, BLOCK_H=block_h, INTERPRETER=interpreter_active(),
                )
        transport.end(call)
        return out

    @property
    def fp8_scheme(self) -> str | None:
        """"block" or "channel" for fp8 experts, None for float ones (as ``FusedMoE``)."""
        return scheme_of(self.w_gate_up_scale)

    def extra_repr(self) -> str:
        return (f"{self.config.name}: experts {self.expert_range.start}..{self.expert_range.stop - 1} "
                f"of {self.config.num_experts} on rank {self.rank}/{self.world_size} "
                f"({weight_format(self.w_gate_up, self.w_gate_up_scale)}), "
                f"transport={self.transport.name}, max_tokens_per_rank={self.max_tokens_per_rank}")
