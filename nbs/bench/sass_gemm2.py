"""The Standard experts' GEMM2 on pair blocks as sm_90 machine code, without a GPU: with and without the slot sum.

    python nbs/bench/sass_gemm2.py

Compiles `08`'s `_fused_moe_kernel` as `TritonExperts` launches GEMM2 at decode (pair rows, the router weight on the
output, `PAIR_IDS`) with the H200 tile tables' tiles of gpt-oss-120b (a w2 bias, N = K = 2880: ragged tiles;
BLOCK_K 256, 4 stages) and Qwen3-30B-A3B (BLOCK_K 128, 3 stages), each with `COMBINE` off and on, and prints the
registers and stack bytes a thread (`moe_lit.testing._resource_usage`), shared memory, and the instructions of the K
loop and of the whole kernel (`sass_fp4.k_loop`, Triton's bundled nvdisasm).
"""
import os, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton
from triton.backends.compiler import GPUTarget
from moe_lit.kernels import contiguous as C
from moe_lit.testing import _resource_usage
from sass_fp4 import k_loop, BIN
fn = C._fused_moe_kernel
names = list(fn.arg_names)
def comp(combine, has_bias, even_n, even_k, bn=64, bk=256, stages=4):
    sig = dict(a_ptr="*bf16", w_ptr="*bf16", w_desc="constexpr", c_ptr="*bf16", sorted_ptr="*i32", expert_ids_ptr="*i32",
               ntpp_ptr="*i32", weights_ptr="*fp32", bias_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32",
               N_OUT="i32", N_W="i32", K="i32", num_pairs="i32", num_m_blocks="i32", num_sorted="i32", num_local="i32",
               alpha="fp32", limit="fp32", stride_am="i32", stride_we="i32", stride_wn="i32", stride_cm="i32",
               stride_be="i32", stride_bn="i32",
               comb_out_ptr="*bf16", comb_add_ptr="*bf16", comb_count_ptr="*i32", stride_ot="i32", stride_at="i32", add_cols="i32")
    consts = dict(w_desc=None, stride_ak=1, stride_wk=1, stride_cn=1, TOP_K=4, A_PER_PAIR=True, GATED=False, ACTIVATION=0,
                  HAS_BIAS=has_bias, WEIGHT=2, UPCAST=False, EVEN_K=even_k, EVEN_N=even_n, GROUP_M=0, PRECISION="tf32",
                  BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, PAIR_IDS=True, COMBINE=combine, K_PAD=4, ADD=False, PDL=False)
    if not has_bias: consts["stride_bn"] = 1
    div16 = {"N_OUT", "N_W", "K", "stride_am", "stride_we", "stride_wn", "stride_cm", "stride_be", "stride_ot"}   # 2880, 2048,
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n].startswith("*") or n in div16}   # 768: as launched
    src = triton.compiler.ASTSource(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
                                    constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages))
    regs, stack = _resource_usage(c.asm["cubin"])
    p = f"/tmp/sass_gemm2_{os.getpid()}_{combine}.cubin"; open(p, "wb").write(c.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", p], capture_output=True, text=True, check=True).stdout
    os.remove(p)
    n = k_loop(sass)
    return regs, stack, int(c.metadata.shared), sum(n.values()), len(sass.splitlines())
for label, hb, en, ek, bk, st in (("gpt-oss", True, False, False, 256, 4), ("qwen3", False, True, True, 128, 3)):
    for comb in (False, True):
        regs, stack, smem, loop, total = comp(comb, hb, en, ek, bk=bk, stages=st)
        print(f"{label:<8} COMBINE={comb!s:<5} registers {regs:>3}  stack {stack:>4} B  smem {smem >> 10:>3} KB  "
              f"K loop {loop:>5} instructions  kernel {total:>5} lines of SASS")
