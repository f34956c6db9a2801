# %%
#| default_exp integrations.transformers

# %% [markdown]
# # transformers: moe-lit as an experts implementation
# > register() adds "moe_lit" to transformers' experts interface, so from_pretrained(path, experts_implementation="moe_lit") runs the experts of every MoE layer transformers dispatches through it; check_model says which.

# %%
#| export
from __future__ import annotations
import importlib, warnings, weakref
from dataclasses import dataclass
import torch
from transformers.integrations.moe import ExpertsInterface, ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.activations import SiLUActivation
from moe_lit.terms import check_tensor, check_bool, check_positive_real, acc_dtype, FLOAT_DTYPES, gradient_wanted
from moe_lit.formats import Activation, moe_reference_standard, gate_up_from_interleaved

# %%
#| hide
import tempfile, warnings
from unittest import mock
import transformers
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close, tiny_hf_model, hf_moe_block, TINY_HF
from moe_lit.integrations.transformers import _weight_key
from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

# %% [markdown]
# In this notebook: `register`, which makes `"moe_lit"` an experts implementation of transformers; the pieces it is
# made of — `convert_experts_weights` (transformers' weight layouts to moe-lit's), `experts_recipe` (which activation
# and layout a module needs, or a `ValueError`), `experts_weights` (the converted weights, cached per module) and
# `moe_lit_experts_forward` — and `experts_recipes`, the experts modules of a model it reaches. A **how-to** page
# with the reference of each symbol.
#
# ## Use
#
# ```python
# from transformers import AutoModelForCausalLM
# from moe_lit.integrations.transformers import register
#
# register()
# model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_lit")
# check_model(model)        # the MoE blocks moe-lit runs; a ValueError names any it cannot reach
# ```
#
# The same, run on a tiny model, is the cell under *Which modules it reaches*.
#
# > **What is reached.** `"moe_lit"` runs only the experts modules that transformers dispatches through its experts
# > interface (classes decorated with `@use_experts_implementation`). transformers accepts
# > `experts_implementation="moe_lit"` for *any* model and says nothing when a model's MoE blocks never dispatch:
# > **Llama-4** (`Llama4TextExperts`) is one, in transformers 5.17–5.25 — its experts keep running transformers' own
# > dense code. Call `check_model(model)` after loading: it raises a `ValueError` naming the class of every MoE block
# > `"moe_lit"` cannot reach (or cannot run), and returns the recipes of those it runs.
#
# `register()` comes first: transformers checks the name against its registry when the model is built.
# `AutoModelForCausalLM.from_config(config, experts_implementation="moe_lit")` and, on a model already loaded,
# `model.set_experts_implementation("moe_lit")` do the same. Everything else in the model (attention, router, shared
# experts, norms) stays transformers' own; only the routed experts change hands.
#
# ## What transformers hands over
#
# In transformers 5 (checked on 5.17, 5.24 and 5.25), an MoE model's routed experts are one module per layer holding every expert's weights as 3-D
# tensors, and the class is decorated with `@use_experts_implementation`
# ([`src/transformers/integrations/moe.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/integrations/moe.py);
# the [experts interface docs](https://huggingface.co/docs/transformers/main/en/experts_interface)). At every forward the
# decorated module looks up `config._experts_implementation` in the `ExpertsInterface` registry and calls the function
# found there as `fn(self, hidden_states, top_k_index, top_k_weights)`:
#
# - `hidden_states [num_tokens, hidden_size]`, the model's dtype; the router has already run;
# - `top_k_index [num_tokens, top_k]` int, the global expert of each slot; under transformers' expert parallelism an id
#   `>= num_experts` is a sentinel for an expert held by another rank, which must contribute 0;
# - `top_k_weights [num_tokens, top_k]`, the router weight of each slot, applied to the expert's output;
# - the result is `[num_tokens, hidden_size]` in `hidden_states`' dtype: `Σ_k w_k · expert_{id_k}(x)`.
#
# The weights and their description are attributes of `self`: `gate_up_proj`, `down_proj`, with `has_bias` the
# biases `gate_up_proj_bias` and `down_proj_bias`, and the layout flags `is_transposed` and `is_concatenated` (set by
# the decorator). Between the two GEMMs the module applies `self._apply_gate` to the `[.., 2·I]` projection: by
# default `act_fn(gate) · up` with the gate the first half; a model with another gated activation overrides the method
# (gpt-oss: its clamped SwiGLU with `self.alpha`, `self.limit`).
#
# moe-lit's experts take `w13 [E, 2·I, H]` (gate rows, then up rows), `w2 [E, H, I]`, optional `w13_bias [E, 2·I]`
# and `w2_bias [E, H]`, an `Activation`, fp32 `topk_weights` and ids in `[-1, E)` (`-1` contributes 0)
# (`moe_reference_standard` in `05_formats`; `TritonExperts` in `08_kernels.contiguous`). The adapter is the
# translation between the two.
#
# ## Layouts
#
# | layout (transformers) | families | `gate_up_proj` | `down_proj` | to moe-lit |
# |---|---|---|---|---|
# | concatenated | Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, DeepSeek-V2/V3, MiniMax-M2 | `[E, 2·I, H]` gate rows then up rows | `[E, H, I]` | the same tensors: no copy |
# | transposed | Llama-4 (not dispatched by transformers, see below) | `[E, H, 2·I]` gate columns then up columns | `[E, I, H]` | transpose both (a copy) |
# | transposed, interleaved, biased | gpt-oss | `[E, H, 2·I]`, gate at even columns, up at odd | `[E, I, H]` | transpose, de-interleave the columns and the bias (a copy) |

# %%
#| export
def convert_experts_weights(gate_up_proj: torch.Tensor,   # [E, 2·I, H]; [E, H, 2·I] when transposed
                            down_proj: torch.Tensor,      # [E, H, I]; [E, I, H] when transposed
                            gate_up_proj_bias: torch.Tensor | None = None,  # [E, 2·I], same order as the columns
                            down_proj_bias: torch.Tensor | None = None,     # [E, H]
                            transposed: bool = False,     # stored [E, in, out] (x @ W) instead of [E, out, in]
                            interleaved: bool = False,    # gate/up alternate along 2·I (gate even) instead of halves
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """moe-lit's `(w13 [E, 2·I, H] gate then up, w2 [E, H, I], w13_bias [E, 2·I], w2_bias [E, H])`; a matching layout is
    returned as is. ValueError naming `gate_up_proj` (not 3-D or floating point, an odd 2·I), `down_proj` (another
    dtype, device or shape), `gate_up_proj_bias`, `down_proj_bias` (shape, device, not floating point), `transposed` or
    `interleaved` (not bools). Source: transformers 5's experts layouts (`integrations/moe.py`, gpt-oss's interleaved
    and Llama-4's transposed tensors) turned into vLLM's `w13` / `w2` layout."""
    check_bool("interleaved", interleaved)
    w13, w2 = _checked_views(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias, transposed=transposed)
    b13 = gate_up_proj_bias
    if interleaved:                                                  # gate0 up0 gate1 up1 ... -> gate block, up block
        w13 = gate_up_from_interleaved(w13)
        b13 = None if b13 is None else gate_up_from_interleaved(b13)
    return w13.contiguous(), w2.contiguous(), b13, down_proj_bias   # .contiguous(): no copy when already contiguous

def _checked_views(gate_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None, transposed=False):
    "`convert_experts_weights`' checks, and its `(w13, w2)` as views (no copy): what `check_model` runs up front."
    check_tensor("gate_up_proj", gate_up_proj, ndim=3); check_tensor("down_proj", down_proj, ndim=3)
    check_bool("transposed", transposed)
    if not gate_up_proj.is_floating_point():
        raise ValueError(f"gate_up_proj: expected a floating-point dtype, got {gate_up_proj.dtype}")
    if down_proj.dtype != gate_up_proj.dtype:
        raise ValueError(f"down_proj: expected gate_up_proj's dtype {gate_up_proj.dtype}, got {down_proj.dtype}")
    for n, t in (("down_proj", down_proj), ("gate_up_proj_bias", gate_up_proj_bias), ("down_proj_bias", down_proj_bias)):
        if t is None: continue
        if n != "down_proj": check_tensor(n, t)
        if t.device != gate_up_proj.device:
            raise ValueError(f"{n}: expected gate_up_proj's device {gate_up_proj.device}, got {t.device}")
        if not t.is_floating_point(): raise ValueError(f"{n}: expected a floating-point dtype, got {t.dtype}")
    w13 = gate_up_proj.transpose(1, 2) if transposed else gate_up_proj
    w2 = down_proj.transpose(1, 2) if transposed else down_proj
    E, N, H = w13.shape
    if N % 2: raise ValueError(f"gate_up_proj: expected an even 2·intermediate_size, got shape {list(gate_up_proj.shape)}")
    check_tensor("down_proj (as [E, H, I])", w2, shape=(E, H, N // 2))
    if gate_up_proj_bias is not None: check_tensor("gate_up_proj_bias", gate_up_proj_bias, shape=(E, N))
    if down_proj_bias is not None: check_tensor("down_proj_bias", down_proj_bias, shape=(E, H))
    return w13, w2

# %% [markdown]
# A gpt-oss-style expert, written out: transposed and interleaved weights must give the same expert as the converted
# ones, and a concatenated, non-transposed layout comes back as the very same tensors (no copy).

# %%
#| test convert_layouts
torch.manual_seed(0)
E, H, I = 3, 8, 4
gate, up, down = (torch.randn(*shape, dtype=torch.float64) for shape in ((E, I, H), (E, I, H), (E, H, I)))
bg, bu = torch.randn(E, I, dtype=torch.float64), torch.randn(E, I, dtype=torch.float64)   # gate and up biases
inter = torch.stack([gate, up], dim=2).reshape(E, 2 * I, H)            # rows gate0, up0, gate1, up1, ...
w13, w2, b13, b2 = convert_experts_weights(inter.transpose(1, 2), down.transpose(1, 2),
                                           torch.stack([bg, bu], dim=2).reshape(E, 2 * I), None,
                                           transposed=True, interleaved=True)
test_eq(w13, torch.cat([gate, up], dim=1)); test_eq(w2, down)
test_eq(b13, torch.cat([bg, bu], dim=1)); test_eq(b2, None)
assert w13.is_contiguous() and w2.is_contiguous()
cat = torch.cat([gate, up], dim=1)
same = convert_experts_weights(cat, down)
assert same[0] is cat and same[1] is down                              # matching layout: the tensors themselves
test_fail(lambda: convert_experts_weights(cat, down.transpose(1, 2)), contains="down_proj (as [E, H, I]): expected")
test_fail(lambda: convert_experts_weights(cat[:, :-1], down), contains="expected an even 2·intermediate_size")
test_fail(lambda: convert_experts_weights(cat, down, torch.zeros(E, I)), contains="gate_up_proj_bias: expected shape")
test_fail(lambda: convert_experts_weights(cat.long(), down.long()), contains="gate_up_proj: expected a floating-point")
test_fail(lambda: convert_experts_weights(cat, down.float()), contains="down_proj: expected gate_up_proj's dtype")
test_fail(lambda: convert_experts_weights(cat, down, torch.zeros(E, 2 * I, dtype=torch.float64, device="meta")),
          contains="gate_up_proj_bias: expected gate_up_proj's device cpu, got meta")
test_fail(lambda: convert_experts_weights(cat, down, None, torch.zeros(E, H, dtype=torch.float64, device="meta")),
          contains="down_proj_bias: expected gate_up_proj's device")

# %% [markdown]
# ## Activations
#
# The gate is code, not a flag: transformers calls `self._apply_gate`, which a model may override. The adapter
# recognises a gate by the *function* the module's class uses, in a table of records, and maps it to moe-lit's
# `Activation`. A gate that is not in the table, an `act_fn` other than SiLU under the default gate, an ungated expert
# (`has_gate=False`) or a norm after each expert (`has_post_expert_norm`) raise a `ValueError` naming the module's
# class: the adapter never computes something other than what the model defines.

# %%
#| export
@dataclass(frozen=True)
class GateRule:
    """A transformers experts gate that moe-lit reproduces: where the function lives and what it computes. Raises
    nothing: a frozen record, not checked (a rule naming a missing function matches no module). Source: the gate
    functions of transformers' `integrations/moe.py` and `modeling_gpt_oss.py`."""
    module: str               # the transformers module that defines the function
    qualname: str             # the function's name in it (dotted for a method)
    activation: str           # moe-lit's Activation name
    interleaved: bool         # reads gate at even columns, up at odd (else gate half, then up half)
    silu_act_fn: bool = False # computes `act_fn(gate) · up`, so moe-lit needs `act_fn` to be SiLU
    params: tuple[str, ...] = ()  # module attributes passed as Activation(alpha=..., limit=...)

# %%
#| export
GATE_RULES = (
    GateRule(module="transformers.integrations.moe", qualname="_default_apply_gate", activation="silu",
             interleaved=False, silu_act_fn=True),
    GateRule(module="transformers.models.gpt_oss.modeling_gpt_oss", qualname="GptOssExperts._apply_gate",
             activation="swigluoai", interleaved=True, params=("alpha", "limit")),
)

# %% [markdown]
# Each rule names a function of the installed transformers; where one is missing, no module can match it.

# %%
#| export
def _resolve(rule: GateRule):
    "The function a rule names, or None where this transformers has no such module or name."
    try: obj = importlib.import_module(rule.module)
    except ImportError: return None
    for part in rule.qualname.split("."): obj = getattr(obj, part, None)
    return obj

def _is_silu(act_fn) -> bool:
    "transformers spells SiLU `SiLUActivation` ('silu') or `nn.SiLU` ('swish'): exactly these, as they are."
    # the exact type: a subclass may compute anything in its forward; and no hooks or instance `forward`, which would
    # change what `act_fn(gate)` returns without changing its type (moe-lit computes SiLU itself, skipping them all)
    return (type(act_fn) in (torch.nn.SiLU, SiLUActivation) and not act_fn._forward_hooks
            and not act_fn._forward_pre_hooks and "forward" not in vars(act_fn))

# %%
{r.qualname: _resolve(r) for r in GATE_RULES}

# %%
#| export
@dataclass(frozen=True)
class ExpertsRecipe:
    """What moe-lit runs for one transformers experts module. Raises nothing: a frozen record, not checked at
    construction; `experts_recipe` checks the module it describes. Source: the flags transformers'
    `@use_experts_implementation` sets on an experts module (`has_bias`, `is_transposed`, ...)."""
    activation: Activation    # the gated activation between the GEMMs
    transposed: bool          # the module stores [E, in, out] weights
    interleaved: bool         # the module's gate/up columns alternate
    has_bias: bool            # the module has gate_up_proj_bias and down_proj_bias

    def __repr__(self) -> str:
        "As the dataclass's, but a SiLU activation without the swigluoai-only `alpha` and `limit` it does not use."
        a = self.activation
        act = f"Activation({a.name!r})" if a.name == "silu" else repr(a)   # as formats' own repr, where it has one
        return (f"ExpertsRecipe(activation={act}, transposed={self.transposed}, interleaved={self.interleaved}, "
                f"has_bias={self.has_bias})")

# %%
#| export
_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "up_proj", "gate_proj", "w1", "w2", "w3")

def _check_unquantized(module: torch.nn.Module,  # an experts module
                       plain: bool = False,       # also refuse a tensor subclass (check_model: a torchao-style weight)
                      ):
    """ValueError naming the module's class when an expert weight (an attribute under one of `_EXPERT_WEIGHTS`' names)
    is not a tensor in a float dtype moe-lit computes in: the codes of a quantized checkpoint (FP8 `float8_e4m3fn`;
    MXFP4 packed in `uint8`, 3-D, in transformers 5.17 4-D, or, once its kernels have loaded them, a
    `triton_kernels` tensor that is no `torch.Tensor` at all) that transformers runs with its own experts classes,
    which `"moe_lit"` does not replace. With `plain`, a tensor subclass is refused too, even one that reports a float
    dtype."""
    for w in _EXPERT_WEIGHTS:
        t = getattr(module, w, None)
        if t is None or isinstance(t, torch.nn.Module): continue
        if not isinstance(t, torch.Tensor): got = f"a {type(t).__module__}.{type(t).__name__}, not a torch.Tensor"
        elif t.dtype not in FLOAT_DTYPES: got = str(t.dtype)
        elif plain and type(t) not in (torch.Tensor, torch.nn.Parameter): got = f"a tensor subclass {type(t).__name__}"
        else: continue
        raise ValueError(
            f"{type(module).__name__}: expert weight {w} is {got}; 'moe_lit' reads plain tensors in "
            f"{', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)}. A quantized checkpoint's experts run "
            f"with transformers' own code: load it dequantized (quantization_config=FineGrainedFP8Config("
            f"dequantize=True) or Mxfp4Config(dequantize=True); transformers needs accelerate for either), or run "
            f"its MoE layers with moe-lit, which keeps FP8-block and MXFP4 codes as stored: "
            f"FusedMoE.from_pretrained(checkpoint_dir, layer_index) or moe-lit run --weights CHECKPOINT_DIR")

def experts_recipe(module: torch.nn.Module) -> ExpertsRecipe:
    """The activation and layout moe-lit needs for a transformers experts module. ValueError naming the module's class
    when it cannot run it: quantized expert weights (not a tensor, or not in a float dtype: `_check_unquantized`), no `@use_experts_implementation` flags, ungated experts, a norm after each expert, a gate
    function none of `GATE_RULES` reproduces, an `act_fn` other than SiLU where the gate calls it, or flags that
    contradict the module (`is_concatenated`, `has_bias`; `alpha`/`limit` not positive). Source:
    transformers' experts interface (`integrations/moe.py`)."""
    name = type(module).__name__
    _check_unquantized(module)
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated")):
        raise ValueError(f"{name}: not a transformers experts module (no @use_experts_implementation flags)")
    if not module.has_gate: raise ValueError(f"{name}: ungated experts (has_gate=False) are not supported by moe_lit")
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"{name}: a norm after each expert (has_post_expert_norm) is not supported by moe_lit")
    fn = None if "_apply_gate" in vars(module) else getattr(type(module), "_apply_gate", None)
    rule = next((r for r in GATE_RULES if fn is not None and fn is _resolve(r)), None)
    if rule is None:
        raise ValueError(f"{name}: its _apply_gate ({getattr(fn, '__qualname__', fn)}) is not one moe_lit "
                         f"recognises; known: {', '.join(r.qualname for r in GATE_RULES)}")
    if rule.silu_act_fn and not _is_silu(getattr(module, "act_fn", None)):
        raise ValueError(f"{name}: act_fn {type(getattr(module, 'act_fn', None)).__name__} is not supported by "
                         f"moe_lit (the default gate needs exactly nn.SiLU or SiLUActivation, without hooks or a "
                         f"replaced forward)")
    if rule.interleaved == module.is_concatenated:
        raise ValueError(f"{name}: is_concatenated={module.is_concatenated} contradicts its gate {rule.qualname}")
    has_bias = module.has_bias
    if not isinstance(has_bias, bool): raise ValueError(f"{name}.has_bias: expected a bool, got {has_bias!r}")
    for b in ("gate_up_proj_bias", "down_proj_bias"):              # the flag must say what the parameters are
        present = getattr(module, b, None) is not None
        if present != has_bias:
            raise ValueError(f"{name}: has_bias={has_bias} contradicts its parameters: {b} is "
                             f"{'present' if present else 'missing or None'}")
    act = Activation(rule.activation, *(check_positive_real(f"{name}.{p}", getattr(module, p, None))
                                        for p in rule.params))
    return ExpertsRecipe(activation=act, transposed=check_bool(f"{name}.is_transposed", module.is_transposed),
                         interleaved=rule.interleaved,
                         has_bias=has_bias)

# %% [markdown]
# ## The converted weights, cached
#
# Converting a transposed or interleaved layout copies the weights, and doing it at every forward would cost a full
# read and write of the expert weights per layer per step. `experts_weights` keeps the converted tensors per module
# (a `weakref.WeakKeyDictionary`, so they go when the module goes) together with a key of the source parameters:
# `data_ptr()`, `_version` (bumped by every in-place write through the parameter: `copy_` in `load_state_dict`, an
# optimizer step), shape, strides, dtype and device. A changed key means new weights, and the entry is rebuilt. The
# entry also holds weak references to the source parameters and is used only while they are the module's parameters
# still: a parameter replaced by a new one is a miss even when the key matches, as it does when the allocator hands
# the old weights' freed block to the new ones (same address, and a fresh tensor's `_version` after one `normal_`
# equals the old one's). Weak, so the cache never keeps replaced weights alive.
#
# **Memory.** For those layouts the cache is a second copy of the expert weights, as large as the first: for
# gpt-oss-20b dequantized to bf16, 24 layers × 32 experts × 3·2880² parameters × 2 bytes ≈ 38 GB. Concatenated,
# non-transposed models (Mixtral, Qwen, DeepSeek, MiniMax) already have moe-lit's layout: the parameters are used as
# they are, nothing is copied and nothing is cached. `clear_cache()` frees the copies, e.g. after switching back to
# another implementation.
#
# Two cases bypass the cache and convert at every forward, because a cached copy would be wrong there:
#
# - **A gradient of the weights is wanted** (autograd on and a source parameter requires one, as in training): the
#   conversion (a transpose, the gate/up split) then runs inside autograd, so the gradients reach the parameters as
#   eager's do; the cached copies are made under `torch.no_grad()` and would cut them off. Such a forward also drops
#   the module's cached copy: the optimizer step after it may bump no version counter (PyTorch's fused optimizers
#   write the parameters without one), so the next inference forward converts the stepped weights.
#
# The cached copies are made outside `inference_mode` even when a forward under it fills the cache, so a later
# forward with autograd on (frozen experts, a trained head) can save them for backward.
# - **Inference tensors** (parameters created or loaded under `torch.inference_mode()`) have no version counter, so
#   an in-place write to them cannot be noticed; moe-lit warns once per module (`UserWarning`) and converts at every
#   forward. Loading the model outside `inference_mode` (and running it inside) keeps the cache.
#
# > **Implementation notes.** A write through `param.data` (`p.data.copy_(...)`) does not bump `p._version` (`.data`
# > has its own version counter), so it goes unnoticed for copied layouts: call `clear_cache()` after one (the next
# > forward converts again). Replacing `p.data` with a new tensor is noticed (a new `data_ptr`). The same holds for a
# > fused optimizer's step taken while the model ran another implementation (trained with `"eager"`, say, then switched
# > back to `"moe_lit"`): no moe-lit forward saw the gradient, so nothing dropped the cached copy — call `clear_cache()`
# > after switching back.

# %%
#| export
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # experts module -> (key, source refs, converted)

_UNVERSIONED: weakref.WeakSet = weakref.WeakSet()   # experts modules already warned about inference-tensor weights

def _weight_key(tensors) -> tuple:
    "What identifies the contents of the source weights (see above); inference tensors have no version (callers skip the cache)."
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)

def clear_cache() -> int:
    """Drop every cached converted weight; returns the number of modules whose copies were dropped. Raises nothing.
    Source: moe-lit's own."""
    n = len(_CACHE)
    _CACHE.clear()
    return n

# %%
#| export
def _expert_tensors(module: torch.nn.Module, recipe: ExpertsRecipe) -> tuple:
    "The module's tensors its recipe reads, in `convert_experts_weights`' order: `gate_up_proj`, `down_proj` (+ biases)."
    names = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if recipe.has_bias else ())
    return tuple(getattr(module, n) for n in names)

def experts_weights(module: torch.nn.Module,     # a transformers experts module
                    recipe: ExpertsRecipe | None = None,  # experts_recipe(module), if already computed
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The module's `(w13 [E, 2·I, H], w2 [E, H, I], w13_bias [E, 2·I] or None, w2_bias [E, H] or None)` in moe-lit's
    layout and the module's dtype, converted once per weight version (a module already in that layout: its own
    tensors). ValueError from `experts_recipe` (naming the module's class) or `convert_experts_weights` (naming the
    tensor); a UserWarning, once per module, for inference-tensor weights (converted at every call). Source: moe-lit's
    own cache over `convert_experts_weights`."""
    recipe = experts_recipe(module) if recipe is None else recipe
    src = _expert_tensors(module, recipe)
    if not recipe.transposed and not recipe.interleaved:             # moe-lit's layout already: no copy, no cache
        return convert_experts_weights(*src)
    convert = lambda: convert_experts_weights(*src, transposed=recipe.transposed, interleaved=recipe.interleaved)
    if torch.is_grad_enabled() and any(t.requires_grad for t in src):
        _CACHE.pop(module, None)                       # a step may follow that bumps no version (fused optimizers)
        return convert()                               # inside autograd: the gradients reach the parameters
    if any(t.is_inference() for t in src):             # no version counter: an in-place edit could not be seen
        if module not in _UNVERSIONED:
            _UNVERSIONED.add(module)
            warnings.warn(f"moe_lit: {type(module).__name__}'s weights are inference tensors (made under "
                          f"torch.inference_mode()), whose in-place edits cannot be detected, so their "
                          f"{'transposed' if recipe.transposed else 'interleaved'} layout is converted at every "
                          f"forward; load the model outside inference_mode to convert once", UserWarning, stacklevel=3)
        with torch.no_grad(): return convert()
    key = (recipe.transposed, recipe.interleaved, _weight_key(src))
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == key and all(r() is t for r, t in zip(hit[1], src)): return hit[2]
    with torch.inference_mode(False), torch.no_grad(): weights = convert()   # normal tensors, also when filled
    _CACHE[module] = (key, tuple(weakref.ref(t) for t in src), weights)      # under inference_mode: reusable later
    return weights

# %% [markdown]
# ## The experts forward
#
# On a CUDA device the experts of a 16-bit or fp32 model run on `TritonExperts` (imported only there, so that
# importing this module on a CPU machine loads no Triton kernel; a float64 model takes the reference below) — unless
# the forward needs a gradient (autograd on, and the input, the router
# weights or an expert weight requires one): the kernels keep no autograd graph, so that forward takes the
# reference below, whose torch ops do (a plain `model(**inputs)` outside `torch.no_grad()` is such a forward).
# Elsewhere they run on the float64-capable reference `moe_reference_standard`, once
# per slot with a unit weight, the router weights then applied in the accumulation dtype: moe-lit's router weights are
# fp32, and rounding a float64 model's weights to fp32 would cost it ~1e-8 of relative accuracy. Ids must lie in
# `[0, num_experts)`; the one exception is transformers' expert-parallel sentinel: on a module with
# `_is_expert_parallel` set, an id `>= num_experts` becomes `-1` and contributes 0. Any other id raises a `ValueError`
# (never dropped: a router bug must not become a silently smaller output) — except while a CUDA graph is captured,
# where the check would need a host sync: there the kernels skip such an id (its slot contributes 0, nothing is read
# out of bounds).

# %%
#| export
def _reference_experts(x, w13, w2, b13, b2, weights, ids, activation):
    "Σ_k w_k · expert_{id_k}(x) on moe-lit's reference, the weights applied in the accumulation dtype."
    acc = acc_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    unit = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
    for k in range(ids.shape[1]):
        y = moe_reference_standard(x, w13, w2, unit, ids[:, k:k + 1], w13_bias=b13, w2_bias=b2, activation=activation,
                                   accumulate_into=torch.zeros(x.shape, dtype=acc, device=x.device))
        out += y * weights[:, k:k + 1].to(acc)
    return out

# %%
#| export
def moe_lit_experts_forward(self: torch.nn.Module,       # the transformers experts module
                            hidden_states: torch.Tensor, # [num_tokens, hidden_size]
                            top_k_index: torch.Tensor,   # [num_tokens, top_k] int, global expert per slot
                            top_k_weights: torch.Tensor, # [num_tokens, top_k] float, router weight per slot
                           ) -> torch.Tensor:            # [num_tokens, hidden_size], hidden_states' dtype
    """transformers' experts forward, computed by moe-lit (the function `register` puts in the ExpertsInterface).
    ValueError naming `hidden_states` (shape, float dtype, not on the experts' device), `top_k_index` (shape, int dtype, ids outside [0, E) other
    than an EP rank's sentinel; not checked while a CUDA graph is captured, where the kernels skip such an id),
    `top_k_weights` (shape, float dtype) or the module's weight that does not fit its recipe. Source: transformers' `use_experts_implementation` / `ExpertsInterface` (src/transformers/integrations/moe.py)."""
    recipe = experts_recipe(self)
    w13, w2, b13, b2 = experts_weights(self, recipe)
    E, H = w13.shape[0], w13.shape[2]
    check_tensor("hidden_states", hidden_states, shape=(None, H), dtype=FLOAT_DTYPES)
    if hidden_states.device != w13.device:        # (a GPU batch with CPU weights would reach the kernels with them)
        raise ValueError(f"hidden_states: expected the experts' device {w13.device}, got {hidden_states.device}")
    check_tensor("top_k_index", top_k_index, shape=(hidden_states.shape[0], None))
    check_tensor("top_k_weights", top_k_weights, shape=tuple(top_k_index.shape), dtype=FLOAT_DTYPES)
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if t.device != hidden_states.device:
            raise ValueError(f"{name}: expected hidden_states' device {hidden_states.device}, got {t.device}")
    if top_k_index.dtype not in (torch.int32, torch.int64):          # transformers' routers give int64
        raise ValueError(f"top_k_index: expected dtype torch.int32 or torch.int64, got {top_k_index.dtype}")
    ep = getattr(self, "_is_expert_parallel", False) is True
    bad = (top_k_index < 0) if ep else (top_k_index < 0) | (top_k_index >= E)
    # One host synchronisation per forward, for this check; transformers' own eager path synchronises more (it reads
    # the set of hit experts back to loop over them). Inside a CUDA-graph capture the check is skipped: the kernels
    # mask ids outside their experts (no read out of bounds), and a capture cannot synchronise.
    capturing = top_k_index.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and bad.any():
        raise ValueError(f"top_k_index: expected ids in [0, {E}) (E = num_experts"
                         f"{', or >= E as an expert-parallel sentinel' if ep else ''}), "
                         f"got {top_k_index[bad][0].item()}")
    ids = top_k_index.masked_fill(top_k_index >= E, -1) if ep else top_k_index   # EP sentinels contribute 0
    wants_grad = gradient_wanted(zip("xtwwbb", (hidden_states, top_k_weights, w13, w2, b13, b2))) is not None
    if hidden_states.is_cuda and w13.dtype != torch.float64 and not wants_grad:   # (the kernels keep no autograd graph)
        from moe_lit.kernels.contiguous import TritonExperts   # Triton only where it runs
        out = TritonExperts().apply(hidden_states.to(w13.dtype), w13, w2, top_k_weights.float(), ids,
                                    w13_bias=b13, w2_bias=b2, activation=recipe.activation)
    else:
        out = _reference_experts(hidden_states, w13, w2, b13, b2, top_k_weights, ids, recipe.activation)
    return out.to(hidden_states.dtype)

# %%
#| export
BUILTIN_EXPERTS = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")   # transformers' own names

moe_lit_experts_forward.is_moe_lit = True   # marks every definition of it: a reloaded module, or this chapter run

def _is_ours(fn) -> bool:
    "Whether `fn` is a `moe_lit_experts_forward` (also one defined before an `importlib.reload` of this module)."
    return getattr(fn, "is_moe_lit", False) is True

def _registries() -> tuple:
    """transformers' experts registries, the instances its decorated classes look a name up in (an instance's local
    mapping first, then its class-wide one): `ALL_EXPERTS_FUNCTIONS`, and `ALL_FP8_EXPERTS_FUNCTIONS` where this
    transformers has it (its `FP8Experts` look their implementation up there; `"moe_lit"` there only says why it cannot
    run them)."""
    try: from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError: return (ALL_EXPERTS_FUNCTIONS,)
    return (ALL_EXPERTS_FUNCTIONS, ALL_FP8_EXPERTS_FUNCTIONS)

def register(name: str = "moe_lit") -> str:
    """Register `moe_lit_experts_forward` as transformers experts implementation `name` (idempotent); returns `name`,
    to pass as a model's `experts_implementation`. It goes in the FP8 experts registry too, so that a quantized model
    loaded with `name` raises `experts_recipe`'s ValueError (what to do instead) rather than transformers' KeyError.
    ValueError naming `name`: empty or not a str, or a name transformers
    (or another function) already holds. Source: transformers' `ExpertsInterface` (src/transformers/integrations/moe.py)."""
    if not isinstance(name, str) or not name: raise ValueError(f"name: expected a non-empty str, got {name!r}")
    registries = _registries()
    held = [r.get(name) for r in registries]
    if name in BUILTIN_EXPERTS or any(h is not None and not _is_ours(h) for h in held):
        # the registry is global: taking a name transformers (or someone else) defines would reroute every model
        taken = set(BUILTIN_EXPERTS) | {k for r in registries for k, v in r.items() if not _is_ours(v)}
        raise ValueError(f"name: expected a name transformers does not already define, got {name!r} "
                         f"(taken: {', '.join(sorted(taken))})")
    for r in registries: type(r).register(name, moe_lit_experts_forward)
    return name

# %% [markdown]
# ## Which modules it reaches
#
# `experts_recipes(model)` lists the experts modules of a model that dispatch through the experts interface, with
# their recipe: the way to check, before the first forward, that `"moe_lit"` reaches a model and can run all of it.
# The examples and tests below use `tiny_hf_model` from `00_testing` (seeded tiny models of each family, 2 layers,
# hidden 32, biases randomised, no download).
#
# > **Llama-4.** In transformers 5.17–5.25 `Llama4TextExperts` is not decorated with `@use_experts_implementation`:
# > its router multiplies the scores into a copy of the tokens for *every* expert and the experts run densely, so
# > `experts_implementation` is accepted but never reaches it (`experts_recipes` returns `{}`). Its transposed layout is
# > still moe-lit's through `convert_experts_weights(..., transposed=True)` with the router weight on the input
# > (checked below). `check_model` refuses such a model instead of letting `"moe_lit"` silently do nothing.

# %%
#| export
def experts_recipes(model: torch.nn.Module) -> dict[str, ExpertsRecipe]:
    """`{module name: recipe}` for every experts module of `model` that dispatches through the experts interface.
    ValueError from `experts_recipe`, naming the class of a module it cannot run. Source: transformers' experts
    interface flags (`@use_experts_implementation`: `has_gate`, `is_transposed`, `is_concatenated`)."""
    return {n: experts_recipe(m) for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("has_gate", "is_transposed", "is_concatenated", "gate_up_proj"))}

# %% [markdown]
# `check_model(model)` is the check to run: it finds the MoE blocks of a model by their weights — a module with a 3-D
# expert weight (`gate_up_proj`, `down_proj`, `up_proj`, `gate_proj`, `w1`, `w2`, `w3`) or an `nn.ModuleList` of
# experts — and raises a `ValueError` naming the class of each one that does not dispatch through the experts
# interface (not decorated, or with its own `forward`), and for a model with no MoE block at all. A quantized model is
# refused first, with what to do instead: transformers swaps a quantized checkpoint's experts for its own classes
# (`FP8Experts`, which looks its implementation up in a separate FP8 registry, and `Mxfp4GptOssExperts`, which does
# not dispatch at all), so `"moe_lit"` would raise a `KeyError` mid-forward or run nothing. It looks at every experts
# module (an MoE block, a module named `experts`, or one with the interface's flags), and an expert weight there must
# be a plain tensor (not a subclass, nor the `triton_kernels` tensor MXFP4's kernels load) in a float dtype, whatever
# its rank. A block that
# dispatches must also have a recipe, so an unsupported one raises too. Last, it checks that every block's config
# selects `"moe_lit"` (looked up as transformers does: a name shadowed in `ALL_EXPERTS_FUNCTIONS`' local mapping is
# not moe-lit's) — a model loaded without `experts_implementation="moe_lit"` is reachable but runs transformers'
# own experts (`selected=False` skips this, to ask before switching). It returns `experts_recipes(model)`.

# %%
#| export
def _dispatch_code():
    "The code of the decorator's forward, which every decorated class shares (None if this transformers differs)."
    probe = type("_Probe", (torch.nn.Module,), {"forward": lambda self: None})
    try: return use_experts_implementation(probe).forward.__code__
    except Exception: return None

_DISPATCH_CODE = _dispatch_code()

def _has_flags(m: torch.nn.Module) -> bool:
    "Whether `m` carries the flags `@use_experts_implementation` sets."
    return all(hasattr(m, a) for a in ("has_gate", "is_transposed", "is_concatenated"))

def _dispatches(m: torch.nn.Module) -> bool:
    "Whether `m` is an experts module whose forward goes through the experts interface."
    fwd = vars(m).get("forward", type(m).forward)
    return (_has_flags(m)
            and (_DISPATCH_CODE is None or getattr(fwd, "__code__", None) is _DISPATCH_CODE))

def check_model(model: torch.nn.Module,
                selected: bool = True,   # also require each block's config to select "moe_lit" (what runs now)
               ) -> dict[str, ExpertsRecipe]:
    """The MoE blocks whose experts moe-lit runs, `{module name: ExpertsRecipe}` (`experts_recipes`' answer, checked).
    ValueError if `model` has an experts module with an expert weight that is not a plain float tensor (a quantized
    checkpoint: `_check_unquantized`), an MoE block 'moe_lit' cannot reach, none at all, or (with `selected`) a block whose config selects an implementation other than
    one `register` made (a model loaded without `experts_implementation="moe_lit"` runs transformers' own experts);
    naming `model` (not a torch.nn.Module) or `selected` (not a bool). Source: transformers' experts interface and
    `set_experts_implementation`."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    blocks = {n: m for n, m in model.named_modules()
              if any(isinstance(getattr(m, w, None), torch.Tensor) and getattr(m, w).dim() == 3 for w in _EXPERT_WEIGHTS)
              or (isinstance(m, torch.nn.ModuleList) and n.rsplit(".", 1)[-1] == "experts")}
    for n, m in model.named_modules():    # first: a quantized class may dispatch or not, and this is why it cannot run
        if n in blocks or n.rsplit(".", 1)[-1] == "experts" or _has_flags(m): _check_unquantized(m, plain=True)
    if not blocks:
        raise ValueError(f"model: expected a model with MoE experts modules (a module with a 3-D expert weight named "
                         f"{', '.join(_EXPERT_WEIGHTS)}, or a ModuleList named experts), got "
                         f"{type(model).__name__} with none")
    for m in blocks.values():             # a module with the interface's flags whose own forward overrides the
        if _has_flags(m) and not _dispatches(m): experts_recipe(m)   # decorator's: its recipe's refusal is the better why
    unreached = {n: type(m).__name__ for n, m in blocks.items() if not _dispatches(m)}
    if unreached:
        classes = ", ".join(sorted(set(unreached.values())))
        raise ValueError(f"model: {type(model).__name__}'s experts {classes} ({len(unreached)} modules, e.g. "
                         f"{next(iter(unreached))}) do not dispatch through transformers' experts interface, so "
                         f"experts_implementation='moe_lit' would not reach them (they would run transformers' "
                         f"own code)")
    recipes = experts_recipes(model)
    for n, m in blocks.items():           # reached, but past experts_recipes' filter (ungated: up_proj, no gate_up_proj)
        if n not in recipes: recipes[n] = experts_recipe(m)     # its reason, naming the class, when moe-lit cannot run it
    for n, r in recipes.items():          # the weights' own checks, as the forward runs them (views: no copy)
        m = model.get_submodule(n)
        try: _checked_views(*_expert_tensors(m, r), transposed=r.transposed)
        except ValueError as e: raise ValueError(f"{type(m).__name__} ({n}): {e}") from None
    if check_bool("selected", selected):
        other = {n: getattr(getattr(model.get_submodule(n), "config", None), "_experts_implementation", None)
                 for n in recipes}
        other = {n: impl for n, impl in other.items()            # (a name `register` was given: moe-lit's too)
                 if not _is_ours(ALL_EXPERTS_FUNCTIONS.get(impl) if isinstance(impl, str) else None)}
        if other:
            n, impl = next(iter(other.items()))
            unregistered = (isinstance(impl, str) and impl not in BUILTIN_EXPERTS
                            and impl not in ALL_EXPERTS_FUNCTIONS)
            raise ValueError(f"model: expected experts_implementation 'moe_lit' (or a name register() was given) on "
                             f"every MoE block, got {impl!r}{' (not registered in this process)' if unregistered else ''} on "
                             f"{len(other)} of {len(recipes)} (e.g. {n}): call register(), then load with "
                             f"from_pretrained(..., experts_implementation='moe_lit') or call "
                             f"model.set_experts_implementation('moe_lit'); selected=False checks reach alone")
    return recipes

# %%
experts_recipes(tiny_hf_model("gpt_oss"))

# %% [markdown]
# The whole use, on a tiny Qwen3-MoE that transformers builds and saves (standing in for a downloaded checkpoint):
# register, load with `experts_implementation="moe_lit"`, check what moe-lit reaches, run.

# %%
# outside this notebook: from moe_lit.integrations.transformers import register, check_model
register()
path = tempfile.mkdtemp()
tiny_hf_model("qwen3_moe").save_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_lit")
print(check_model(model))                      # {module name: ExpertsRecipe} of every MoE block moe-lit runs
with torch.no_grad(): print(model(torch.tensor([[1, 5, 9]])).logits.shape)

# %%
#| test recipes_of_families
test_eq(len(experts_recipes(tiny_hf_model("mixtral"))), 2)
test_eq(len(experts_recipes(tiny_hf_model("deepseek_v3"))), 1)       # layer 0 is dense (first_k_dense_replace=1)
model = tiny_hf_model("gpt_oss")
r = next(iter(experts_recipes(model).values()))
limit = model.model.layers[0].mlp.experts.limit                      # 0.5 from the config (5.17 hard-codes 7.0)
test_eq(r, ExpertsRecipe(activation=Activation("swigluoai", alpha=1.702, limit=limit), transposed=True,
                         interleaved=True, has_bias=True))
r = next(iter(experts_recipes(tiny_hf_model("qwen3_moe")).values()))
test_eq(r, ExpertsRecipe(activation=Activation("silu"), transposed=False, interleaved=False, has_bias=False))
test_eq(experts_recipes(tiny_hf_model("llama4_text")), {})           # Llama-4's experts are not dispatched
test_eq(repr(r), "ExpertsRecipe(activation=Activation('silu'), transposed=False, interleaved=False, "
                 "has_bias=False)")                                  # no gpt-oss alpha/limit on a SiLU recipe
assert "alpha=1.702" in repr(experts_recipe(model.model.layers[0].mlp.experts))   # gpt-oss's are its own

# %%
#| test check_model
test_fail(lambda: check_model(tiny_hf_model("llama4_text")),
          contains="Llama4TextExperts (2 modules, e.g. model.layers.0.feed_forward.experts) do not dispatch")
register()
for model_type in [m for m in TINY_HF if m != "llama4_text"]:
    model = tiny_hf_model(model_type)                               # loaded "eager": reachable, not running moe-lit
    test_eq(check_model(model, selected=False), experts_recipes(model))
    test_fail(lambda: check_model(model), contains="model: expected experts_implementation 'moe_lit' (or a name")
    try: check_model(model)
    except ValueError as e: assert "got 'eager' on" in str(e), e        # transformers' own: "not registered" is not why
    model.set_experts_implementation("moe_lit")
    test_eq(check_model(model), experts_recipes(model))
test_fail(lambda: check_model(model, selected=1), contains="selected: expected a bool, got int 1")
model.config._experts_implementation = "moe_lit_elsewhere"           # a name this process never registered
test_fail(lambda: check_model(model), contains="got 'moe_lit_elsewhere' (not registered in this process)")
test_fail(lambda: check_model(torch.nn.Linear(2, 2)), contains="model: expected a model with MoE experts modules")
test_fail(lambda: check_model("mixtral"), contains="model: expected a torch.nn.Module, got str")
model = tiny_hf_model("mixtral")
experts = model.model.layers[1].mlp.experts
experts.forward = lambda *a: a[0]                                   # its own forward: bypasses the interface
test_fail(lambda: check_model(model), contains="MixtralExperts (1 modules, e.g. model.layers.1.mlp.experts)")
experts.has_gate = False                                            # its own forward, and a recipe that refuses it:
test_fail(lambda: check_model(model), contains="MixtralExperts: ungated experts")   # that reason, the better one
model = tiny_hf_model("qwen3_moe")
model.set_experts_implementation("moe_lit")
experts = model.model.layers[0].mlp.experts
experts.gate_up_proj.data = experts.gate_up_proj.data.half()        # the forward would refuse it: so does check_model
test_fail(lambda: check_model(model), contains="Qwen3MoeExperts (model.layers.0.mlp.experts): down_proj: expected "
                                              "gate_up_proj's dtype torch.float16, got torch.float32")
experts.gate_up_proj.data = experts.gate_up_proj.data.float()
experts.is_transposed = "no"
test_fail(lambda: check_model(model), contains="Qwen3MoeExperts.is_transposed: expected a bool, got str 'no'")
model = tiny_hf_model("mixtral", hidden_act="gelu")                 # reached but not runnable: raises too
test_fail(lambda: check_model(model), contains="MixtralExperts: act_fn GELUActivation")
base = transformers.AutoConfig.for_model("nemotron_h")              # ungated experts (up_proj, no gate_up_proj):
                                                                    # reached, and refused by name, not passed over
kw = dict(hidden_size=32, intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
          num_key_value_heads=2, vocab_size=64, head_dim=16, n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1)
model = transformers.AutoModelForCausalLM.from_config(
    transformers.AutoConfig.for_model("nemotron_h", **{k: v for k, v in kw.items() if hasattr(base, k)}))
test_fail(lambda: check_model(model, selected=False), contains="NemotronHExperts: ungated experts (has_gate=False)")

# %%
#| test quantized_models_refused
register()
model = tiny_hf_model("qwen3_moe")                                  # what from_pretrained does with an FP8 checkpoint
replace_with_fp8_linear(model, quantization_config=transformers.FineGrainedFP8Config(weight_block_size=(16, 16)),
                        modules_to_not_convert=["lm_head"])
model.set_experts_implementation("moe_lit")
test_fail(lambda: check_model(model), contains="FP8Experts: expert weight gate_up_proj is torch.float8_e4m3fn; 'moe_lit' "
                                              "reads plain tensors in float64, float32, float16, bfloat16")
test_fail(lambda: experts_recipes(model), contains="FP8Experts: expert weight gate_up_proj is torch.float8_e4m3fn")
experts = model.model.layers[0].mlp.experts                         # a forward without check_model: the same words,
hidden = torch.randn(3, model.config.hidden_size)                   # not transformers' KeyError
test_fail(lambda: experts(hidden, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)),
          contains="FP8Experts: expert weight gate_up_proj is torch.float8_e4m3fn")
test_fail(lambda: register("deepgemm_megamoe"), contains="taken: batched_mm, deepgemm, deepgemm_megamoe")
model = tiny_hf_model("gpt_oss")                                    # and with an MXFP4 one (its experts, without kernels)
for layer in model.model.layers: layer.mlp.experts = Mxfp4GptOssExperts(model.config)
test_fail(lambda: check_model(model, selected=False), contains="Mxfp4GptOssExperts: expert weight gate_up_proj is torch.uint8")

class Packed:                                                       # what MXFP4's kernels load: no torch.Tensor
    def __init__(self, shape): self.shape = shape
model = tiny_hf_model("gpt_oss")
experts = Mxfp4GptOssExperts(model.config)
for w in ("gate_up_proj", "down_proj"): experts._parameters.pop(w); setattr(experts, w, Packed((4, 32, 16)))
model.model.layers[1].mlp.experts = experts                         # layer 0 left as it was: still refused
test_fail(lambda: check_model(model, selected=False), contains="Mxfp4GptOssExperts: expert weight gate_up_proj is a ")
test_fail(lambda: check_model(model, selected=False),
          contains="Packed, not a torch.Tensor; 'moe_lit' reads plain tensors")

class Wrapped(torch.Tensor):                                        # a weight subclass that reports a float dtype
    pass
model = tiny_hf_model("mixtral")
model.set_experts_implementation("moe_lit")
experts = model.model.layers[0].mlp.experts
experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().as_subclass(Wrapped), requires_grad=False)
test_fail(lambda: check_model(model), contains="MixtralExperts: expert weight down_proj is a tensor subclass Wrapped")
model = tiny_hf_model("mixtral")
experts = model.model.layers[0].mlp.experts
experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().flatten(0, 1).to(torch.uint8),
                                          requires_grad=False)     # packed 2-D: refused whatever its rank
test_fail(lambda: check_model(model, selected=False), contains="MixtralExperts: expert weight gate_up_proj is torch.uint8")
test_fail(lambda: experts_recipe(experts), contains="MixtralExperts: expert weight gate_up_proj is torch.uint8")
model = tiny_hf_model("mixtral")                                    # a 2-D tensor under an expert's name outside the
model.model.norm.register_buffer("w1", torch.zeros(2, 2, dtype=torch.int64))   # experts modules: not an expert weight
test_eq(len(check_model(model, selected=False)), 2)

# %% [markdown]
# ## Tests
#
# One experts module, the same routing, `"eager"` against `"moe_lit"`: every family, float32 and float64. The router
# weights are random and the ids distinct per token, as a router gives them.

# %%
#| test module_matches_eager
register()
for model_type in [m for m in TINY_HF if m != "llama4_text"]:
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = tiny_hf_model(model_type, dtype=dtype)
        experts = model.get_submodule(next(iter(experts_recipes(model))))
        if hasattr(experts, "limit"): experts.limit = model.config.swiglu_limit   # transformers 5.17 fixes 7.0
        g = torch.Generator().manual_seed(1)
        E, k, H = experts.gate_up_proj.shape[0], 2, model.config.hidden_size
        x = torch.randn(11, H, generator=g, dtype=dtype)
        ids = torch.rand(11, E, generator=g).topk(k).indices
        w = torch.rand(11, k, generator=g, dtype=dtype).softmax(-1)
        want = experts(x, ids, w)
        model.set_experts_implementation("moe_lit")
        got = experts(x, ids, w)
        assert_close(got, want, rtol=rtol, name=f"{model_type} {dtype}")

# %% [markdown]
# The tiny gpt-oss has `swiglu_limit=0.5` (transformers 5.17 hard-codes 7.0 in the module, hence the assignment
# above) and random biases, so that both clamps (`gate <= limit`, `|up| <= limit`) act in the test above:

# %%
#| test gpt_oss_clamps_bite
model = tiny_hf_model("gpt_oss")
experts = model.get_submodule(next(iter(experts_recipes(model))))
x = torch.randn(11, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
h = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
gate, up, limit = h[:, 0::2], h[:, 1::2], model.config.swiglu_limit
assert (gate > limit).float().mean() > 0.1 and (up.abs() > limit).float().mean() > 0.1

# %% [markdown]
# A whole model: the logits with `experts_implementation="moe_lit"` equal the eager model's, built with
# `from_config`, loaded with `from_pretrained` from a saved checkpoint, and switched with `set_experts_implementation`
# on an existing model. A spy on the reference counts the experts calls, so a name that silently fails to reach the
# experts cannot pass.

# %%
#| test model_from_config_and_pretrained
register()
ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
for model_type in [m for m in TINY_HF if m != "llama4_text"]:
    # gpt-oss at its released limit: transformers 5.17's from_config/from_pretrained ignore the config's swiglu_limit
    eager = tiny_hf_model(model_type, **({"swiglu_limit": 7.0} if model_type == "gpt_oss" else {}))
    want = eager(ids, use_cache=False).logits                         # qwen3_next's cache wants attention layers
    n = len(experts_recipes(eager))
    spy = mock.Mock(wraps=moe_lit_experts_forward.__globals__["_reference_experts"])
    with mock.patch.dict(moe_lit_experts_forward.__globals__, _reference_experts=spy):
        ours = transformers.AutoModelForCausalLM.from_config(eager.config, experts_implementation="moe_lit")
        ours.load_state_dict(eager.state_dict())
        assert_close(ours.eval()(ids, use_cache=False).logits, want, rtol=1e-5, name=f"{model_type} from_config")
        with tempfile.TemporaryDirectory() as d:
            eager.save_pretrained(d)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(d, experts_implementation="moe_lit",
                                                                       dtype=torch.float32)
            assert_close(loaded(ids, use_cache=False).logits, want, rtol=1e-5, name=f"{model_type} from_pretrained")
    test_eq(spy.call_count, 2 * n)

# %%
#| test set_experts_implementation
register()
ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
for model_type in ("mixtral", "gpt_oss"):
    model = tiny_hf_model(model_type)                                 # experts_implementation "eager"
    want = model(ids).logits
    model.set_experts_implementation("moe_lit")
    test_eq(model.config._experts_implementation, "moe_lit")
    spy = mock.Mock(wraps=moe_lit_experts_forward.__globals__["_reference_experts"])
    with mock.patch.dict(moe_lit_experts_forward.__globals__, _reference_experts=spy):
        assert_close(model(ids).logits, want, rtol=1e-5, name=model_type)
    test_eq(spy.call_count, len(experts_recipes(model)))

# %% [markdown]
# Llama-4's layout, checked directly: its MoE block's routed output (router scores on the input, every expert dense)
# against moe-lit's reference on the converted weights with `apply_router_weight_on_input=True`.

# %%
#| test llama4_layout
model = tiny_hf_model("llama4_text")
block = hf_moe_block(model, 0)
x = torch.randn(11, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
scores, _ = block.router(x)                                       # [T, E], sigmoid of the top-k logits, 0 elsewhere
E = scores.shape[1]
want = block.experts(x.repeat(E, 1) * scores.T.reshape(-1, 1)).view(E, -1, x.shape[1]).sum(0)
w, top = scores.topk(model.config.num_experts_per_tok, dim=-1)
w13, w2, _, _ = convert_experts_weights(block.experts.gate_up_proj, block.experts.down_proj, transposed=True)
got = moe_reference_standard(x, w13, w2, w.float(), top, apply_router_weight_on_input=True)
assert_close(got, want, rtol=1e-5)

# %% [markdown]
# The cache: a copied layout (gpt-oss) converts once and reuses the copy; an in-place write to a weight, a new
# tensor behind it, or a new parameter with the same key (what address reuse by the allocator looks like), rebuilds it; a matching layout (Mixtral) uses the parameters themselves. (Inference, so no
# gradient: a forward that wants one converts inside autograd, next test.)

# %%
#| test cache_invalidation
register()
clear_cache()
model = tiny_hf_model("gpt_oss").requires_grad_(False)
model.set_experts_implementation("moe_lit")
experts = model.get_submodule(next(iter(experts_recipes(model))))
x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
ids, w = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [1, 0], [3, 2], [0, 2]]), torch.full((7, 2), 0.5)
first = experts_weights(experts)
assert experts_weights(experts)[0] is first[0]                    # cached: no second conversion
old_key = _weight_key([experts.gate_up_proj])
experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach(), requires_grad=False)   # a new parameter,
test_eq(_weight_key([experts.gate_up_proj]), old_key)             # same address and version: the key cannot tell
assert experts_weights(experts)[0] is not first[0]                # ... converted again all the same
first = experts_weights(experts)
before = experts(x, ids, w)
with torch.no_grad(): experts.down_proj.mul_(2); experts.gate_up_proj_bias.add_(0.1)
assert experts_weights(experts)[0] is not first[0]
after = experts(x, ids, w)
model.set_experts_implementation("eager")
assert_close(after, experts(x, ids, w), rtol=1e-5)
assert (after - before).abs().max() > 1e-3
experts.gate_up_proj.data = experts.gate_up_proj.data * 3          # a new tensor behind the parameter
assert torch.equal(experts_weights(experts)[0], convert_experts_weights(experts.gate_up_proj, experts.down_proj,
                                                                       transposed=True, interleaved=True)[0])
experts.down_proj.data.mul_(3)                                     # through .data: no counter sees it ...
stale = experts_weights(experts)[1]
assert not torch.equal(stale, convert_experts_weights(experts.gate_up_proj, experts.down_proj, transposed=True,
                                                      interleaved=True)[1])
test_eq(clear_cache(), 1)                                          # ... until the cache is cleared
assert torch.equal(experts_weights(experts)[1], convert_experts_weights(experts.gate_up_proj, experts.down_proj,
                                                                       transposed=True, interleaved=True)[1])
test_eq(clear_cache(), 1)                                          # the gpt-oss layer's copies
mixtral = tiny_hf_model("mixtral")
experts = mixtral.get_submodule(next(iter(experts_recipes(mixtral))))
assert experts_weights(experts)[0] is experts.gate_up_proj            # no copy ...
test_eq(clear_cache(), 0)                                          # ... and nothing cached

# %% [markdown]
# Training a copied layout: the gradients reach gpt-oss's parameters and equal eager's. Inference tensors: a model
# made under `torch.inference_mode()` and edited in place there gives eager's output after the edit (converted at
# every forward, with one warning a module).

# %%
#| test copied_layout_gradients_and_inference_tensors
register()
ids_ = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
grads = {}
for impl in ("eager", "moe_lit"):
    model = tiny_hf_model("gpt_oss", dtype=torch.float64).train()
    model.set_experts_implementation(impl)
    model(ids_, labels=ids_).loss.backward()
    grads[impl] = {n: p.grad for n, p in model.named_parameters() if ".experts." in n}
assert grads["eager"] and all(g is not None for g in grads["moe_lit"].values()), grads["moe_lit"]
for n, g in grads["eager"].items(): assert_close(grads["moe_lit"][n], g, rtol=1e-9, name=n)
clear_cache()
with torch.inference_mode():
    model = tiny_hf_model("gpt_oss", dtype=torch.float64)
    model.set_experts_implementation("moe_lit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids_)
        model.load_state_dict(tiny_hf_model("gpt_oss", seed=1, dtype=torch.float64).state_dict())   # in place
        got = model(ids_).logits
    test_eq(sum("inference tensors" in str(c.message) for c in caught), model.config.num_hidden_layers)   # one a module
    model.set_experts_implementation("eager")
    assert_close(got, model(ids_).logits, rtol=1e-9)
test_eq(clear_cache(), 0)                                          # nothing cached for them

# %% [markdown]
# After training steps with a fused optimizer (no version bump) an inference forward uses the stepped weights; a cache
# filled under `inference_mode` serves a later forward with autograd on (the experts frozen, the head trained).

# %%
#| test copied_layout_cache_across_training
register(); clear_cache()
ids_ = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
model = tiny_hf_model("gpt_oss", dtype=torch.float64)
model.set_experts_implementation("moe_lit")
opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # its step bumps no version counter
with torch.no_grad(): model(ids_)                                  # fills the cache
for _ in range(2): model(ids_, labels=ids_).loss.backward(); opt.step(); opt.zero_grad()
with torch.no_grad(): got = model(ids_).logits
model.set_experts_implementation("eager")
with torch.no_grad(): assert_close(got, model(ids_).logits, rtol=1e-9)
model = tiny_hf_model("gpt_oss", dtype=torch.float64)
model.set_experts_implementation("moe_lit"); model.requires_grad_(False); model.lm_head.requires_grad_(True)
with torch.inference_mode(): model(ids_)                           # the cache filled under inference_mode
model(ids_, labels=ids_).loss.backward()                           # reused with autograd on: no inference tensors
assert model.lm_head.weight.grad is not None

# %% [markdown]
# Expert-parallel sentinels (ids `>= num_experts`) contribute 0, as a slot of router weight 0 would:

# %%
#| test ep_sentinels
register()
model = tiny_hf_model("mixtral", dtype=torch.float64)
experts = model.get_submodule(next(iter(experts_recipes(model))))
experts._is_expert_parallel = True
x = torch.randn(5, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
E = experts.num_experts
ids = torch.tensor([[0, E], [E, 3], [2, 1], [E, E], [3, 1]])          # E == num_experts: on another rank
w = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
off = ids >= E
want = experts(x, ids.masked_fill(off, 0), w.masked_fill(off, 0.0))   # eager, those slots weighted 0
model.set_experts_implementation("moe_lit")
got = experts(x, ids, w)
assert_close(got, want, rtol=1e-12)
assert not got[3].any()                                             # both slots on other ranks: 0
for args, msg in (((x, ids, w[:2]), "top_k_weights: expected shape [5, 2], got [2, 2]"),    # a caller's bad tensors
                  ((x, ids, w[:, 0]), "top_k_weights: expected a 2-D tensor"),            # are named, not torch's errors
                  ((x[:, :-1], ids, w), "hidden_states: expected shape"),
                  ((x, ids, w.long()), "top_k_weights: expected dtype"),
                  ((x.tolist(), ids, w), "hidden_states: expected a torch.Tensor")):
    test_fail(lambda: experts(*args), contains=msg)

# %% [markdown]
# What moe-lit cannot run raises, naming the module's class:

# %%
#| test unsupported_raise
register()
model = tiny_hf_model("mixtral", hidden_act="gelu")
model.set_experts_implementation("moe_lit")
ids = torch.randint(0, 64, (1, 4))
test_fail(lambda: model(ids), contains="MixtralExperts: act_fn GELUActivation is not supported by moe_lit")
test_fail(lambda: experts_recipes(model), contains="MixtralExperts: act_fn GELUActivation")
model = tiny_hf_model("qwen3_moe")
model.set_experts_implementation("moe_lit")
experts = model.get_submodule(next(iter(experts_recipes(model))))
experts._apply_gate = lambda h: h[..., ::2]                        # a gate moe-lit does not know
test_fail(lambda: model(ids), contains="Qwen3MoeExperts: its _apply_gate")
del experts._apply_gate
experts.has_gate = False
test_fail(lambda: model(ids), contains="Qwen3MoeExperts: ungated experts (has_gate=False)")
experts.has_gate, experts.has_post_expert_norm = True, True
test_fail(lambda: model(ids), contains="Qwen3MoeExperts: a norm after each expert")
experts.has_post_expert_norm, experts.is_concatenated = False, False
test_fail(lambda: experts_recipe(experts), contains="is_concatenated=False contradicts its gate _default_apply_gate")
test_fail(lambda: experts_recipe(torch.nn.Linear(2, 2)), contains="Linear: not a transformers experts module")
test_fail(lambda: register(""), contains="name: expected a non-empty str")

# %% [markdown]
# Bad input raises too, rather than computing something else: an `act_fn` that only looks like SiLU, ids outside
# `[0, num_experts)`, a `has_bias` flag that contradicts the parameters, a missing gate constant, and a name that
# would replace one of transformers' implementations.

# %%
#| test act_fn_lookalikes_raise
register()
class ReluSiLU(torch.nn.SiLU):
    def forward(self, x): return torch.relu(x)
model = tiny_hf_model("qwen3_moe")
experts = model.get_submodule(next(iter(experts_recipes(model))))
experts.act_fn = ReluSiLU()                                         # a subclass: isinstance would pass it
test_fail(lambda: experts_recipe(experts), contains="Qwen3MoeExperts: act_fn ReluSiLU is not supported by moe_lit")
experts.act_fn = torch.nn.SiLU()
handle = experts.act_fn.register_forward_hook(lambda m, i, o: o * 0)
test_fail(lambda: experts_recipe(experts), contains="Qwen3MoeExperts: act_fn SiLU is not supported")
handle.remove(); handle = experts.act_fn.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
test_fail(lambda: experts_recipe(experts), contains="Qwen3MoeExperts: act_fn SiLU is not supported")
handle.remove(); experts.act_fn.forward = torch.relu                # an instance forward
test_fail(lambda: experts_recipe(experts), contains="Qwen3MoeExperts: act_fn SiLU is not supported")
del experts.act_fn.forward
test_eq(experts_recipe(experts).activation, Activation("silu"))     # plain nn.SiLU ('swish') is fine

# %%
#| test expert_ids_out_of_range_raise
# out of range raises; only expert parallelism's sentinels (>= E) are dropped
register()
model = tiny_hf_model("mixtral")
model.set_experts_implementation("moe_lit")
experts = model.get_submodule(next(iter(experts_recipes(model))))
x, w = torch.randn(2, model.config.hidden_size), torch.full((2, 2), 0.5)
E = experts.gate_up_proj.shape[0]
test_fail(lambda: experts(x, torch.tensor([[0, 1], [7, 2]]), w), contains=f"top_k_index: expected ids in [0, {E})")
test_fail(lambda: experts(x, torch.tensor([[0, 1], [-5, 2]]), w), contains="got -5")
test_fail(lambda: experts(x, torch.tensor([[0., 1.], [2., 3.]]), w), contains="top_k_index: expected dtype torch.int32 or torch.int64, got torch.float32")
ids = torch.tensor([[0, 1], [3, 2]])                                # every input on another device than the experts'
test_fail(lambda: experts(x.to("meta"), ids.to("meta"), w.to("meta")), contains="hidden_states: expected the experts' device cpu, got meta")
experts._is_expert_parallel = True
experts(x, torch.tensor([[0, 1], [7, 2]]), w)                       # a sentinel: fine
test_fail(lambda: experts(x, torch.tensor([[0, 1], [-5, 2]]), w), contains="got -5")

# %%
#| test has_bias_contradictions_raise
model = tiny_hf_model("gpt_oss")
experts = model.get_submodule(next(iter(experts_recipes(model))))
experts.has_bias = False
test_fail(lambda: experts_recipe(experts),
          contains="GptOssExperts: has_bias=False contradicts its parameters: gate_up_proj_bias is present")
experts.has_bias, experts.down_proj_bias = True, None
test_fail(lambda: experts_recipe(experts),
          contains="GptOssExperts: has_bias=True contradicts its parameters: down_proj_bias is missing or None")
mixtral = tiny_hf_model("mixtral")
mixtral.model.layers[0].mlp.experts.has_bias = True
test_fail(lambda: experts_recipe(mixtral.model.layers[0].mlp.experts),
          contains="MixtralExperts: has_bias=True contradicts its parameters: gate_up_proj_bias is missing")

# %%
#| test missing_gate_constants_raise
experts = tiny_hf_model("gpt_oss").model.layers[0].mlp.experts
experts.limit = None
test_fail(lambda: experts_recipe(experts), contains="GptOssExperts.limit: expected a finite number > 0, got NoneType")
experts.limit = 7.0; del experts.alpha
test_fail(lambda: experts_recipe(experts), contains="GptOssExperts.alpha: expected a finite number > 0")

# %%
#| test register_refuses_taken_names
# names transformers defines, or someone else registered, are refused; our own re-registration is not
for name in ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe"):
    test_fail(lambda: register(name), contains=f"name: expected a name transformers does not already define, "
                                               f"got {name!r}")
with mock.patch.dict(ExpertsInterface._global_mapping, {"theirs": lambda *a: None}):
    test_fail(lambda: register("theirs"), contains="got 'theirs'")
    assert ExpertsInterface._global_mapping["theirs"] is not moe_lit_experts_forward
register()
model = tiny_hf_model("mixtral")
model.set_experts_implementation("moe_lit")
test_eq(len(check_model(model)), 2)
with mock.patch.dict(ALL_EXPERTS_FUNCTIONS._local_mapping, {"moe_lit": lambda *a: None}):   # transformers looks a name
    test_fail(lambda: check_model(model), contains="got 'moe_lit' on 2 of 2")              # up here first: shadowed
    test_fail(lambda: register(), contains="got 'moe_lit'")
test_eq(register(), "moe_lit"); test_eq(register(), "moe_lit")

# %% [markdown]
# On a GPU, in bf16, the experts run on `TritonExperts`. Each bf16 run is measured against the same model in float64
# on the CPU (the bf16 weights, upcast). One experts module must match it to a cosine of 0.999; the whole model must
# be as close to it as transformers' eager bf16 run, up to bf16 noise, and agree with eager to a cosine of 0.99: a
# tiny random model with clamps can amplify bf16 rounding through its layers, eager's as much as moe-lit's.

# %%
#| test cuda_bf16_matches_eager
#| gpu
register()
cos = lambda a, b: torch.nn.functional.cosine_similarity(a.double().cpu().flatten(), b.double().cpu().flatten(), dim=0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 64, (4, 33), generator=g)
for model_type in ("mixtral", "gpt_oss"):
    ref = tiny_hf_model(model_type, dtype=torch.bfloat16).double()             # the bf16 weights, in float64
    model = tiny_hf_model(model_type, dtype=torch.bfloat16).cuda()
    name = next(iter(experts_recipes(model)))
    for m in (ref, model):                                                     # transformers 5.17 fixes 7.0
        if hasattr(m.get_submodule(name), "limit"): m.get_submodule(name).limit = m.config.swiglu_limit
    x = torch.randn(64, model.config.hidden_size, generator=g).bfloat16()
    top = torch.rand(64, model.get_submodule(name).num_experts, generator=g).topk(2).indices
    w = torch.rand(64, 2, generator=g).softmax(-1)
    want, want_logits = ref.get_submodule(name)(x.double(), top, w.double()), ref(ids).logits
    xg = x.cuda().requires_grad_()                                            # autograd on: eager's gradient
    model.get_submodule(name)(xg, top.cuda(), w.cuda()).float().square().sum().backward()
    with torch.no_grad(): eager = model(ids.cuda()).logits
    model.set_experts_implementation("moe_lit")
    with torch.no_grad():                                                      # inference: the Triton experts
        got, logits = model.get_submodule(name)(x.cuda(), top.cuda(), w.cuda()), model(ids.cuda()).logits
    test_eq(got.dtype, torch.bfloat16); test_eq(logits.dtype, torch.bfloat16)
    assert cos(got, want) > 0.999, f"{model_type} experts: cosine {cos(got, want)}"
    assert cos(logits, want_logits) > cos(eager, want_logits) - 1e-3, f"{model_type}: {cos(logits, want_logits)}"
    assert cos(logits, eager) > 0.99, f"{model_type}: cosine to eager {cos(logits, eager)}"
    xm = x.cuda().requires_grad_()                                            # a gradient wanted: the reference path
    model.get_submodule(name)(xm, top.cuda(), w.cuda()).float().square().sum().backward()
    xr = x.double().requires_grad_()                                          # the gradient in float64, transformers' own
    ref.get_submodule(name)(xr, top, w.double()).square().sum().backward()
    assert xm.grad is not None and cos(xm.grad, xr.grad) > max(cos(xg.grad, xr.grad) - 1e-3, 0.99), \
        f"{model_type}: gradient cosine {cos(xm.grad, xr.grad)} to float64, eager's {cos(xg.grad, xr.grad)}"
