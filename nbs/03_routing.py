# %%
#| default_exp routing

# %% [markdown]
# # Routing
# > Which experts each token goes to and with what weight: softmax, sigmoid and grouped top-k, the correction bias, renormalisation and scaling, selected in float32 with deterministic ties.

# %%
#| export
from __future__ import annotations
import warnings
import torch
from moe_lit.terms import check_int, check_choice, check_tensor, check_bool, check_positive_real, check_finite, FLOAT_DTYPES
from moe_lit.config import MoEConfig, SCORING_FUNCS, SIZE_LIMIT

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
from moe_lit.testing import assert_close
import numpy as np

# %% [markdown]
# In this notebook: the deterministic selection primitive `stable_topk`; the routers `fused_topk` (softmax or sigmoid
# top-k, optionally with a correction bias), `grouped_topk` (DeepSeek's group-limited top-k, with
# `ungroupable_reason` and `RoutingFallbackWarning` for experts that cannot be grouped) and `llama4_topk`; the
# dispatcher `select_experts`, which reads a `MoEConfig`; and `expert_load` with `plot_expert_load`, which count and
# draw how many slots each expert receives. An **explanation** page with the reference of each symbol: every rule
# below exists because some implementation got it wrong, and the bug is named next to the rule.
#
# ## The contract
#
# A router turns `gating_output [num_tokens, num_experts]` (the router logits, any float dtype) into
# `topk_weights [num_tokens, top_k]` float32 and `topk_ids [num_tokens, top_k]` int32. Every router in this module
# keeps these rules:
#
# 1. **Selection happens in float32.** The logits are upcast before the softmax or sigmoid, and the bias is added
#    in float32. Adding a correction bias of magnitude ~1 to scores near 0.5 in bfloat16 rounds different experts
#    to the same value and picks different groups and experts (FlagGems #4245, #4610).
# 2. **Ties go to the lower expert id**, and for group selection to the lower group id. `torch.topk` does not
#    promise which of two equal values comes first, and CUDA kernels have broken ties differently from the
#    reference (vLLM #55514, #52679, #54403). The result is bitwise identical on every call.
# 3. **Output is sorted by the selection score, descending** (the biased score when there is a bias).
# 4. **A token whose scores contain a NaN is routed to the experts `0, 1, …, top_k-1` with weight 0**, and the
#    other tokens are unaffected. vLLM crashed or produced out-of-range ids on NaN router logits (vLLM #39391,
#    SGLang #30079). A zero weight means the token contributes nothing, while the ids stay distinct and in range
#    so every later table (alignment, dispatch) stays valid. The rule covers **infinite logits under softmax**: a
#    row with a `+inf` logit normalises `inf / inf`, and a row of only `-inf` logits `0 / 0`, both NaN, so such a
#    token gets weight 0 like a NaN one. moe-lit does not give a `+inf` expert the whole weight: an infinite logit is
#    an overflowed hidden state, no more trustworthy than a NaN. Sigmoid maps `±inf` to the numbers 1 and 0, so
#    under sigmoid (and in `llama4_topk`) such a token is routed normally; `-inf` logits among finite ones are
#    valid under both and are simply chosen last.
# 5. **With a correction bias, experts are selected on `score + bias` and weighted by `score`**, recomputed from
#    the logits and gathered at the selected ids, never `(score + bias) - bias` (flashinfer #3875, where the
#    weights collapsed to zero; vLLM-metax #270, where biased weights leaked out).
# 6. **`renormalize` divides by the sum of the `top_k` weights, then `routed_scaling_factor` multiplies.** With
#    `top_k = 1` the renormalised weight is exactly 1.0 (megablocks #87 normalised across tokens instead).
#    moe-lit applies the factor in every router that takes it; vLLM's `FusedTopKRouter` ignores it, so a model
#    that sets it and routes with plain top-k gets different weights here than in vLLM.
# 7. **Every expert id is a candidate**, however large `num_experts` is (kekzl/imp #2056 never looked past 255).
#
# ## Deterministic top-k
#
# All selections in this module, of experts and of groups, go through one primitive.
#
# > **Why a stable sort.** A stable descending sort keeps equal values in index order, so the first `top_k` entries
# > are the largest values with ties resolved to the lower index, with no epsilon added to the scores (which would
# > change weights and could reorder near-ties). It costs `O(E log E)` per token instead of `O(E)`, which does not
# > matter for a reference router at `E ≤ 512`. NaN is ranked as `-inf`, below every number.

# %%
#| export

def stable_topk(values: torch.Tensor,  # [num_tokens, n] float, scores to select from
                top_k: int,            # entries kept per row, 1 <= top_k <= n
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` largest entries of each row, descending, ties to the lower index, NaN as -inf: `(values [T, top_k]
    values' dtype, ids [T, top_k] int64)`. ValueError naming `values` (not 2-D float) or `top_k` (not in [1, n]).
    Source: the tie and NaN rules of vLLM #55514 (ties to the lower id) and #39391 (NaN logits)."""
    check_tensor("values", values, ndim=2, dtype=FLOAT_DTYPES)   # an int tensor cannot hold the -inf NaN becomes
    check_int("top_k", top_k, lo=1, hi=values.shape[1] + 1)
    clean = values.masked_fill(values.isnan(), float("-inf"))
    vals, ids = torch.sort(clean, dim=-1, descending=True, stable=True)   # stable: equal values keep index order
    return vals[:, :top_k], ids[:, :top_k]

# %%
#| test stable_topk_ties
v = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, float("nan"), 3.0],
                  [float("nan")] * 7])
vals, ids = stable_topk(v, 3)
test_eq(ids.tolist(), [[1, 2, 4], [0, 1, 2]])           # ties -> lower index; an all-NaN row -> 0, 1, 2
test_eq(vals[0].tolist(), [3.0, 3.0, 3.0])
test_eq(stable_topk(v, 7)[1][0].tolist(), [1, 2, 4, 6, 0, 3, 5])   # NaN ranks last
test_eq(stable_topk(torch.zeros(2, 300), 4)[1].tolist(), [[0, 1, 2, 3]] * 2)
test_fail(lambda: stable_topk(v, 8), contains="top_k: expected <= 7, got 8")
test_fail(lambda: stable_topk(v[0], 2), contains="values: expected a 2-D tensor")
test_fail(lambda: stable_topk(torch.ones(2, 3, dtype=torch.int32), 1), contains="values: expected dtype torch.float64 or torch.float32 or torch.float16 or torch.bfloat16, got torch.int32")

# %% [markdown]
# ## Argument checks shared by the routers
#
# The routers validate the same arguments. The checks are private; the messages are the package's
# `<argument>: expected <x>, got <y>`, and the bad-input tests below document them. `renormalize` must be a Python
# bool and `routed_scaling_factor` a finite number > 0: the checks `MoEConfig` applies to the same fields.

# %%
#| export
def _check_logits(gating_output) -> torch.Tensor:
    "Validate router logits `[num_tokens, num_experts]` of a float dtype, with at least one expert."
    check_tensor("gating_output", gating_output, ndim=2, dtype=FLOAT_DTYPES)
    if gating_output.shape[1] < 1: raise ValueError(f"gating_output: expected >= 1 expert column, got shape "
                                                    f"{list(gating_output.shape)}")
    return gating_output

def _check_bias(bias, num_experts: int, device, validate: bool = True) -> torch.Tensor | None:
    "Check the correction bias `[num_experts]` (finite floats when `validate`: a sync); returns it fp32 on `device`, or None."
    if bias is None: return None
    check_tensor("e_score_correction_bias", bias, shape=(num_experts,), dtype=FLOAT_DTYPES)
    if check_bool("validate", validate): check_finite("e_score_correction_bias", bias)
    return bias.to(device=device, dtype=torch.float32)

# %% [markdown]
# ## Scores and weights
#
# Two private steps are shared by `fused_topk` and `grouped_topk`: turning logits into float32 scores (and finding
# the tokens whose scores are not numbers), and turning the gathered scores into final weights.
#
# > A token is *invalid* when any of its scores is NaN: a NaN logit, or a softmax over a `+inf` or all-`-inf`
# > row (rule 4). A single NaN logit poisons the whole softmax row anyway; treating the sigmoid case the same way
# > gives one rule for both scoring functions instead of routing a half-broken hidden state to its finite experts.

# %%
#| export
def _router_scores(gating_output: torch.Tensor, scoring_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    "float32 scores `[num_tokens, num_experts]` and the invalid-token mask `[num_tokens]` (a NaN score in the row)."
    logits = gating_output.float()                     # upcast first: all selection is float32 (FlagGems #4245)
    scores = logits.softmax(-1) if scoring_func == "softmax" else logits.sigmoid()
    return scores, scores.isnan().any(-1)

def _finish_weights(weights: torch.Tensor, invalid: torch.Tensor, renormalize: bool, scale: float) -> torch.Tensor:
    "Zero invalid tokens, renormalise each row by its sum, then multiply by `scale` (vLLM's order)."
    weights = weights.masked_fill(invalid[:, None], 0.0)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / total, weights)   # an all-zero row stays 0, never 0/0 = NaN
    return weights * scale

# %% [markdown]
# ## Plain top-k: `fused_topk`
#
# Score every expert (softmax over the row, or an independent sigmoid per expert), pick the `top_k` best, weight
# them by their scores. With `e_score_correction_bias` (DeepSeek-V3's auxiliary-loss-free balancing, vLLM's
# `fused_topk_bias`) the bias only decides *which* experts are picked: it is a load-balancing device, not part of
# the expert's weight. This is vLLM's `fused_topk` and `fused_topk_bias` in one function; unlike vLLM's
# `FusedTopKRouter`, `routed_scaling_factor` is applied here too (rule 6).

# %%
#| export
def fused_topk(gating_output: torch.Tensor,   # [num_tokens, num_experts] any float dtype, router logits
               top_k: int,                    # experts per token
               renormalize: bool,             # divide the top_k weights by their sum
               scoring_func: str = "softmax", # 'softmax' over the row or 'sigmoid' per expert
               e_score_correction_bias: torch.Tensor | None = None,  # [num_experts] float, added for selection only
               routed_scaling_factor: float = 1.0,  # multiplies the weights after renormalising
               validate: bool = True,         # check the bias is finite (one sync; off for a bias checked by its owner)
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing (vLLM's `fused_topk` / `fused_topk_bias`): (topk_weights [T, top_k] fp32, topk_ids [T, top_k]
    int32). ValueError naming `gating_output`, `top_k`, `renormalize`, `scoring_func`, `e_score_correction_bias` (not
    `[num_experts]` float, or not finite when `validate`), `validate` or `routed_scaling_factor`."""
    _check_logits(gating_output)
    num_experts = gating_output.shape[1]
    check_int("top_k", top_k, lo=1, hi=num_experts + 1)
    check_bool("renormalize", renormalize)
    check_choice("scoring_func", scoring_func, SCORING_FUNCS)
    bias = _check_bias(e_score_correction_bias, num_experts, gating_output.device, validate)
    scale = check_positive_real("routed_scaling_factor", routed_scaling_factor, fp32=True)
    scores, invalid = _router_scores(gating_output, scoring_func)
    choice = scores if bias is None else scores + bias           # select on the biased score ...
    choice = choice.masked_fill(invalid[:, None], float("-inf"))  # invalid tokens: all tie -> experts 0..top_k-1
    _, ids = stable_topk(choice, top_k)
    weights = scores.gather(1, ids)                               # ... weight by the unbiased one (flashinfer #3875)
    return _finish_weights(weights, invalid, renormalize, scale), ids.to(torch.int32)

# %%
#| test fused_topk_matches_float64
torch.manual_seed(0)
logits = torch.randn(16, 32)
for scoring in ("softmax", "sigmoid"):
    w, ids = fused_topk(logits, 4, renormalize=True, scoring_func=scoring)
    test_eq((w.dtype, ids.dtype, tuple(w.shape), tuple(ids.shape)), (torch.float32, torch.int32, (16, 4), (16, 4)))
    s64 = logits.double().softmax(-1) if scoring == "softmax" else logits.double().sigmoid()
    ref_w, ref_ids = s64.sort(-1, descending=True)
    test_eq(ids.long(), ref_ids[:, :4])
    assert_close(w, ref_w[:, :4] / ref_w[:, :4].sum(-1, keepdim=True))
    assert (w[:, :-1] >= w[:, 1:]).all()                                   # sorted by score, descending
w, ids = fused_topk(logits, 4, renormalize=False)
assert_close(w, logits.double().softmax(-1).sort(-1, descending=True).values[:, :4])
test_eq(fused_topk(torch.empty(0, 8), 2, True)[1].shape, (0, 2))          # zero tokens

# %% [markdown]
# ### The right values, one test each
#
# **Selection in float32** (FlagGems #4245). Scores near 0.5 plus a bias of 8: in bfloat16 every `score + bias`
# rounds to 8.5 and the experts become indistinguishable; in float32 they keep their order.

# %%
#| test fp32_selection
torch.manual_seed(1)
logits = (torch.randn(8, 32) * 0.01).to(torch.bfloat16)
bias = torch.full((32,), 8.0, dtype=torch.bfloat16)
w, ids = fused_topk(logits, 4, True, "sigmoid", e_score_correction_bias=bias)
ref = logits.double().sigmoid()
test_eq(ids.long(), stable_topk(ref, 4)[1])                                 # order of the unbiased scores survives
assert len(torch.unique((ref + 8.0).to(torch.bfloat16))) < 4                # what bf16 arithmetic would have seen
test_eq(w.dtype, torch.float32)
test_eq(fused_topk(logits, 4, True)[1], fused_topk(logits.float(), 4, True)[1])   # bf16 input == its fp32 upcast

# %% [markdown]
# **Ties go to the lower expert id** (vLLM #55514), and the output stays sorted descending.

# %%
#| test ties_lower_expert_id
test_eq(fused_topk(torch.zeros(3, 16), 4, True)[1].tolist(), [[0, 1, 2, 3]] * 3)
logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
for scoring in ("softmax", "sigmoid"):
    w, ids = fused_topk(logits, 4, True, scoring)
    test_eq(ids.tolist(), [[1, 2, 4, 5]])
    test_eq(w[0, 0].item(), w[0, 1].item())
    assert (w[:, :-1] >= w[:, 1:]).all()
bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0])                           # biased order: 5 first, then ties
test_eq(fused_topk(logits, 3, True, "sigmoid", e_score_correction_bias=bias)[1].tolist(), [[5, 1, 2]])

# %% [markdown]
# **NaN router logits** (vLLM #39391): the poisoned token gets experts `0 … top_k-1` with weight 0; the other tokens
# get exactly what they would get alone.

# %%
#| test nan_rows
torch.manual_seed(2)
logits = torch.randn(3, 16)
logits[0] = float("nan")                  # a whole row of NaN (NaN hidden state)
logits[2, 5] = float("nan")               # a single NaN logit poisons its token too
for scoring in ("softmax", "sigmoid"):
    w, ids = fused_topk(logits, 8, True, scoring, e_score_correction_bias=torch.randn(16))
    for t in (0, 2):
        test_eq(ids[t].tolist(), list(range(8)))          # distinct, in range, lowest ids
        test_eq(w[t].tolist(), [0.0] * 8)                 # finite: zero, not NaN
    w1, ids1 = fused_topk(logits[1:2], 8, True, scoring, e_score_correction_bias=torch.zeros(16))
    w1b, ids1b = fused_topk(logits, 8, True, scoring, e_score_correction_bias=torch.zeros(16))
    assert torch.equal(ids1b[1:2], ids1)                                  # the clean row is unaffected:
    test_close(w1b[1:2], w1, eps=1e-6)   # same ids; weights to fp32 rounding (batched CPU kernels may reorder sums)

# %% [markdown]
# **Every logit negative, with renormalize** (vLLM #37605, #38859): softmax is monotone, so the ids are those of the
# softmax top-k and the weights still sum to 1.

# %%
#| test all_negative_logits
torch.manual_seed(3)
logits = -10.0 - 5.0 * torch.rand(8, 64)
w, ids = fused_topk(logits, 8, True)
test_eq(ids.long(), stable_topk(logits.double().softmax(-1), 8)[1])
test_close(w.sum(-1), torch.ones(8), eps=1e-6)
assert (w > 0).all()

# %% [markdown]
# **Sigmoid with a correction bias of -5 everywhere** (flashinfer #3875, vLLM #31478): the biased scores are all
# below -4, which breaks kernels that start a running max at -1 or that return `score + bias` (or subtract the bias
# back out, losing everything to cancellation). The ids are those of the sigmoid scores; the weights are sigmoid
# of the selected logits, renormalised: about `1/top_k` each, all positive.

# %%
#| test sigmoid_bias_weights_unbiased
torch.manual_seed(4)
logits = 0.1 * torch.randn(8, 16)
w, ids = fused_topk(logits, 2, True, "sigmoid", e_score_correction_bias=torch.full((16,), -5.0))
test_eq(ids.long(), stable_topk(logits.double().sigmoid(), 2)[1])
s = logits.double().sigmoid().gather(1, ids.long())
assert_close(w, s / s.sum(-1, keepdim=True))                                # recomputed from the logits
assert (w > 0).all() and ((w - 0.5).abs() < 0.05).all()

# %% [markdown]
# **`top_k = 1` renormalises to exactly 1.0** (megablocks #87), and **the scale comes after the renormalisation**
# (vLLM's order).

# %%
#| test top_k_one_and_scaling
torch.manual_seed(5)
logits = torch.randn(4, 4)
for scoring in ("softmax", "sigmoid"):
    test_eq(fused_topk(logits, 1, True, scoring)[0].tolist(), [[1.0]] * 4)
    w = fused_topk(logits, 3, True, scoring, routed_scaling_factor=2.5)[0]
    test_close(w.sum(-1), torch.full((4,), 2.5), eps=1e-6)
    w0 = fused_topk(logits, 3, False, scoring)[0]
    test_close(fused_topk(logits, 3, False, scoring, routed_scaling_factor=2.5)[0], 2.5 * w0, eps=1e-6)

# %% [markdown]
# **Experts with ids ≥ 256 are candidates** (kekzl/imp #2056): with 300 experts, the ids equal torch's float32
# top-k, and the best experts, placed above 256, are found.

# %%
#| test experts_beyond_256
torch.manual_seed(6)
logits = torch.randn(8, 300)
logits[:, 260:] += 10.0                                                    # the winners all live above id 255
w, ids = fused_topk(logits, 8, True)
test_eq(ids.long(), torch.topk(logits.float().softmax(-1), 8).indices)
assert (ids >= 260).all()

# %% [markdown]
# ## Grouped top-k
#
# DeepSeek-V2/V3 split the `num_experts` experts into `num_expert_group` equal groups of consecutive ids (typically
# one group per node) and let each token use at most `topk_group` groups, which bounds how many nodes a token's
# activations travel to. vLLM's `grouped_topk`:
#
# 1. score every expert (softmax or sigmoid, float32); with a bias, `choice = score + bias`, else `choice = score`;
# 2. score every group: the **sum of its two best `choice` values** when there is a bias, its **max** otherwise;
# 3. keep the `topk_group` best groups (ties to the lower group id);
# 4. pick the `top_k` best `choice` values among the experts of the kept groups (ties to the lower expert id);
# 5. weight each by its **unbiased** score, renormalise if asked, then multiply by `routed_scaling_factor`.
#
# > vLLM masks the experts of dropped groups to `-inf` and runs top-k over all experts. moe-lit instead gathers the
# > experts of the kept groups, with the groups in ascending id order, so the candidate ids are ascending and the
# > stable sort breaks ties to the lower id. A masked expert can then never be picked, even when a kept expert's
# > score is itself `-inf`.

# %%
#| export
def _kept_group_experts(choice: torch.Tensor, num_expert_group: int, topk_group: int, top2: bool) -> torch.Tensor:
    "Expert ids `[num_tokens, topk_group * group_size]` int64 of each token's kept groups, ascending."
    num_tokens, num_experts = choice.shape
    size = num_experts // num_expert_group
    grouped = choice.reshape(num_tokens, num_expert_group, size)
    if top2: group_score = grouped.topk(2, dim=-1).values.sum(-1)   # values only: tie order cannot change a sum
    else: group_score = grouped.amax(-1)
    _, kept = stable_topk(group_score, topk_group)                   # ties -> lower group id (vLLM #55514)
    kept = kept.sort(-1).values                                      # ascending groups -> ascending expert ids
    offsets = torch.arange(size, device=choice.device)
    return (kept[:, :, None] * size + offsets).flatten(1)

# %% [markdown]
# ### When the experts cannot be grouped
#
# Groups must have equal size, so `num_experts % num_expert_group == 0`; with a bias a group is scored by its two
# best experts, so it needs at least two. vLLM's `GroupedTopKRouter` falls back *silently* to plain top-k when
# `num_experts <= num_expert_group` or the division leaves a remainder, after an earlier version crashed with
# "selected index k out of range" on DeepSeek-V3's 8-expert, 8-group test model (vLLM #29439, #30422).
#
# moe-lit makes the same fallback — plain top-k with the bias and the scale, which is what one expert per group
# amounts to — but says so: `grouped_topk` emits a `RoutingFallbackWarning` naming the reason, and
# `ungroupable_reason` returns that reason so a report can show it without calling the router. Turn the warning
# into an error with `warnings.simplefilter("error", RoutingFallbackWarning)`.
#
# > Without a bias, one expert per group is a valid grouping (each group's max is its expert), so it is not a
# > fallback here, whereas vLLM falls back for it too. Both give the plain top-k whenever `top_k <= topk_group`;
# > for `top_k > topk_group` moe-lit raises instead of ignoring `topk_group`.

# %%
#| export
class RoutingFallbackWarning(UserWarning):
    """A router used a simpler routing method than the one asked for; the message names both and the reason. Raises
    nothing itself: `warn_grouped_fallback` issues it (`warnings.simplefilter("error", RoutingFallbackWarning)` makes
    it an error). Source: moe-lit's own (vLLM's `GroupedTopKRouter` falls back silently)."""

# %%
#| test fallback_warning_class
assert issubclass(RoutingFallbackWarning, UserWarning)
with warnings.catch_warnings():
    warnings.simplefilter("error", RoutingFallbackWarning)
    test_fail(lambda: warnings.warn("x", RoutingFallbackWarning), contains="x")

# %%
#| export
def ungroupable_reason(num_experts: int,       # experts to split into groups
                       num_expert_group: int,  # groups asked for
                       has_bias: bool,         # a correction bias is present (groups are scored by their top 2)
                       ) -> str | None:
    """Why `num_experts` cannot be split into `num_expert_group` groups for grouped top-k, or None when it can.
    ValueError naming `num_experts` or `num_expert_group` (not an int >= 1); `has_bias` is read as a truth value.
    Source: moe-lit's own (where vLLM's `GroupedTopKRouter` falls back silently, e.g. E % groups != 0)."""
    check_int("num_experts", num_experts, lo=1)
    check_int("num_expert_group", num_expert_group, lo=1)
    if num_experts % num_expert_group:
        return f"num_experts={num_experts} is not divisible by num_expert_group={num_expert_group}"
    if has_bias and num_experts // num_expert_group < 2:
        return (f"num_expert_group={num_expert_group} leaves {num_experts // num_expert_group} expert per group, and "
                f"with a correction bias a group is scored by the sum of its top 2 experts")
    return None

# %%
#| test ungroupable_reason
test_eq(ungroupable_reason(256, 8, True), None)                              # DeepSeek-V3
test_eq(ungroupable_reason(8, 8, False), None)                               # one expert per group, no bias: valid
assert "top 2" in ungroupable_reason(8, 8, True)                             # DeepSeek-V3 MTP test model
assert "not divisible" in ungroupable_reason(10, 4, True)
assert "not divisible" in ungroupable_reason(4, 8, False)                    # more groups than experts
test_fail(lambda: ungroupable_reason(8, 0, True), contains="num_expert_group: expected >= 1")

# %% [markdown]
# ### `grouped_topk`

# %%
#| export
def warn_grouped_fallback(reason: str,     # ungroupable_reason(...)'s answer
                          stacklevel: int = 3):   # the caller of the router that falls back
    """Say (a `RoutingFallbackWarning`) that grouped top-k routes as plain top-k: the torch router per call, the Triton
    router's plan once. Raises only if the warning filter makes the warning an error. Source: moe-lit's own."""
    warnings.warn(f"grouped_topk: falling back to fused_topk: {reason}", RoutingFallbackWarning, stacklevel=stacklevel)

# %%
#| export
def grouped_topk(gating_output: torch.Tensor,   # [num_tokens, num_experts] any float dtype, router logits
                 top_k: int, renormalize: bool,  # experts per token; divide the top_k weights by their sum
                 num_expert_group: int,          # groups of consecutive expert ids (equal sizes)
                 topk_group: int,                # groups kept per token, <= num_expert_group
                 scoring_func: str = "softmax",  # 'softmax' over the row or 'sigmoid' per expert
                 routed_scaling_factor: float = 1.0,   # multiplies the weights after renormalising
                 e_score_correction_bias: torch.Tensor | None = None,  # [num_experts] float, selection only
                 validate: bool = True,          # check the bias is finite (one sync)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k (DeepSeek-V2/V3, vLLM's `grouped_topk`): (topk_weights fp32, topk_ids int32), [T, top_k].
    ValueError naming the argument as `fused_topk` does, or `num_expert_group`, `topk_group` (not in [1, groups]) or
    `top_k` (above topk_group * experts per group); experts that do not split warn (`RoutingFallbackWarning`) and
    route as `fused_topk`."""
    _check_logits(gating_output)
    num_experts = gating_output.shape[1]
    check_int("num_expert_group", num_expert_group, lo=1)
    check_int("topk_group", topk_group, lo=1, hi=num_expert_group + 1)
    check_int("top_k", top_k, lo=1, hi=num_experts + 1)
    check_bool("renormalize", renormalize)
    check_choice("scoring_func", scoring_func, SCORING_FUNCS)
    bias = _check_bias(e_score_correction_bias, num_experts, gating_output.device, validate)
    scale = check_positive_real("routed_scaling_factor", routed_scaling_factor, fp32=True)
    reason = ungroupable_reason(num_experts, num_expert_group, bias is not None)
    if reason is not None:                                        # vLLM falls back silently; moe-lit says so
        warn_grouped_fallback(reason)
        return fused_topk(gating_output, top_k, renormalize, scoring_func, e_score_correction_bias, scale, validate)
    most = topk_group * (num_experts // num_expert_group)          # experts in the kept groups
    if top_k > most: raise ValueError(f"top_k: expected <= topk_group * experts per group = {most}, got {top_k}")
    scores, invalid = _router_scores(gating_output, scoring_func)
    choice = (scores if bias is None else scores + bias).masked_fill(invalid[:, None], float("-inf"))
    candidates = _kept_group_experts(choice, num_expert_group, topk_group, top2=bias is not None)
    _, pos = stable_topk(choice.gather(1, candidates), top_k)
    ids = candidates.gather(1, pos)
    return _finish_weights(scores.gather(1, ids), invalid, renormalize, scale), ids.to(torch.int32)

# %% [markdown]
# The reference below is written for clarity: a float64 loop over tokens and groups, with ties broken by sorting
# on `(-value, id)`. It is the specification `grouped_topk` is checked against, on random inputs of both scoring
# functions, with and without a bias — and on FlagGems' case (#4245): bfloat16 logits and bias, 8 groups of 8,
# keep 2, top-8, seed 0, where bfloat16 group scores chose different groups.

# %%
#| test grouped_topk_matches_float64_loop
def reference(logits, top_k, renorm, n_group, topk_group, scoring, scale, bias):
    s = logits.double().softmax(-1) if scoring == "softmax" else logits.double().sigmoid()
    choice = s if bias is None else s + bias.double()
    size = logits.shape[1] // n_group
    ws, ids = [], []
    for t in range(logits.shape[0]):
        c = choice[t].tolist()
        gscore = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) if bias is not None
                  else max(c[g * size:(g + 1) * size]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        cand = [e for g in kept for e in range(g * size, (g + 1) * size)]
        chosen = sorted(cand, key=lambda e: (-c[e], e))[:top_k]
        w = s[t, chosen]
        ws.append((w / w.sum() if renorm else w) * scale); ids.append(chosen)
    return torch.stack(ws), torch.tensor(ids)

torch.manual_seed(0)
cases = [(torch.randn(32, 64).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16), 8, 2, 8, 1.0),  # FlagGems
         (torch.randn(16, 64), None, 4, 2, 6, 1.0),              # softmax/sigmoid without bias, 4 groups (aiter #2153)
         (torch.randn(16, 32), torch.randn(32), 4, 3, 5, 2.5)]
for logits, bias, n_group, topk_group, top_k, scale in cases:
    for scoring in ("softmax", "sigmoid"):
        for renorm in (True, False):
            w, ids = grouped_topk(logits, top_k, renorm, n_group, topk_group, scoring, scale, bias)
            ref_w, ref_ids = reference(logits, top_k, renorm, n_group, topk_group, scoring, scale, bias)
            test_eq(ids.long(), ref_ids)
            assert_close(w, ref_w)

# %% [markdown]
# Ties among groups go to the lower group id, ties among experts to the lower expert id; a NaN token gets
# experts `0 … top_k-1` with weight 0, as in plain top-k.

# %%
#| test grouped_topk_ties_and_nan
test_eq(grouped_topk(torch.zeros(2, 16), 4, True, 4, 2)[1].tolist(), [[0, 1, 2, 3]] * 2)
logits = torch.zeros(1, 16)
logits[0, [5, 9, 13]] = 1.0                                 # groups 1, 2, 3 tie for the best group score
w, ids = grouped_topk(logits, 3, True, 4, 2)
test_eq(ids.tolist(), [[5, 9, 4]])                          # groups 1 and 2 kept; expert 4 wins its tie with 6, 7, 8
bias = torch.zeros(16)
logits = torch.randn(3, 16); logits[1] = float("nan")
w, ids = grouped_topk(logits, 4, True, 4, 2, "sigmoid", 1.0, bias)
test_eq(ids[1].tolist(), [0, 1, 2, 3]); test_eq(w[1].tolist(), [0.0] * 4)
w0, ids0 = grouped_topk(logits[[0]], 4, True, 4, 2, "sigmoid", 1.0, bias)
assert torch.equal(ids[[0]], ids0) and torch.equal(w[[0]], w0)
test_eq(grouped_topk(torch.randn(4, 16), 1, True, 4, 2, "sigmoid", 1.0, bias)[0].tolist(), [[1.0]] * 4)   # top_k=1
w = grouped_topk(torch.randn(4, 16), 4, True, 4, 2, "sigmoid", 2.5, bias)[0]
test_close(w.sum(-1), torch.full((4,), 2.5), eps=1e-6)                       # renormalise, then scale

# %% [markdown]
# **Bitwise-identical results over repeated calls** (vLLM #52679): the same input gives the same bits, ties
# included.

# %%
#| test repeated_calls_bitwise
torch.manual_seed(7)
logits = torch.randn(32, 64).to(torch.bfloat16)          # bf16 rows hold exact ties
bias = torch.randn(64)
first = grouped_topk(logits, 8, True, 8, 2, "sigmoid", 2.5, bias)
for _ in range(20):
    again = grouped_topk(logits, 8, True, 8, 2, "sigmoid", 2.5, bias)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert torch.equal(fused_topk(logits, 8, True)[1], fused_topk(logits, 8, True)[1])

# %% [markdown]
# The fallback is loud, and gives plain top-k with the bias and the scale.

# %%
#| test grouped_topk_fallback
torch.manual_seed(8)
logits, bias = torch.randn(4, 8), torch.randn(8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w, ids = grouped_topk(logits, 2, True, 8, 1, "sigmoid", 2.5, bias)      # 8 experts, 8 groups (vLLM #29439)
test_eq([type(c.message) for c in caught], [RoutingFallbackWarning])
assert "falling back to fused_topk" in str(caught[0].message) and "top 2" in str(caught[0].message)
w2, ids2 = fused_topk(logits, 2, True, "sigmoid", bias, 2.5)
assert torch.equal(w, w2) and torch.equal(ids, ids2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    grouped_topk(torch.randn(4, 10), 2, True, 4, 2)                           # 10 experts do not split into 4
assert "not divisible" in str(caught[0].message)

# %% [markdown]
# ## Llama-4: top-1 on the raw logit
#
# Llama-4 picks the best logit and weights it by `sigmoid(logit)`, with no softmax and no renormalisation (vLLM's
# `Llama4MoE.custom_routing_function`, routing method `Llama4`); the model scales the input by the weight
# (`apply_router_weight_on_input`), which is why the weight must not be renormalised to 1. A NaN token gets expert
# 0 with weight 0.

# %%
#| export
def llama4_topk(gating_output: torch.Tensor,  # [num_tokens, num_experts] any float dtype, router logits
                top_k: int = 1,               # experts per token (Llama-4 uses 1)
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-4 routing: top-k of the raw logits, weight sigmoid(logit), not renormalised: (fp32 weights, int32 ids),
    each [T, top_k]. ValueError naming `gating_output` (not 2-D float with >= 1 column) or `top_k`. Source: vLLM's
    Llama-4 custom routing function (vllm/model_executor/models/llama4.py)."""
    _check_logits(gating_output)
    check_int("top_k", top_k, lo=1, hi=gating_output.shape[1] + 1)
    logits = gating_output.float()
    invalid = logits.isnan().any(-1)
    _, ids = stable_topk(logits.masked_fill(invalid[:, None], float("-inf")), top_k)
    weights = logits.gather(1, ids).sigmoid().masked_fill(invalid[:, None], 0.0)
    return weights, ids.to(torch.int32)

# %%
#| test llama4_topk
logits = torch.tensor([[0.5, 2.0, -1.0, 2.0], [-3.0, -4.0, -2.0, -5.0], [float("nan")] * 4])
w, ids = llama4_topk(logits.to(torch.bfloat16))
test_eq(ids.tolist(), [[1], [2], [0]])                       # tie (1 vs 3) -> lower id; NaN token -> expert 0
test_close(w[:2, 0], torch.tensor([2.0, -2.0]).sigmoid(), eps=1e-6)   # sigmoid of the logit, not renormalised
test_eq(w[2].tolist(), [0.0])
test_eq((w.dtype, ids.dtype), (torch.float32, torch.int32))
test_fail(lambda: llama4_topk(logits, 5), contains="top_k: expected <= 4")

# %% [markdown]
# **Infinite logits**, in every router (rule 4): under softmax a `+inf` logit, or a row of `-inf` only, makes the
# token invalid — ids `0 … top_k-1`, weight 0 — exactly as a NaN does; under sigmoid (and in `llama4_topk`) `+inf`
# scores 1 and the token is routed normally. `-inf` logits among finite ones are valid and chosen last.

# %%
#| test infinite_logits
inf = float("inf")
logits = torch.tensor([[inf, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0], [-inf] * 4, [-inf, -inf, 0.0, 1.0]])
w, ids = fused_topk(logits, 2, True)                                           # softmax
test_eq((ids[[0, 2]].tolist(), w[[0, 2]].tolist()), ([[0, 1]] * 2, [[0.0, 0.0]] * 2))   # invalid, like NaN
assert torch.equal(ids[[1]], fused_topk(logits[[1]], 2, True)[1])             # the other tokens are unaffected
test_eq(ids[3].tolist(), [3, 2]); test_close(w[3].sum(), 1.0, eps=1e-6)        # -inf among finite: valid
w, ids = grouped_topk(logits, 2, True, 2, 1)                                   # grouped softmax: the same rule
test_eq((ids[0].tolist(), w[0].tolist()), ([0, 1], [0.0, 0.0]))
w, ids = fused_topk(logits, 2, False, "sigmoid")                               # sigmoid: +inf scores 1.0
test_eq((ids[0].tolist(), w[0, 0].item()), ([0, 3], 1.0))
test_eq(w[2].tolist(), [0.0, 0.0]); assert torch.isfinite(fused_topk(logits, 2, True, "sigmoid")[0]).all()
test_eq(llama4_topk(logits[[0]]), (torch.tensor([[1.0]]), torch.tensor([[0]], dtype=torch.int32)))

# %% [markdown]
# ## Bad input
#
# Every router names the argument it rejects.

# %%
#| test routers_bad_input
g = torch.randn(4, 64)
test_fail(lambda: fused_topk(g[0], 2, True), contains="gating_output: expected a 2-D tensor")
test_fail(lambda: fused_topk(g.long(), 2, True), contains="gating_output: expected dtype")
test_fail(lambda: fused_topk(g, 65, True), contains="top_k: expected <= 64, got 65")
test_fail(lambda: fused_topk(g, 0, True), contains="top_k: expected >= 1, got 0")
test_fail(lambda: fused_topk(g, 2, True, "relu"), contains="scoring_func: expected one of")
for flag in ("yes", 1, np.bool_(True), torch.tensor([True, False]), None):   # only a Python bool
    test_fail(lambda: fused_topk(g, 2, flag), contains="renormalize: expected a bool, got")
    test_fail(lambda: grouped_topk(g, 2, flag, 8, 2), contains="renormalize: expected a bool, got")
test_fail(lambda: fused_topk(g, 2, True, e_score_correction_bias=torch.zeros(63)),
          contains="e_score_correction_bias: expected shape [64], got [63]")
test_fail(lambda: fused_topk(g, 2, True, e_score_correction_bias=torch.full((64,), float("nan"))),
          contains="e_score_correction_bias: expected finite values")
for x in (0.0, float("nan"), float("inf"), "2", True, 10**400):
    test_fail(lambda: fused_topk(g, 2, True, routed_scaling_factor=x),
              contains="routed_scaling_factor: expected a finite number > 0")
test_fail(lambda: grouped_topk(g, 2, True, 8, 9), contains="topk_group: expected <= 8, got 9")
test_fail(lambda: grouped_topk(g, 2, True, 0, 1), contains="num_expert_group: expected >= 1, got 0")
test_fail(lambda: grouped_topk(g, 2, True, 8, 0), contains="topk_group: expected >= 1, got 0")
test_fail(lambda: grouped_topk(g, 17, True, 8, 2), contains="top_k: expected <= topk_group * experts per group = 16")
test_fail(lambda: grouped_topk(g, 2, True, 8, 2, "relu"), contains="scoring_func: expected one of")
test_fail(lambda: grouped_topk(g, 2, True, 8, 2, e_score_correction_bias=torch.zeros(8)),
          contains="e_score_correction_bias: expected shape [64]")
test_fail(lambda: llama4_topk(g.int()), contains="gating_output: expected dtype")

# %% [markdown]
# ## From a config: `select_experts`
#
# The layer does not pick a router by hand: `select_experts` reads `MoEConfig.routing_method` and passes the
# config's options. The correction bias is a weight of the model, so it comes as an argument, and it must agree
# with `config.has_correction_bias` in both directions: a missing bias would silently route DeepSeek-V3 without its
# load balancing, and an unexpected one would silently change a model that has none.
#
# > `llama4` takes neither `renormalize` nor `scoring_func` from the config: the routing method fixes them (sigmoid
# > of the raw logit, never renormalised), as vLLM's Llama-4 routing function ignores its `renormalize` argument.
# > A `routed_scaling_factor` other than 1 or a correction bias with `llama4` is refused by `MoEConfig` when the
# > config is made, rather than dropped here.
# > The ids are int32; casting them to the dtype a dispatch wants (`config.topk_indices_dtype`) is the prepare
# > step's job.

# %%
#| export
def select_experts(config: MoEConfig,             # the layer: routing_method and its options, num_experts, top_k
                   gating_output: torch.Tensor,   # [num_tokens, num_experts] any float dtype, router logits
                   e_score_correction_bias: torch.Tensor | None = None,  # [num_experts] float, iff config says so
                   validate: bool = True,   # check the bias is finite (one sync; the layer checks its own once)
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Route with the router `config.routing_method` names: (topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32).
    `gating_output [T, num_experts]` any float dtype. ValueError naming `config`, `gating_output` or
    `e_score_correction_bias` (given iff `config.has_correction_bias`, `[num_experts]`, finite when `validate`); a
    grouped method that cannot group warns (`RoutingFallbackWarning`). Source: vLLM's `FusedMoE.select_experts` and its
    routers (fused_moe/router/)."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    check_tensor("gating_output", gating_output, shape=(None, config.num_experts))
    bias = e_score_correction_bias
    if config.has_correction_bias and bias is None:
        raise ValueError("e_score_correction_bias: expected a [num_experts] tensor (config.has_correction_bias is "
                         "True), got None")
    if not config.has_correction_bias and bias is not None:
        raise ValueError("e_score_correction_bias: expected None (config.has_correction_bias is False), got a tensor")
    c = config
    if c.routing_method == "llama4": return llama4_topk(gating_output, c.top_k)   # MoEConfig: no bias, no scale
    if c.routing_method == "grouped_topk":
        return grouped_topk(gating_output, c.top_k, c.renormalize, c.num_expert_group, c.topk_group,
                            c.scoring_func, c.routed_scaling_factor, bias, validate)
    return fused_topk(gating_output, c.top_k, c.renormalize, c.scoring_func, bias, c.routed_scaling_factor, validate)

# %%
#| test select_experts_dispatch
torch.manual_seed(9)
g, bias = torch.randn(6, 256), torch.randn(256)
dsv3 = MoEConfig(256, 8, 64, 32, routing_method="grouped_topk", scoring_func="sigmoid", num_expert_group=8,
                 topk_group=4, routed_scaling_factor=2.5, has_correction_bias=True)
w, ids = select_experts(dsv3, g, bias)
w2, ids2 = grouped_topk(g, 8, True, 8, 4, "sigmoid", 2.5, bias)
assert torch.equal(w, w2) and torch.equal(ids, ids2)
assert all(len(set((row // 32).tolist())) <= 4 for row in ids)         # at most topk_group=4 groups per token
qwen = MoEConfig(128, 8, 64, 32)
assert torch.equal(select_experts(qwen, g[:, :128])[1], fused_topk(g[:, :128], 8, True)[1])
llama = MoEConfig(16, 1, 64, 32, routing_method="llama4", scoring_func="sigmoid", renormalize=False)
assert torch.equal(select_experts(llama, g[:, :16])[0], llama4_topk(g[:, :16])[0])

# %%
#| test select_experts_bad_input
g = torch.randn(4, 16)
cfg = MoEConfig(16, 2, 64, 32, has_correction_bias=True, scoring_func="sigmoid")
test_fail(lambda: select_experts(cfg, g), contains="e_score_correction_bias: expected a [num_experts] tensor")
test_fail(lambda: select_experts(cfg.replace(has_correction_bias=False), g, torch.zeros(16)),
          contains="e_score_correction_bias: expected None")
test_fail(lambda: select_experts(cfg, g, torch.zeros(15)), contains="e_score_correction_bias: expected shape [16]")
test_fail(lambda: select_experts(cfg, g[:, :8], torch.zeros(16)), contains="gating_output: expected shape [*, 16]")
test_fail(lambda: select_experts("cfg", g), contains="config: expected a MoEConfig")
test_fail(lambda: select_experts(MoEConfig(16, 1, 64, 32, routing_method="llama4", scoring_func="sigmoid", renormalize=False, routed_scaling_factor=2.0), g),
          contains="routed_scaling_factor: expected 1.0")                    # refused by the config itself

# %% [markdown]
# ## The router GEMM
#
# The logits are `hidden · gateᵀ` in fp32 on every rank (so every rank agrees on `topk_ids`), plus the router's own
# bias where the model has one (gpt-oss's router is a `Linear` with a bias). Unlike the correction bias, that bias
# moves the logits themselves, so it changes the weights as well as the choice. One function computes them for the
# layer, the distributed run and the references.

# %% [markdown]
# `matmul_acc` is the one dense product outside the expert kernels (router logits, shared experts): `a @ bᵀ` with
# fp32 products and an fp32 result. On a GPU with bf16/fp16 operands of one dtype that is a single cuBLAS call writing
# fp32 (`torch.mm(..., out_dtype=torch.float32)`): bf16 × bf16 products are exact in fp32, so the result is the upcast
# product's up to summation order, without the upcast copies and at half the weight bytes. Anywhere else the operands
# are upcast.

# %%
#| export
def _mm_out_dtype_ok() -> bool:
    "Whether this torch has `torch.mm(..., out_dtype=torch.float32)` for bf16 on CUDA (asked once, on first use)."
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is None:
        try:
            x = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
            _MM_OUT_DTYPE = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError): _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE

_MM_OUT_DTYPE = None

def matmul_acc(a: torch.Tensor,   # [M, K] float
               b: torch.Tensor,   # [N, K] float (a weight stored as rows, like nn.Linear)
              ) -> torch.Tensor:  # [M, N] in the accumulation dtype: fp32 (fp64 when either is fp64)
    """`a @ bᵀ` with fp32 products and result: one cuBLAS call writing fp32 for same-dtype bf16/fp16 on a GPU, else
    upcast. ValueError naming `a` (not 2-D float) or `b` (not `[N, K]` float, or on another device). Source: moe-lit's
    own (torch's `torch.mm(..., out_dtype=torch.float32)` where this torch has it)."""
    check_tensor("a", a, ndim=2, dtype=FLOAT_DTYPES); check_tensor("b", b, shape=(None, a.shape[1]), dtype=FLOAT_DTYPES)
    if b.device != a.device:              # torch would multiply a CPU tensor by a meta one into uninitialised memory
        raise ValueError(f"b: expected a tensor on a's device {a.device}, got {b.device}")
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and _mm_out_dtype_ok():
        return torch.mm(a, b.T, out_dtype=torch.float32)
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(acc) @ b.to(acc).T

# %%
#| test matmul_acc
a, b = torch.randn(5, 8).bfloat16(), torch.randn(3, 8).bfloat16()
got = matmul_acc(a, b)
test_eq(got.dtype, torch.float32)
assert_close(got, a.double() @ b.double().T, rtol=1e-6)        # bf16 products are exact in fp32
test_eq(matmul_acc(a.double(), b).dtype, torch.float64)
test_fail(lambda: matmul_acc(a, b[:, :7]), contains="b: expected shape [*, 8], got [3, 7]")
test_fail(lambda: matmul_acc(a, b.to("meta")), contains="b: expected a tensor on a's device cpu, got meta")

# %%
#| export
def router_logits(hidden: torch.Tensor,                 # [num_tokens, hidden_size] any float dtype
                  gate: torch.Tensor,                   # [num_experts, hidden_size] router weight
                  gate_bias: torch.Tensor | None = None,  # [num_experts] router bias (gpt-oss), or None
                 ) -> torch.Tensor:                     # [num_tokens, num_experts] fp32 (fp64 for fp64 hidden)
    """Router logits `hidden · gateᵀ (+ gate_bias)` in fp32 (fp64 for fp64 inputs, for the references); ValueError
    naming a misshaped or misplaced argument. Source: the router `nn.Linear` of transformers' MoE blocks (the bias is
    gpt-oss's `GptOssTopKRouter`)."""
    check_tensor("hidden", hidden, ndim=2, dtype=FLOAT_DTYPES)
    check_tensor("gate", gate, shape=(None, hidden.shape[1]), dtype=FLOAT_DTYPES)
    if gate_bias is not None: check_tensor("gate_bias", gate_bias, shape=(gate.shape[0],), dtype=FLOAT_DTYPES)
    for n, t in (("gate", gate), ("gate_bias", gate_bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{n}: expected a tensor on hidden's device {hidden.device}, got {t.device}")
    logits = matmul_acc(hidden, gate)
    return logits if gate_bias is None else logits + gate_bias.to(logits.dtype)

# %%
#| test router_logits
h, g, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
test_eq(router_logits(h.bfloat16(), g).dtype, torch.float32)
assert torch.allclose(router_logits(h, g, b), h @ g.T + b)
test_eq(router_logits(h.double(), g).dtype, torch.float64)
test_fail(lambda: router_logits(h[:1], g, b[:, None]), contains="gate_bias: expected a 1-D tensor, got shape (5, 1)")  # not [1, 5]: [5, 5]
test_fail(lambda: router_logits(h, g, 0.5), contains="gate_bias: expected a torch.Tensor")
test_fail(lambda: router_logits(h, g.to("meta")), contains="gate: expected a tensor on hidden's device cpu, got meta")
test_fail(lambda: router_logits(h, g, b.to("meta")), contains="gate_bias: expected a tensor on hidden's device cpu, got meta")

# %% [markdown]
# `MoEConfig` accepts a grouped config exactly when `grouped_topk` can route it — directly, or through the fallback
# to plain top-k for experts that do not split into groups — so `select_experts` never fails on a config the
# library made.

# %%
#| test config_accepts_what_grouped_topk_runs
torch.manual_seed(10)
g = torch.randn(2, 12)
for E in (8, 12):
    for G in (2, 3, 4, 8):
        for topk_group in (1, 2):
            for top_k in (1, 4, 8):
                for has_bias in (False, True):
                    kw = dict(routing_method="grouped_topk", num_expert_group=G, topk_group=topk_group,
                              scoring_func="sigmoid", has_correction_bias=has_bias)
                    try: MoEConfig(E, top_k, 16, 16, **kw); accepted = True
                    except ValueError: accepted = False
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RoutingFallbackWarning)
                        try: grouped_topk(g[:, :E], top_k, True, G, topk_group, "sigmoid", 1.0,
                                          torch.zeros(E) if has_bias else None); runs = True
                        except ValueError: runs = False
                    test_eq((E, G, topk_group, top_k, has_bias, accepted), (E, G, topk_group, top_k, has_bias, runs))

# %% [markdown]
# ## Per-expert load
#
# How many `(token, slot)` pairs each expert receives decides how long its GEMM runs and, under EP, how much each
# rank receives. `expert_load` counts them; `-1` ids (slots routed to a non-local expert, after `expert_map`) are
# not counted, and any other id outside `[0, num_experts)` is an error rather than a wrapped-around count.

# %%
#| export
def expert_load(topk_ids: torch.Tensor,  # [num_tokens, top_k] int32/int64, expert id per slot (-1 = not routed here)
                num_experts: int,        # length of the result
                ) -> torch.Tensor:
    """Slots routed to each expert: `[num_experts]` int64 counts, `-1` ids ignored. ValueError naming `num_experts`
    (not an int in [1, 2**31)) or `topk_ids` (not 2-D int32/int64, or an id outside [-1, num_experts); one sync).
    Source: moe-lit's own (`torch.bincount`)."""
    check_int("num_experts", num_experts, lo=1, hi=SIZE_LIMIT)   # ids are int32: no larger count is meaningful
    check_tensor("topk_ids", topk_ids, ndim=2, dtype=(torch.int32, torch.int64))
    ids = topk_ids.flatten().long()
    ids = ids[ids != -1]
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"topk_ids: expected ids in [-1, {num_experts}), got values in "
                         f"[{ids.min().item()}, {ids.max().item()}]")
    return torch.bincount(ids, minlength=num_experts)

# %%
#| test expert_load
ids = torch.tensor([[0, 3], [3, -1], [2, 3]], dtype=torch.int32)
test_eq(expert_load(ids, 5).tolist(), [1, 0, 1, 3, 0])
test_eq(expert_load(ids, 5).dtype, torch.int64)
test_eq(expert_load(torch.empty(0, 2, dtype=torch.int64), 3).tolist(), [0, 0, 0])
_, ids = fused_topk(torch.randn(64, 16), 4, True)
test_eq(expert_load(ids, 16).sum().item(), 64 * 4)          # counts sum to num_tokens * top_k
test_fail(lambda: expert_load(ids, 8), contains="topk_ids: expected ids in [-1, 8)")
test_fail(lambda: expert_load(ids.float(), 16), contains="topk_ids: expected dtype")
test_fail(lambda: expert_load(ids, 2**62), contains="num_experts: expected <= 2147483647, got 4611686018427387904")

# %% [markdown]
# Ids that come from somewhere else than a router — a caller's own `(topk_weights, topk_ids)`, or a transport's
# input — are checked once, with one host sync: every id in `[-1, num_experts)`, and no expert twice in a token
# (`-1` may repeat). The batched format sizes each expert's slab by that rule, so a repeated id could overflow it.

# %%
#| export
def check_topk_ids(topk_ids: torch.Tensor,   # [num_tokens, top_k] int32/int64, expert id per slot (-1 = none)
                   num_experts: int,         # ids must be < this (physical experts with EPLB)
                  ) -> torch.Tensor:         # topk_ids, unchanged
    """Ids in `[-1, num_experts)` and distinct per token (one host sync); ValueError naming `topk_ids` otherwise (or
    `num_experts`, not an int in [1, 2**31)). Source: moe-lit's own check of vLLM's `topk_ids` contract (-1 = not
    routed here)."""
    check_int("num_experts", num_experts, lo=1, hi=SIZE_LIMIT)
    ids = check_tensor("topk_ids", topk_ids, ndim=2, dtype=(torch.int32, torch.int64))
    if ids.is_meta: raise ValueError("topk_ids: expected a tensor with values (CPU or GPU), got one on the meta device")
    if ids.numel() and ((ids < -1) | (ids >= num_experts)).any():
        raise ValueError(f"topk_ids: expected ids in [-1, {num_experts}), got {int(ids.min())}..{int(ids.max())}")
    s = ids.sort(-1).values
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        t = int(dup.any(-1).nonzero()[0])
        raise ValueError(f"topk_ids: expected distinct ids per token (-1 may repeat), got {ids[t].tolist()} for token {t}")
    return topk_ids

# %%
#| test check_topk_ids
ok = torch.tensor([[0, 3], [3, -1], [-1, -1]], dtype=torch.int32)
test_eq(check_topk_ids(ok, 4), ok)
test_fail(lambda: check_topk_ids(ok, 3), contains="topk_ids: expected ids in [-1, 3), got -1..3")
test_fail(lambda: check_topk_ids(torch.tensor([[1, 2], [2, 2]]), 4),
          contains="topk_ids: expected distinct ids per token (-1 may repeat), got [2, 2] for token 1")
test_fail(lambda: check_topk_ids(ok.float(), 4), contains="topk_ids: expected dtype")
test_fail(lambda: check_topk_ids(ok.to("meta"), 4), contains="topk_ids: expected a tensor with values")

# %%
#| export
def plot_expert_load(counts: torch.Tensor,              # [num_experts] int or float, slots per expert
                     title: str = "slots per expert",   # axes title
                     ):
    """Bar chart of `counts` with the mean as a dashed line; returns the matplotlib Figure. ValueError naming `counts`
    when it is not a 1-D tensor; ImportError without matplotlib (it also selects matplotlib's Agg backend). Source:
    moe-lit's own."""
    check_tensor("counts", counts, ndim=1)
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = counts.detach().cpu().double()
    mean = c.mean().item() if c.numel() else 0.0
    peak = f", max/mean {c.max().item() / mean:.2f}" if mean > 0 else ""
    fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + 0.12 * len(c)), 3.0), layout="constrained")
    ax.bar(range(len(c)), c.numpy(), width=0.8, color="tab:blue")
    ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f}{peak}")
    ax.set(xlabel="expert id", ylabel="slots (token, k)", title=title)
    ax.set_ylim(0, 1.3 * max(c.max().item() if c.numel() else 0.0, 1.0))   # headroom for the legend
    ax.legend(loc="upper right")
    plt.close(fig)                     # the caller owns the figure; do not keep it in pyplot's registry
    return fig

# %%
#| test plot_expert_load
fig = plot_expert_load(torch.tensor([3, 0, 5, 4]), title="four experts")
ax = fig.axes[0]
test_eq(len(ax.patches), 4)
test_eq(ax.get_title(), "four experts")
test_close(float(ax.lines[0].get_ydata()[0]), 3.0)
test_fail(lambda: plot_expert_load(torch.zeros(2, 2)), contains="counts: expected a 1-D tensor")

# %% [markdown]
# 512 tokens routed to 8 of 64 experts by random logits: 4096 slots, 64 per expert on average. Even with
# independent random logits the busiest expert gets about 1.2 times the mean (seed 0 on the CPU); a trained
# router's skew is larger, and the busiest expert sets the time of the whole layer.

# %%
torch.manual_seed(0)
_, demo_ids = fused_topk(torch.randn(512, 64), 8, renormalize=True)
plot_expert_load(expert_load(demo_ids, 64), title="512 tokens, 64 experts, top_k=8, random logits")
