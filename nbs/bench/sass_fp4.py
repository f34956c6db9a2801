"""The quantized GEMM1's K loop as sm_90 machine code, without a GPU: instructions per KB of FP4 codes, by layout.

    python nbs/bench/sass_fp4.py [OUT_DIR]
    python nbs/bench/sass_fp4.py --check     # exit 1 unless mma128's loops move no decoded tile through shared memory

Compiles the contiguous quantized GEMM (`_fused_moe_quant_kernel`, gated SiLU, MXFP4 / NVFP4 / FP8 block) for
`cuda:90` with Triton's bundled ptxas, disassembles it with the bundled nvdisasm, finds the K loop (the longest
backward branch) and counts its instructions by opcode, and reads each binary's registers a thread and stack bytes
(the bundled cuobjdump, `moe_lit.testing._resource_usage`) and shared memory, hence how many programs fit an SM
(65536 registers in 256-register units a warp, 228 KB of shared memory with 1 KB reserved a block, 64 warps). Strides of 1 and 16-divisible sizes are specialised as the
launcher's calls are. The count per KB of codes is per warp (instructions · num_warps / 4 / KB a loop iteration),
so tiles of different shapes compare: a K loop bound by instruction issue runs at most 16 B/clock/SM at the floor.
OUT_DIR (optional) keeps each variant's TTGIR and SASS.
"""
import os, re, subprocess, sys, collections
import triton
from triton.backends.compiler import GPUTarget
from moe_lit.kernels import quant as Q

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
STRIDES = "am asm asg we wn wse wsn cm be bn".split()                    # runtime strides; ak, wk, wsk, cn are 1
DIV16 = {"N_OUT", "K", "K_W", "stride_am", "stride_we", "stride_wn", "stride_wse", "stride_wsn", "stride_cm"}


def compile_gemm1(fmt: int, layout: int, BLOCK_M: int, BLOCK_N: int, BLOCK_K: int, num_warps: int, num_stages: int = 3,
                  split_k: int = 1, quant_a: bool = False, scale_fold: bool = False, maxnreg: int | None = None):
    "The compiled contiguous GEMM1 (gated SiLU, token rows, top-2) for `cuda:90`; `quant_a`: FP8 block from bf16 a."
    fn = Q._fused_moe_quant_kernel
    fp8 = fmt < 2
    sig = dict(a_ptr="*fp8e4nv" if fp8 and not quant_a else "*bf16", as_ptr="*fp32" if fp8 and not quant_a else "*bf16",
               w_ptr="*fp8e4nv" if fp8 else "*u8", ws_ptr="*fp32" if fp8 else "*u8", gs_ptr="*fp32", c_ptr="*bf16",
               sorted_ptr="*i32", expert_ids_ptr="*i32", ntpp_ptr="*i32", weights_ptr="*fp32", bias_ptr="*bf16",
               part_ptr="*fp32", lock_ptr="*i32",
               N_OUT="i32", K="i32", K_W="i32", num_pairs="i32", num_m_blocks="i32", num_sorted="i32",
               num_local="i32", alpha="fp32", limit="fp32", **{f"stride_{x}": "i32" for x in STRIDES})
    consts = dict(stride_ak=1, stride_wk=1, stride_wsk=1, stride_cn=1, TOP_K=2, A_PER_PAIR=False, GATED=True,
                  ACTIVATION=0, HAS_BIAS=False, WEIGHT=0, FMT=fmt, UPCAST=False, PRECISION="tf32",
                  GROUP_N=128 if fp8 else 1, GROUP_K={1: 128, 2: 32, 3: 16}[fmt], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  BLOCK_K=BLOCK_K, LAYOUT=layout, SPLIT_K=split_k, QUANT_A=quant_a, SCALE_FOLD=scale_fold)
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n].startswith("*") or n in DIV16}
    src = triton.compiler.ASTSource(fn=fn, signature={n: sig.get(n, "constexpr") for n in names},
                                    constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages,
                                                                         **({"maxnreg": maxnreg} if maxnreg else {})))


def occupancy(regs: int, smem: int, num_warps: int) -> int:
    "Programs of `num_warps` warps that fit one sm_90 SM with `regs` registers a thread and `smem` bytes of shared memory."
    warp_regs = -(-regs * 32 // 256) * 256
    return min(65536 // (warp_regs * num_warps), (228 * 1024) // (smem + 1024), 64 // num_warps, 32)


def k_loop(sass: str) -> collections.Counter:
    "Opcode counts of the longest backward-branch region of `sass` (nvdisasm -c output): the K loop."
    return collections.Counter(t.split(".")[0] for t in k_loop_opcodes(sass))


def k_loop_opcodes(sass: str) -> list[str]:
    "The K loop's instructions as full opcodes (`WARPGROUP.DEPBAR.LE`), in order, predicates dropped."
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m: labels[m.group(1)] = len(ins); continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m: ins.append(m.group(1))
    loops = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, t in enumerate(ins)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", t)) and labels.get(m.group(1), i) < i]
    _, a, b = max(loops)
    return [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in ins[a:b + 1]]


def serialized_mmas(sass: str) -> int:
    """How many of the K loop's `HGMMA`s are waited for before the next one issues (a `WARPGROUP.DEPBAR` between them):
    16 of 16 when ptxas serializes the wgmmas (its C7515 note), one per dot when they run back to back."""
    ops = k_loop_opcodes(sass)
    at = [i for i, op in enumerate(ops) if op.startswith("HGMMA")] + [len(ops)]
    return sum(any(o.startswith("WARPGROUP.DEPBAR") for o in ops[a + 1:b]) for a, b in zip(at, at[1:]))


VARIANTS = [  # (label, FMT, LAYOUT, BLOCK_M, BLOCK_N, BLOCK_K, num_warps); "bf16 in": the K loop quantizes a (QUANT_A);
              # "folded": e8m0 bytes <= 128, the 2^126 in the scale (SCALE_FOLD); "1st" / "5st": num_stages 1 / 5
              # (else 3); "r96" / "r128": maxnreg, the tuner's register cap (`14_bench.tile_candidates`)
    ("mxfp4 plain", 2, 0, 32, 64, 64, 4), ("mxfp4 split64", 2, 1, 32, 64, 64, 4),
    ("mxfp4 split64", 2, 1, 32, 128, 128, 8), ("mxfp4 split64", 2, 1, 32, 128, 128, 4),
    ("mxfp4 mma128", 2, 2, 32, 64, 128, 4), ("mxfp4 mma128", 2, 2, 32, 128, 128, 8),
    ("mxfp4 mma128 folded", 2, 2, 32, 64, 128, 4), ("mxfp4 mma128 folded", 2, 2, 32, 128, 128, 8),
    ("mxfp4 mma128 folded 1st", 2, 2, 32, 64, 128, 4), ("mxfp4 mma128 folded 1st", 2, 2, 32, 128, 128, 8),
    ("mxfp4 mma128 folded 5st", 2, 2, 32, 64, 128, 4), ("mxfp4 mma128 folded r96", 2, 2, 32, 64, 128, 4),
    ("mxfp4 mma128 folded", 2, 2, 16, 64, 128, 4),
    ("nvfp4 split64", 3, 1, 32, 64, 64, 4), ("nvfp4 mma128", 3, 2, 32, 64, 128, 4), ("nvfp4 mma128", 3, 2, 32, 128, 128, 8),
    ("nvfp4 mma128 folded", 3, 2, 32, 64, 128, 4), ("nvfp4 mma128 folded", 3, 2, 32, 128, 128, 8),
    ("nvfp4 mma128 folded 1st", 3, 2, 32, 64, 128, 4),
    ("fp8 block", 1, 0, 16, 64, 128, 4), ("fp8 block r128", 1, 0, 16, 64, 128, 4), ("fp8 block bf16 in", 1, 0, 16, 64, 128, 4),
]

def check_mma128() -> list[str]:
    "Problems of the mma128 K loops (MXFP4 and NVFP4, the tuned tile): any `ldmatrix`, or the stores of a tile move."
    bad = []
    for label, fmt in (("mxfp4", 2), ("nvfp4", 3)):
        c = compile_gemm1(fmt, 2, 32, 64, 128, 4)
        path = f"/tmp/sass_check_{os.getpid()}_{label}.cubin"
        open(path, "wb").write(c.asm["cubin"])
        n = k_loop(subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout)
        os.remove(path)
        if n["LDSM"] or n["STS"] > 2:         # the K loop keeps 2 small stores (the scale tile); a moved tile is 16+
            bad.append(f"{label} mma128: expected no shared-memory move of the decoded tile in the K loop, got "
                       f"{n['STS']} STS, {n['LDSM']} LDSM, {n['BAR']} BAR")
    return bad


if __name__ == "__main__" and sys.argv[1:] == ["--check"]:
    problems = check_mma128()
    print("\n".join(problems) or "mma128: the K loops take the decoded tile straight to the MMA (no ldmatrix, no tile stores)")
    sys.exit(1 if problems else 0)
elif __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else None
    if out: os.makedirs(out, exist_ok=True)
    from moe_lit.testing import _resource_usage
    print(f"{'variant':<24}{'BM':>4}{'BN':>5}{'BK':>5}{'warps':>6}{'loop':>7}{'/KB':>7}  smem moves (STS LDS LDSM BAR)  "
          f"MMAs waited on  regs stack smemKB progs/SM  top opcodes")
    for label, fmt, layout, bm, bn, bk, nw in VARIANTS:
        words = label.split()
        c = compile_gemm1(fmt, layout, bm, bn, bk, nw, num_stages=1 if "1st" in words else 5 if "5st" in words else 3,
                          quant_a=label.endswith("bf16 in"), scale_fold="folded" in words,
                          maxnreg=96 if "r96" in words else 128 if "r128" in words else None)
        regs, stack = _resource_usage(c.asm["cubin"])
        smem = int(c.metadata.shared)
        path = os.path.join(out or "/tmp", f"gemm1_{label.replace(' ', '_')}_{bm}_{bn}_{bk}_{nw}")
        open(path + ".cubin", "wb").write(c.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path + ".cubin"], capture_output=True, text=True,
                              check=True).stdout
        if out: open(path + ".sass", "w").write(sass); open(path + ".ttgir", "w").write(c.asm["ttgir"])
        n = k_loop(sass)
        total = sum(n.values())
        kb = 2 * bn * bk * (1 if fmt < 2 else 0.5) / 1024                 # gate + up weight bytes a K step
        top = ", ".join(f"{k} {v}" for k, v in n.most_common(6))
        mma = n["HGMMA"] or n["HMMA"]
        waited = f"{serialized_mmas(sass)}/{mma}" if n["HGMMA"] else "-"
        print(f"{label:<24}{bm:>4}{bn:>5}{bk:>5}{nw:>6}{total:>7}{total * nw / 4 / kb:>7.1f}  "
              f"{n['STS']:>4}{n['LDS']:>4}{n['LDSM']:>5}{n['BAR']:>4}            {waited:>8}  {regs:>4}{stack:>6}"
              f"{smem / 1024:>7.1f}{occupancy(regs, smem, nw):>9}  {top}", flush=True)
