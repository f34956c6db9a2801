"""Why a swapped FP8 container's scales do not reach the Triton experts on the GPU (test_layer_follows_inplace_edits)."""
import dataclasses, torch
from moe_lit.layer import FusedMoE
from moe_lit.config import MoEConfig
from moe_lit.formats import moe_reference_standard
torch.manual_seed(12)
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64, dtype=torch.bfloat16)
x = torch.randn(6, 128).bfloat16().cuda()
def rel(q, y):
    ref = moe_reference_standard(x.double().cpu(), q.w13.double().cpu(), q.w2.double().cpu(), *[t.cpu() for t in q.route(x)])
    return float((y.double().cpu() - ref).norm() / ref.norm()), float(y.double().cpu().norm() / ref.norm())
for steps in ("swap only", "after param swap"):
    q = FusedMoE(cfg, seed=1, quant="fp8_w8a8_block", experts="triton", device="cuda")
    print(steps, "fresh", rel(q, q(x)), q.experts, type(q._modular_kernel(6).experts).__name__)
    if steps == "after param swap":
        q.w13 = torch.nn.Parameter(q.w13.detach().clone(), requires_grad=False); q(x)
    g = q.qweights
    print(" w13_scale", tuple(g.w13_scale.shape), g.w13_scale.stride(), g.w13_scale.dtype, "codes", g.w13.stride())
    q.qweights = dataclasses.replace(g, w13_scale=g.w13_scale * 4)
    y = q(x)
    print(" after swap", rel(q, y))
    q._build_hot_path(); print(" rebuilt", rel(q, q(x)))
    f = FusedMoE(cfg, seed=1, quant="fp8_w8a8_block", experts="triton", device="cuda"); f.load_state_dict(q.state_dict())
    print(" fresh layer from state_dict", rel(f, f(x)))
