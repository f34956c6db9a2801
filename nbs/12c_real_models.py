# %%
#| default_exp real_models

# %% [markdown]
# # Loading a real model
# > A checkpoint's MoE layer in moe-lit, checked against transformers' own block for every model family.

# %%
#| export
from __future__ import annotations
import torch
from moe_lit.layer import FusedMoE
from moe_lit.layouts import LAYOUTS
from moe_lit.models import markdown_table
from moe_lit.testing import hf_moe_block, hf_moe_output
from moe_lit.routing import router_logits
from moe_lit.terms import check_tensor, FLOAT_DTYPES

# %%
#| echo: false
from IPython.display import Markdown   # the notebook's tables as Markdown (not needed by the tests)

# %%
#| hide
import tempfile, json
from pathlib import Path
from fastcore.test import test_eq, test_fail
from moe_lit.testing import tiny_hf_model, assert_close, TINY_HF, write_fp8_block_checkpoint, write_mxfp4_checkpoint
from moe_lit.testing import check_output
from moe_lit.formats import moe_reference_standard, Activation
from moe_lit.kernels.batched import DEVICE
from moe_lit.config import ParallelConfig, MoEConfig
from moe_lit.checkpoint import CheckpointWeights
from moe_lit.layouts import moe_layer_indices
from moe_lit.layer import run_emulated_ep
from moe_lit.quant_weights import FP4_KERNEL_LAYOUT

# %% [markdown]
# In this notebook: a worked example from a checkpoint directory (`FusedMoE.from_pretrained`), the key layouts moe-lit
# reads (`layout_table`), the parity of every family with transformers' MoE blocks, and pointers to the transformers
# integration. A **how-to** page.
#
# ## From a checkpoint directory
#
# A Hugging Face checkpoint directory holds `config.json` and one or more `*.safetensors` files (with
# `model.safetensors.index.json` when sharded). `FusedMoE.from_pretrained(checkpoint_dir, layer_index)` builds the
# MoE block of decoder layer `layer_index`: the config comes from `config.json` (`02_models`), the weights from the
# safetensors files through `CheckpointWeights` (`11c_checkpoint`), which reads **only this rank's experts** — with
# `parallel=` an expert-parallel rank opens only its own experts' keys or rows. Any `FusedMoE` argument can follow
# (`experts=`, `device=`, `quant=`, `placement=`).
#
# The example writes a tiny Qwen3-MoE checkpoint with transformers itself (the same code writes a real one) and
# compares moe-lit's layer with transformers' block on the same rows.

# %%
ckpt = tempfile.mkdtemp()
hf = tiny_hf_model("qwen3_moe", seed=0)                   # any transformers MoE model; here a tiny random one
hf.save_pretrained(ckpt, max_shard_size="100KB")          # several shards and an index, as large checkpoints have
layer = FusedMoE.from_pretrained(ckpt, layer_index=1, dtype=torch.float32)
x = torch.randn(5, layer.config.hidden_size)
err = (layer(x) - hf_moe_output(hf_moe_block(hf, 1), x)).abs().max() / hf_moe_output(hf_moe_block(hf, 1), x).abs().max()
print(layer.config.model_type, layer.config.activation_format.value, f"max relative difference {err:.2g}")

# %% [markdown]
# **On an expert-parallel deployment** each rank builds its own layer: pass the rank's `ParallelConfig` (its
# `dp_rank` is its EP rank when TP is 1) and it reads only its experts — here rank 1 of 2 under NIXL EP, which holds
# experts 3, 4 and 5 of the 6:

# %%
par = ParallelConfig.make(tp_size=1, dp_size=2, dp_rank=1, enable_expert_parallel=True, all2all_backend="nixl_ep")
rank1 = FusedMoE.from_pretrained(ckpt, layer_index=1, parallel=par, dtype=torch.float32)
print(rank1.config.activation_format.value, rank1.placement.local_to_global.tolist(), tuple(rank1.w13.shape))

# %% [markdown]
# ## Key layouts
#
# Which tensor is which lives in one table, keyed by `model_type` (`LAYOUTS` in `11b_layouts`); `layout_table`
# renders it. Per-expert lists and transformers 5's fused tensors are both read: which one a checkpoint holds is
# detected from its keys. gpt-oss's fused tensors are transposed (`[E, H, 2·I]`) with gate and up columns
# interleaved, Llama-4's are transposed with gate columns then up columns; both are turned into moe-lit's
# `w13 [E, 2·I, H]` (gate rows, then up rows) at load.

# %%
#| export
def layout_table() -> str:
    """The key layout of every model family moe-lit reads, as a markdown table (from `moe_lit.layouts.LAYOUTS`). Takes
    no argument and raises nothing."""
    rows = []
    for t, l in LAYOUTS.items():
        experts = (f"fused `gate_up_proj`/`down_proj`{' (transposed)' if l.fused_transposed else ''}"
                   f"{', gate/up interleaved' if l.interleaved else ''}" +
                   ("; or per expert `experts.{e}.` " + "/".join(f"`{p}`" for p in l.per_expert) if l.per_expert else ""))
        rows.append({"model_type": f"`{t}`", "layer prefix": " or ".join(f"`{p}`" for p in l.prefixes),
                     "router": f"`{l.router}`" + (f" + `{l.router_bias}`" if l.router_bias else ""),
                     "correction bias": f"`{l.correction_bias}`" if l.correction_bias else "—", "experts": experts,
                     "shared": (f"`{l.shared}*`" if l.shared else "—") + (f" + `{l.shared_gate}`" if l.shared_gate else "")})
    return markdown_table(rows)

# %%
Markdown(layout_table())

# %% [markdown]
# ## Parity with transformers, family by family
#
# For every family moe-lit knows, a seeded tiny model is built and saved by transformers, the MoE layer is loaded
# with `from_pretrained`, and moe-lit's output is compared with the transformers block's on the same rows, in float32
# and float64. The expert ids must be exactly transformers' (captured from the block's experts call); the test checks
# that the routing has no near-tie that could make a one-ulp difference choose another expert. The biases and
# correction biases of the tiny models are randomised (`tiny_hf_model`), so a dropped bias fails, and gpt-oss's
# `swiglu_limit` is small so its clamps are exercised.

# %%
#| export
def hf_topk(block, x: torch.Tensor) -> torch.Tensor:
    """`topk_ids [T, top_k]` a transformers MoE block routes `x [T, H]` to (from its experts call, or its router).
    Checks nothing: a `block` without `experts` raises AttributeError, a misshaped `x` whatever the block raises.
    Source: moe-lit's own probe of transformers 5's MoE blocks (the `top_k_index` their experts module is called with;
    Llama-4's dense router scores)."""
    seen = {}
    def grab(module, args, kwargs):
        a = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
        if len(a) >= 2: seen["ids"] = a[1]
    h = block.experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(): block(x[None])
    finally: h.remove()
    if "ids" in seen: return seen["ids"].reshape(len(x), -1)
    with torch.no_grad(): scores = block.router(x)[0]             # Llama-4: dense [T, E] scores, -inf off the top-k
    return scores.topk(block.top_k, dim=-1).indices

# %%
#| export
def parity(model, checkpoint_dir, layer_index: int, x: torch.Tensor, **layer_kwargs) -> dict:
    """moe-lit's layer from `checkpoint_dir` against `model`'s block on `x [T, H]`: `{ids_equal, max_rel_err, min_gap}`.
    Checks nothing of its own: a `model` without decoder layers raises AttributeError, and `FusedMoE.from_pretrained`'s
    ValueErrors (naming `checkpoint_dir`, `layer_index`, ...) pass through."""
    block = hf_moe_block(model, layer_index)
    layer = FusedMoE.from_pretrained(checkpoint_dir, layer_index, dtype=x.dtype, **layer_kwargs)
    want, got = hf_moe_output(block, x), layer(x)
    ids = layer.route(x)[1]
    same = torch.equal(ids.long().sort(-1).values, hf_topk(block, x).long().sort(-1).values)
    return {"ids_equal": same, "max_rel_err": ((got - want).abs().max() / want.abs().max()).item(),
            "min_gap": selection_gap(layer, x)}

def selection_gap(layer: FusedMoE, x: torch.Tensor) -> float:
    """Smallest gap, over tokens, between the last chosen and the first unchosen expert's selection score (fp64); inf
    when top_k = E. ValueError naming `layer` (not a FusedMoE) or `x` (not `[T >= 1, hidden_size]` float). Source: moe-lit's own (ungrouped scores: a bound
    for grouped routers)."""
    if not isinstance(layer, FusedMoE): raise ValueError(f"layer: expected a FusedMoE, got {type(layer).__name__}")
    c = layer.config
    check_tensor("x", x, shape=(None, c.hidden_size), dtype=FLOAT_DTYPES)
    if not x.shape[0]: raise ValueError("x: expected at least one token, got 0")
    logits = router_logits(x.double(), layer.gate, layer.gate_bias)
    scores = logits if c.routing_method == "llama4" else logits.softmax(-1) if c.scoring_func == "softmax" else logits.sigmoid()
    if layer.e_score_correction_bias is not None: scores = scores + layer.e_score_correction_bias.double()
    if c.top_k == c.num_experts: return float("inf")
    top = scores.topk(c.top_k + 1, dim=-1).values                      # ungrouped: a bound for grouped routers too
    return (top[:, -2] - top[:, -1]).min().item()

# %%
#| test parity_every_family
families = [t for t in TINY_HF]
for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-6)):   # router weights are fp32 by contract
    for t in families:
        model = tiny_hf_model(t, seed=1, dtype=dtype)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, max_shard_size="100KB")
            x = torch.randn(16, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))
            for i in moe_layer_indices(d):
                r = parity(model, d, i, x)
                assert r["min_gap"] > 1e-6, (t, r)                  # no near-tie: a rounding cannot pick another expert
                assert r["ids_equal"] and r["max_rel_err"] <= tol, (t, dtype, i, r)
small = FusedMoE(MoEConfig(4, 2, 8, 6, dtype=torch.float32))
test_fail(lambda: selection_gap(small, torch.randn(3, 9)), contains="x: expected shape [*, 8]")
test_fail(lambda: selection_gap(small, torch.randn(0, 8)), contains="x: expected at least one token, got 0")
test_fail(lambda: selection_gap("layer", torch.randn(3, 8)), contains="layer: expected a FusedMoE, got str")

# %% [markdown]
# Which layers are MoE is transformers' rule too (`11b_layouts`): with each family's interleaving keys set so that some
# layers are dense, the MoE layers moe-lit lists are those transformers builds — including a DeepSeek config with
# `moe_layer_freq: 2`, which transformers does not read (DeepSeek's Hub code would make layers 1 and 3 dense).

# %%
#| test moe_layers_as_transformers_builds_them
interleave = {"deepseek_v2": dict(first_k_dense_replace=1, moe_layer_freq=2), "qwen3_moe": dict(decoder_sparse_step=2),
              "deepseek_v3": dict(first_k_dense_replace=1, moe_layer_freq=2), "qwen3_next": dict(decoder_sparse_step=2),
              "qwen2_moe": dict(decoder_sparse_step=2, mlp_only_layers=[3]), "llama4_text": dict(moe_layers=[1, 2])}
for t in TINY_HF:
    model = tiny_hf_model(t, num_hidden_layers=4, **interleave.get(t, {}))
    built = [i for i in range(4) if hasattr(hf_moe_block(model, i), "experts")]
    assert t not in interleave or len(built) < 4, (t, built)        # the keys did make some layer dense
    test_eq(moe_layer_indices(json.loads(model.config.to_json_string())), built)

# %% [markdown]
# Routing keys a family's code does not read (`02_models`) leave transformers' block unchanged, and moe-lit's too:
# each file below carries one, with a value that would change the routing if it were read.

# %%
#| test parity_ignores_keys_the_family_does_not_read
stray = [("mixtral", dict(routed_scaling_factor=2.5)), ("mixtral", dict(scoring_func="sigmoid")),
         ("qwen3_moe", dict(n_group=2, topk_group=1, topk_method="group_limited_greedy")),
         ("qwen3_moe", dict(routed_scaling_factor=2.0)), ("gpt_oss", dict(routed_scaling_factor=2.0)),
         ("deepseek_v3", dict(topk_method="greedy")), ("deepseek_v3", dict(scoring_func="softmax")),
         ("deepseek_v2", dict(scoring_func="sigmoid")), ("deepseek_v2", dict(norm_topk_prob=True)),
         ("minimax_m2", dict(use_routing_bias=False)), ("minimax_m2", dict(scoring_func="softmax"))]
x = torch.randn(16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
for t, keys in stray:
    model = tiny_hf_model(t, seed=1, dtype=torch.float64, **keys)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="100KB")
        assert all(json.loads((Path(d) / "config.json").read_text()).get(k) == v for k, v in keys.items()), (t, keys)
        r = parity(model, d, moe_layer_indices(d)[0], x)
        assert r["ids_equal"] and r["max_rel_err"] <= 1e-6, (t, keys, r)

# %% [markdown]
# The same layers split over expert-parallel ranks: each rank reads only its experts from the checkpoint, and the
# ranks add up to the transformers block, in both activation formats.

# %%
#| test parity_expert_parallel
for t in ("deepseek_v3", "gpt_oss", "qwen2_moe", "llama4_text"):
    model = tiny_hf_model(t, seed=3, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="100KB")
        x = torch.randn(12, 32, dtype=torch.float64)
        want = hf_moe_output(hf_moe_block(model, 1), x)
        for backend in ("allgather_reducescatter", "nixl_ep"):
            par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
            src = CheckpointWeights(d, 1, parallel=par, dtype=torch.float64)
            run = run_emulated_ep(src.config, x, weights=src)
            assert_close(run.output, want, rtol=1e-6, name=f"{t} {backend}")   # fp32 router weights

# %% [markdown]
# ## Pre-quantized checkpoints
#
# A checkpoint whose `config.json` declares FP8 block (`quant_method: fp8`, DeepSeek-V3) or MXFP4 (`mxfp4`, gpt-oss)
# weights loads its codes as they are stored: `from_pretrained` takes the checkpoint's scheme as the layer's `quant`,
# the layer's `qweights` are the stored bytes (no dequantize → requantize round trip; FP4 bytes re-laid for the
# kernels, `relayout("plain")` gives the checkpoint's back exactly), and the float weights kept for the references
# are their dequantization. Asking for `quant="unquantized"` runs the dequantized floats instead.

# %%
#| test prequantized_checkpoints_load_codes_as_stored
x = torch.randn(6, 320).bfloat16()
with tempfile.TemporaryDirectory() as d:
    stored = write_fp8_block_checkpoint(d)
    for experts in ("torch", "triton"):
        layer = FusedMoE.from_pretrained(d, 1, experts=experts, device=DEVICE)
        test_eq((layer.quant, layer.experts), ("fp8_w8a8_block", {"torch": "torch", "triton": "triton_quant"}[experts]))
        for f in ("w13", "w2"):
            assert torch.equal(getattr(layer.qweights, f).cpu().view(torch.uint8), getattr(stored["experts"], f).view(torch.uint8))
            assert torch.equal(getattr(layer.qweights, f + "_scale").cpu(), getattr(stored["experts"], f + "_scale"))
        topk = layer.route(x.to(DEVICE))
        ref = moe_reference_standard(x.double(), layer.w13.cpu(), layer.w2.cpu(), topk[0].cpu(), topk[1].cpu())
        ref += layer.shared_experts(x.double().to(DEVICE)).cpu()              # fp64 in: computed in fp64
        assert check_output(layer(x.to(DEVICE), topk), ref, torch.bfloat16, layer.quant, layer.experts)["ok"], experts
x = torch.randn(6, 96).bfloat16()
with tempfile.TemporaryDirectory() as d:
    stored = write_mxfp4_checkpoint(d, swiglu_limit=0.5)
    for experts in ("torch", "triton"):                          # gpt-oss's experts in the FP4 kernels too
        layer = FusedMoE.from_pretrained(d, 0, experts=experts, device=DEVICE)
        test_eq((layer.quant, layer.config.activation, layer.config.swiglu_limit), ("mxfp4_w4a16", "swigluoai", 0.5))
        test_eq(layer.qweights.fp4_layout, FP4_KERNEL_LAYOUT)
        for f in ("w13", "w13_scale", "w2", "w2_scale"):
            assert torch.equal(getattr(layer.qweights.relayout("plain"), f).cpu(), getattr(stored["experts"], f))
        assert torch.equal(layer.w13_bias.cpu(), stored["w13_bias"])
        topk = layer.route(x.to(DEVICE))
        ref = moe_reference_standard(x.double(), layer.w13.cpu(), layer.w2.cpu(), topk[0].cpu(), topk[1].cpu(),
                                     w13_bias=layer.w13_bias.cpu(), w2_bias=layer.w2_bias.cpu(),
                                     activation=Activation("swigluoai", limit=0.5))
        assert check_output(layer(x.to(DEVICE), topk), ref, torch.bfloat16, layer.quant, layer.experts)["ok"], experts
    test_eq(FusedMoE.from_pretrained(d, 0, quant="unquantized").qweights, None)

# %% [markdown]
# Bad input names the argument: a directory without `config.json`, a dense layer, a layer past the model's end.

# %%
#| test from_pretrained_bad_input
model = tiny_hf_model("deepseek_v3")
with tempfile.TemporaryDirectory() as d:
    test_fail(lambda: FusedMoE.from_pretrained(d, 1), contains="checkpoint_dir")
    model.save_pretrained(d)
    test_fail(lambda: FusedMoE.from_pretrained(d, 0), contains="layer_index")       # DeepSeek's first layer is dense
    test_fail(lambda: FusedMoE.from_pretrained(d, 7), contains="layer_index")
    test_eq(FusedMoE.from_pretrained(d, 1, experts="torch").experts, "torch")
    test_fail(lambda: FusedMoE.from_pretrained(d, 1, expert="torch"),          # a typo: named before the load
              contains="expert: expected one of the FusedMoE keywords ['placement', 'seed', 'experts'")
    test_fail(lambda: FusedMoE.from_pretrained(d, 1, weights={}), contains="weights: expected none with from_pretrained")
    with torch.no_grad(): model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")   # global expert 2
    model.save_pretrained(d)
    test_fail(lambda: FusedMoE.from_pretrained(d, 1), contains="(index 0 is the expert: global expert 2; from checkpoint")

# %% [markdown]
# ## Inside transformers
#
# The other direction — transformers routes, moe-lit runs the experts — is `moe_lit.integrations.transformers`
# (`12b_integrations.transformers`): after `register()`, `AutoModelForCausalLM.from_pretrained(path,
# experts_implementation="moe_lit")` runs the experts of every MoE layer that transformers sends through its experts
# interface — every family above except Llama-4, whose experts transformers computes without that interface (so
# there the name is accepted and changes nothing; `12b` says how to check a model).
#
# ## What is not modelled
#
# Every family in the table above is modelled exactly by `FusedMoE`; inside transformers, Llama-4's experts are not
# reached (above). Qwen3-Next's whole model does not run on a CPU in
# transformers (its linear-attention cache), so its parity is checked on the MoE block only, which is all moe-lit
# computes. A `config.json` key that would change the experts' math and that moe-lit does not model — a `hidden_act`
# other than SiLU outside gpt-oss, an unknown `topk_method` or `scoring_func` — is an error, never dropped.
