"moe-lit's own host work per forward, without a GPU: Triton's launch stubbed out, torch's CPU ops real (run with TRITON_INTERPRET=1)."
import time, torch, cProfile, pstats
from triton.runtime.interpreter import InterpretedFunction
InterpretedFunction.run = lambda self, *a, **kw: None          # stub: measure moe-lit's own host work
from moe_lit.config import MoEConfig
from moe_lit.layer import FusedMoE
cfg = MoEConfig(num_experts=128, top_k=8, hidden_size=256, intermediate_size=64, dtype=torch.bfloat16)
layer = FusedMoE(cfg, experts="triton")
x = torch.randn(1, 256, dtype=torch.bfloat16)
for _ in range(20): layer(x)
t0 = time.perf_counter(); n = 2000
for _ in range(n): layer(x)
print(f"host per forward (launches stubbed, CPU torch ops real): {(time.perf_counter() - t0) / n * 1e6:.1f} us")
pr = cProfile.Profile(); pr.enable()
for _ in range(500): layer(x)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
