"""Host cost of one launch on this machine: a torch op, Triton's JIT launch, and a launch of the compiled kernel.

    python nbs/bench/launch_cost.py
"""
import time
import torch, triton, triton.language as tl


@triton.jit
def _many_args_kernel(x_ptr, y_ptr, z_ptr, w_ptr, n, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14,
                      a15, a16, a17, a18, a19, a20, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + a1, mask=i < n)


def per_call(f, n=2000):
    for _ in range(50): f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): f()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return dt * 1e6


x = torch.randn(1024, device="cuda"); y = torch.empty_like(x)
args = (x, y, x, y, 1024, *range(2, 22))
k = _many_args_kernel[(1,)](*args, B=1024, C=3, D=4)
dev = torch.cuda.current_device()
stream = torch.cuda.current_stream().cuda_stream
print(f"torch.empty(16)           {per_call(lambda: torch.empty(16, device='cuda')):7.1f} us")
print(f"x.add_(1)                 {per_call(lambda: x.add_(1)):7.1f} us")
print(f"x[:5].float()             {per_call(lambda: x[:5].float()):7.1f} us")
print(f"jit launch, 25 args       {per_call(lambda: _many_args_kernel[(1,)](*args, B=1024, C=3, D=4)):7.1f} us")
run, fn, meta = k.run, k.function, k.packed_metadata
print(f"compiled[grid](*args)     {per_call(lambda: k[(1, 1, 1)](*args, 1024, 3, 4)):7.1f} us")
print(f"compiled.run direct       {per_call(lambda: run(1, 1, 1, stream, fn, meta, None, None, None, *args, 1024, 3, 4)):7.1f} us")
print(f"current_stream lookup     {per_call(lambda: torch.cuda.current_stream().cuda_stream):7.1f} us")
from triton.runtime import driver
print(f"driver stream lookup      {per_call(lambda: driver.active.get_current_stream(dev)):7.1f} us")
y2 = y.clone(); run(1, 1, 1, stream, fn, meta, None, None, None, *args, 1024, 3, 4); torch.cuda.synchronize()
print("direct launch computes the same:", torch.equal(y, x + 2))
