"""Does Triton's warp specialization take the CTA barriers out of a decode-then-MMA K loop? Compiled for sm_90, no GPU.

    python nbs/bench/ws_toy_sm90.py

A toy of the FP4 GEMM1's K loop (`09c`): int32 code words and bf16 activations loaded through tensor descriptors
(TMA), each word decoded by an inline-PTX block into eight bf16 values, joined back to a [BLOCK_N, BLOCK_K] tile and
fed to `tl.dot` as the left operand (64 weight rows, 16 activation rows, 128-wide K tiles, 4 warps, 3 stages). It
is compiled with `tl.range(..., warp_specialize=False / True)`, and each form's loops (backward branches) are
counted by opcode in the SASS: `BAR` (CTA-wide barriers, the FP4 loop's largest stall under Nsight Compute),
`SYNCS` (mbarrier operations), `HGMMA`, shared-memory loads. Written for `09c`'s Performance; the log beside it is
`ws_toy_sm90.log`.
"""
import collections, os, re, subprocess, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget

@triton.jit
def toy(w_ptr, a_ptr, c_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    wd = tl.make_tensor_descriptor(w_ptr.to(tl.pointer_type(tl.int32)), shape=[N, K // 8], strides=[K // 8, 1],
                                   block_shape=[BLOCK_N, BLOCK_K // 8])
    ad = tl.make_tensor_descriptor(a_ptr, shape=[BLOCK_M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    for kt in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS):
        x = wd.load([pid * BLOCK_N, kt * BLOCK_K // 8])
        a = ad.load([0, kt * BLOCK_K])
        o = tl.inline_asm_elementwise(                    # a stand-in decode: eight bf16 from a word (shifts and masks)
            "{.reg .b32 t; and.b32 t, $8, 0x81C081C0; mov.b32 {$0, $1}, t; shl.b32 t, $8, 3; and.b32 t, t, 0x81C081C0; "
            "mov.b32 {$2, $3}, t; shl.b32 t, $8, 6; and.b32 t, t, 0x81C081C0; mov.b32 {$4, $5}, t; shl.b32 t, $8, 9; "
            "and.b32 t, t, 0x81C081C0; mov.b32 {$6, $7}, t;}", "=h,=h,=h,=h,=h,=h,=h,=h,r", [x],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        w = tl.join(tl.join(tl.join(o[0], o[4]), tl.join(o[2], o[6])), tl.join(tl.join(o[1], o[5]), tl.join(o[3], o[7])))
        acc = tl.dot(tl.reshape(w, (BLOCK_N, BLOCK_K)), tl.trans(a), acc)
    tl.store(c_ptr + offs_n[:, None] * BLOCK_M + offs_m[None, :], acc)

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
sig = dict(w_ptr="*u8", a_ptr="*bf16", c_ptr="*fp32", N="i32", K="i32", BLOCK_N="constexpr", BLOCK_M="constexpr",
           BLOCK_K="constexpr", WS="constexpr")
for ws in (False, True):
    src = triton.compiler.ASTSource(fn=toy, signature=sig, constexprs={(5,): 64, (6,): 16, (7,): 128, (8,): ws},
                                    attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4)})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    path = f"/tmp/ws_toy_{os.getpid()}.cubin"
    open(path, "wb").write(c.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    os.remove(path)
    ins, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line): labels[m.group(1)] = len(ins); continue
        if m := re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?);", line): ins.append(m.group(1))
    loops = sorted(((i - labels[m.group(1)], labels[m.group(1)], i) for i, t in enumerate(ins)
                    if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", t)) and labels.get(m.group(1), i) < i), reverse=True)
    print(f"warp_specialize={ws}: shared memory {c.metadata.shared / 1024:.1f} KB", flush=True)
    for n, a, b in loops[:4]:
        cnt = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in ins[a:b + 1])
        print(f"  loop of {n:4d} instructions: " + ", ".join(f"{op} {cnt[op]}" for op in
              ("BAR", "SYNCS", "HGMMA", "WARPGROUP", "LDS", "LDSM", "UTMALDG")), flush=True)
