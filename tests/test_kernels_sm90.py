"""The expert kernels' variants compile for an H100/H200 (sm_90) from any machine: the
interpreter runs them in CI, this catches what it accepts and the GPU compiler would
not (fp8 epilogues, 64-row fp8 tiles, the router's quantisation). Arguments carry the
16-divisibility a real launch gets, so the compiled code is the one a GPU would run.
(Tensor-descriptor variants need descriptor arguments and are left to the GPU runs.)"""
from helpers import compile_for_sm90

SM90_COMPILE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_ops.kernels.align import align_kernel, rank_align_kernel, rank_kernel
from moe_ops.kernels.combine import combine_kernel
from moe_ops.kernels.grouped_gemm import grouped_gemm_kernel
from moe_ops.kernels.quantize import quantize_kernel
from moe_ops.kernels.route import route_kernel

def build(fn, signature, constexprs, aligned, num_warps=4, num_stages=3):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    keys = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=keys, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=num_warps, num_stages=num_stages))

def gemm(a, w, out, **flags):
    signature = dict(a_ptr=a, a_scale_ptr="*fp32", w_ptr=w, w_scale_ptr="*fp32", out_ptr=out,
                     out_scale_ptr="*fp32", topk_weights_ptr="*fp32", sorted_slots_ptr="*i32",
                     block_expert_ptr="*i32", num_blocks_ptr="*i32", N="i32", K="i32",
                     num_slots="i32", a_rows_per_slot_div="i32", grid_blocks="i32",
                     stride_a="i32", stride_as="i32", stride_we="i32", stride_wn="i32",
                     stride_se="i32", stride_sn="i32", stride_out="i32", stride_os="i32",
                     row_source_ptr="*i32", source_flags_ptr="*i64", epoch_ptr="*i64",
                     late_ptr="*i64", stop_ptr="*i64", timeout_ticks="i64")
    constexprs = dict(a_desc=None, w_desc=None, GATE_UP=True, OUT_FP8=False, H_DTYPE=None,
                      BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, EVEN_K=True,
                      H_BLOCK_ORDER=False, B_DESC=False, W_SCALE=0, A_FP8=False, FAST_ACC=False,
                      LOOP_M=False, WAIT_ROWS=False, NUM_SOURCES=1, HIP=False,
                      INTERPRETER=False)
    constexprs.update(flags)
    aligned = [n for n in signature if n.endswith("_ptr")] + ["N", "K", "stride_a", "stride_we",
                                                              "stride_wn", "stride_out"]
    build(grouped_gemm_kernel, signature, constexprs, aligned)

gemm("*bf16", "*bf16", "*bf16")
gemm("*bf16", "*bf16", "*bf16", LOOP_M=True, H_BLOCK_ORDER=True)
# gate_up over rows still landing from two ranks (expert parallel over NVLink).
gemm("*bf16", "*bf16", "*bf16", LOOP_M=True, H_BLOCK_ORDER=True, WAIT_ROWS=True, NUM_SOURCES=4)
gemm("*bf16", "*fp8e4nv", "*bf16", GATE_UP=False, W_SCALE=1, BLOCK_K=256)
gemm("*fp8e4nv", "*fp8e4nv", "*bf16", W_SCALE=1, A_FP8=True, BLOCK_M=64, BLOCK_N=32)
gemm("*fp8e4nv", "*fp8e4nv", "*fp8e4nv", W_SCALE=2, A_FP8=True, BLOCK_M=64, BLOCK_N=256,
     OUT_FP8=True, H_DTYPE=tl.bfloat16, H_BLOCK_ORDER=True)
gemm("*fp8e4nv", "*fp8e4nv", "*bf16", GATE_UP=False, W_SCALE=2, A_FP8=True, BLOCK_M=64,
     BLOCK_N=128, FAST_ACC=True)
gemm("*fp8e4nv", "*fp8e4nv", "*bf16", GATE_UP=False, W_SCALE=1, A_FP8=True, BLOCK_M=64,
     BLOCK_N=64, FAST_ACC=True)

# Plain; counted; a receive buffer's few counted rows, strided and gated (a second tile
# set's); over rows still landing from two ranks; its routed rows only (top-8 ids).
for block_r, block_c, per_row, counted, strided, waits, ids_per_row in (
        (1, 2048, True, 0, False, False, 0), (16, 128, False, 8, False, False, 0),
        (2, 1024, False, 1, True, False, 0), (1, 2048, True, 1, True, True, 0),
        (16, 128, False, 0, False, False, 8)):
    build(quantize_kernel, dict(src_ptr="*bf16", dst_ptr="*fp8e4nv", scale_ptr="*fp32",
                                num_rows="i32", K="i32", stride_src="i32", count_ptr="*i32",
                                gate_ptr="*i32", ids_ptr="*i32", row_source_ptr="*i32",
                                source_flags_ptr="*i64", epoch_ptr="*i64", late_ptr="*i64",
                                stop_ptr="*i64", timeout_ticks="i64"),
          dict(BLOCK_R=block_r, BLOCK_C=block_c, PER_ROW=per_row, ROWS_PER_COUNT=counted,
               GATED=strided, STRIDE=strided, IDS_PER_ROW=ids_per_row,
               IDS_PAD=max(1, ids_per_row), NUM_EXPERTS=128, WAIT_ROWS=waits, NUM_SOURCES=2,
               HIP=False),
          ["src_ptr", "dst_ptr", "scale_ptr", "K", "stride_src"])

# An expert-parallel receive buffer read up to its filled rows (HAS_ROWS).
build(rank_kernel, dict(topk_ids_ptr="*i32", block_counts_ptr="*i32", ranks_ptr="*i32",
                        num_tokens="i32", rows_ptr="*i32"),
      dict(NUM_EXPERTS=128, TOP_K=8, E_PAD=128, K_PAD=8, BLOCK_T=64, HAS_ROWS=True),
      ["topk_ids_ptr", "block_counts_ptr", "ranks_ptr"])
build(align_kernel, dict(topk_ids_ptr="*i32", block_counts_ptr="*i32", ranks_ptr="*i32",
                         sorted_slots_ptr="*i32", block_expert_ptr="*i32",
                         num_blocks_ptr="*i32", num_slots="i32", num_token_blocks="i32",
                         max_blocks="i32", rows_ptr="*i32", switch_slots="i32"),
      dict(NUM_EXPERTS=128, TOP_K=8, RANK_BLOCK_T=64, E_PAD=128, BLOCK_M=16, BIG_BLOCK_M=64,
           TB_CHUNK=32, BLOCK_CHUNK=32, CHUNK=4096, HAS_ROWS=True), ["topk_ids_ptr"],
      num_warps=8)
build(rank_align_kernel, dict(topk_ids_ptr="*i32", block_counts_ptr="*i32", ranks_ptr="*i32",
                              sorted_slots_ptr="*i32", block_expert_ptr="*i32",
                              num_blocks_ptr="*i32", num_tokens="i32", num_token_blocks="i32",
                              max_blocks="i32", rows_ptr="*i32", switch_slots="i32"),
      dict(NUM_EXPERTS=128, TOP_K=8, E_PAD=128, K_PAD=8, RANK_BLOCK_T=32, ONE_HOT_ROWS=64,
           ALL_ROWS=8192, BLOCK_M=16, BIG_BLOCK_M=0, TB_CHUNK=32, BLOCK_CHUNK=32, CHUNK=4096),
      ["topk_ids_ptr"], num_warps=8)
build(combine_kernel, dict(y_ptr="*bf16", topk_ids_ptr="*i32", out_ptr="*bf16",
                           num_tokens="i32", hidden="i32", rows_ptr="*i32"),
      dict(NUM_EXPERTS=128, TOP_K=8, SKIP_UNROUTED=True, HAS_ROWS=True, K_PAD=8, BLOCK_T=4,
           BLOCK_H=512, INTERPRETER=False), ["y_ptr", "out_ptr", "hidden"])

for quantize in (1, 2):
    build(route_kernel, dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*fp32",
                             topk_weights_ptr="*fp32", topk_ids_ptr="*i32", block_counts_ptr="*i32",
                             ranks_ptr="*i32", x8_ptr="*fp8e4nv", x_scale_ptr="*fp32",
                             num_tokens="i32", hidden="i32", routed_scaling_factor="fp32"),
          dict(NUM_EXPERTS=256, TOP_K=8, SIGMOID=True, RENORMALIZE=True, HAS_BIAS=True,
               N_GROUP=8, TOPK_GROUP=4, E_PAD=256, K_PAD=8, G_PAD=8, BLOCK_T=16, BLOCK_H=64,
               WRITE_RANKS=True, QUANTIZE=quantize, QUANT_C=128, INTERPRETER=False),
          ["x_ptr", "w_ptr", "x8_ptr", "x_scale_ptr", "hidden"])
"""


def test_expert_kernels_compile_for_sm90(tmp_path):
    compile_for_sm90(SM90_COMPILE, tmp_path)
