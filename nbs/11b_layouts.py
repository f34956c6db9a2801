# %%
#| default_exp layouts

# %% [markdown]
# # Checkpoint layouts
# > Where each model family keeps a MoE layer's tensors in its checkpoint, which of its decoder layers are MoE, and which quantization scheme its config names — all as data, read from `config.json` alone.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
from moe_lit.terms import check_int
from moe_lit.config import SIZE_LIMIT
from moe_lit.models import text_config_view, read_config_json
from moe_lit.quant import QUANT_SCHEME_TABLE

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# In this notebook: `LAYOUTS` (one `CheckpointLayout` per `model_type`: the key prefix and names of the router, the
# experts and the shared expert), `MOE_LAYER_RULES` with `moe_layer_indices` (which decoder layers are MoE), and
# `QUANT_METHODS` with `quant_scheme_from_hf` (the scheme a pre-quantized checkpoint names). Nothing here opens a
# safetensors file; `11c_checkpoint` reads the tensors these tables point to. A **reference** page.

# %% [markdown]
# ## Key layouts
#
# Every family writes a MoE layer under a prefix, `P` below (`{N}` is the layer index). What `save_pretrained` of
# transformers 5 writes was read off tiny models of each family; the in-memory layout it converts from and to is its
# `conversion_mapping.py` and each family's `modeling_*.py`.
#
# | `model_type` | prefix `P` | router (+ bias) | correction bias | experts | shared expert (+ gate) |
# |---|---|---|---|---|---|
# | `mixtral` | `model.layers.{N}.block_sparse_moe.` (Hub), `model.layers.{N}.mlp.` (transformers 5 fused) | `gate.weight` | — | `experts.{e}.w1` (gate) / `w3` (up) / `w2` (down) `.weight` | — |
# | `minimax_m2` | as Mixtral | `gate.weight` | `e_score_correction_bias` | as Mixtral | — |
# | `qwen2_moe`, `qwen3_next` | `model.layers.{N}.mlp.` | `gate.weight` | — | `experts.{e}.gate_proj` / `up_proj` / `down_proj` `.weight` | `shared_expert.*` (+ `shared_expert_gate.weight [1, H]`) |
# | `qwen3_moe` | `model.layers.{N}.mlp.` | `gate.weight` | — | as Qwen2-MoE | — |
# | `deepseek_v2`, `deepseek_v3`, `glm4_moe` | `model.layers.{N}.mlp.` | `gate.weight` | `gate.e_score_correction_bias` | as Qwen2-MoE | `shared_experts.*` |
# | `gpt_oss` | `model.layers.{N}.mlp.` | `router.weight` (+ `router.bias`) | — | fused, transposed, interleaved: `experts.gate_up_proj [E, H, 2I]` (gate at even columns, up at odd), `experts.down_proj [E, I, H]`, `experts.gate_up_proj_bias [E, 2I]` (interleaved), `experts.down_proj_bias [E, H]` | — |
# | `llama4_text` | `model.layers.{N}.feed_forward.` | `router.weight` | — | fused, transposed: `experts.gate_up_proj [E, H, 2I]` (gate columns then up), `experts.down_proj [E, I, H]` | `shared_expert.*` |
# | `llama4` (with vision) | `language_model.model.layers.{N}.feed_forward.` | as `llama4_text` | — | as `llama4_text` | as `llama4_text` |
#
# Two more expert layouts are recognised by their keys in any family: transformers 5's in-memory fused layout
# (`save_pretrained(..., save_original_format=False)`: `experts.gate_up_proj [E, 2I, H]`, gate rows then up rows,
# `experts.down_proj [E, H, I]`), and, for Llama-4, per-expert `experts.{e}.gate_proj/up_proj/down_proj` keys. The
# layout's `model_type` is the file's top-level one (`llama4` and `llama4_text` differ in prefix). Pre-quantized checkpoints
# add, per weight, its scale: FP8 `….weight` (`float8_e4m3fn [N, K]`) with `….weight_scale_inv` (fp32
# `[⌈N/128⌉, ⌈K/128⌉]`, DeepSeek-V3's `README_WEIGHTS.md` on the Hub); MXFP4 `experts.gate_up_proj_blocks
# [E, 2I, H/32, 16]` (uint8, two e2m1 codes a byte) with `experts.gate_up_proj_scales [E, 2I, H/32]` (uint8 e8m0),
# and the same for `down_proj` — `[out, in]` oriented, gate and up rows still interleaved (gpt-oss's model card, and
# `convert_moe_packed_tensors` in transformers' `integrations/mxfp4.py`).
#
# Sources: transformers' `conversion_mapping.py` (`mixtral`, `qwen2_moe`, `minimax_m2` entries), `modeling_gpt_oss.py`
# (`GptOssExperts._apply_gate`: `gate_up[..., ::2]`, `gate_up[..., 1::2]`), `modeling_llama4.py`
# (`Llama4TextExperts.forward`: `gate_up.chunk(2, dim=-1)`), `modeling_qwen2_moe.py` (`shared_expert_gate`); the
# model cards of deepseek-ai/DeepSeek-V3, openai/gpt-oss-20b and meta-llama/Llama-4-Scout-17B-16E on the Hub.

# %%
#| export
@dataclass(frozen=True)
class CheckpointLayout:
    """Where one model family's checkpoint keeps a MoE layer's tensors; keys are relative to its prefix. A frozen
    record; it checks nothing and raises nothing (`LAYOUTS` is its only producer). Source: transformers'
    `conversion_mapping.py` and each family's `modeling_*.py` (e.g. `GptOssExperts`, `Llama4TextExperts`), with the
    key names read off `save_pretrained` checkpoints (table above)."""
    prefixes: tuple                               # layer N's MoE block ('{N}' = the index): the first holding the router wins
    router: str = "gate.weight"                   # [E, H]
    router_bias: str | None = None                # [E], added to the logits (read when config.has_router_bias)
    correction_bias: str | None = None            # [E], selection only (read when config.has_correction_bias)
    per_expert: tuple | None = ("gate_proj", "up_proj", "down_proj")   # experts.{e}.<gate|up|down>.weight names
    fused_transposed: bool = False                # fused float gate_up_proj is [E, H, 2I] (and down_proj [E, I, H])
    interleaved: bool = False                     # fused gate_up alternates gate, up (gpt-oss); else gate then up
    shared: str | None = None                     # the shared expert's module ('shared_experts.')
    shared_gate: str | None = None                # [1, H] weight of sigmoid(x · w) scaling the shared output
    moe_layers: str = "all"                       # which decoder layers are MoE: a key of MOE_LAYER_RULES

# %%
#| export
_MLP = ("model.layers.{N}.mlp.",)
_QWEN = dict(prefixes=_MLP, moe_layers="decoder_sparse_step")
_DEEPSEEK = dict(prefixes=_MLP, correction_bias="gate.e_score_correction_bias", shared="shared_experts.",
                 moe_layers="first_k_dense_replace")
_LLAMA4 = dict(router="router.weight", fused_transposed=True, shared="shared_expert.", moe_layers="moe_layers")
_MIXTRAL = dict(prefixes=("model.layers.{N}.block_sparse_moe.", *_MLP), per_expert=("w1", "w3", "w2"))   # Hub, transformers 5

LAYOUTS: dict[str, CheckpointLayout] = {   # model_type -> layout (the table above)
    "mixtral":     CheckpointLayout(**_MIXTRAL),
    "minimax_m2":  CheckpointLayout(**_MIXTRAL, correction_bias="e_score_correction_bias"),
    "qwen2_moe":   CheckpointLayout(**_QWEN, shared="shared_expert.", shared_gate="shared_expert_gate.weight"),
    "qwen3_next":  CheckpointLayout(**_QWEN, shared="shared_expert.", shared_gate="shared_expert_gate.weight"),
    "qwen3_moe":   CheckpointLayout(**_QWEN),
    "deepseek_v2": CheckpointLayout(**_DEEPSEEK),
    "deepseek_v3": CheckpointLayout(**_DEEPSEEK),
    "glm4_moe":    CheckpointLayout(**_DEEPSEEK),
    "gpt_oss":     CheckpointLayout(prefixes=_MLP, router="router.weight", router_bias="router.bias",
                                    per_expert=None, fused_transposed=True, interleaved=True),
    "llama4_text": CheckpointLayout(prefixes=("model.layers.{N}.feed_forward.",), **_LLAMA4),
    "llama4":      CheckpointLayout(prefixes=("language_model.model.layers.{N}.feed_forward.",), **_LLAMA4),
}

# %% [markdown]
# ## Which layers are MoE
#
# Families interleave dense and MoE decoder layers by different rules, each read from `config.json` (for a
# multimodal file, its `text_config`); a key the file omits takes the default of the family's transformers config
# class.
#
# | rule | families | layer `i` is MoE when |
# |---|---|---|
# | `all` | `mixtral`, `minimax_m2`, `gpt_oss` | always |
# | `first_k_dense_replace` | `deepseek_v2`, `deepseek_v3`, `glm4_moe` | `i ≥ first_k_dense_replace` |
# | `decoder_sparse_step` | `qwen2_moe`, `qwen3_moe`, `qwen3_next` | `i ∉ mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0` |
# | `moe_layers` | `llama4`, `llama4_text` | `i ∈ moe_layers`; without the key, `(i + 1) % interleave_moe_layer_step == 0` |
#
# > The rule is transformers': `DeepseekV2DecoderLayer`, `DeepseekV3DecoderLayer` and `Glm4MoeDecoderLayer` build an
# > MoE block for every layer from `first_k_dense_replace` on, and read no `moe_layer_freq`. DeepSeek's own modeling
# > code on the Hub (`modeling_deepseek.py` of deepseek-ai/DeepSeek-V3), and vLLM's model after it, also require
# > `i % moe_layer_freq == 0`; every released config has `moe_layer_freq: 1`, where the two agree. A config with
# > another value is loaded as transformers loads it (a checkpoint that transformers wrote from such a config has
# > experts in every layer from `first_k_dense_replace` on), and `moe_layer_rule` says the value was not read. The
# > defaults for an absent `first_k_dense_replace` are those of `DeepseekV2Config` (0), `DeepseekV3Config` (3) and
# > `Glm4MoeConfig` (1).

# %%
#| export
_FIRST_K_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3, "glm4_moe": 1}   # the transformers config classes

MAX_LAYERS = 2**16   # decoder layers a config.json may declare (the largest published models have a few hundred)

def _count(cfg: dict, key: str, default: int, lo: int = 0) -> int:
    "The int `cfg[key]` (`default` when absent or null), `lo <= v < SIZE_LIMIT`; bools, floats and strs refused."
    v = cfg.get(key)
    return check_int(f"config.json {key}", default if v is None else v, lo=lo, hi=SIZE_LIMIT)

def _layer_set(cfg: dict, key: str) -> frozenset:
    "The layer indices listed under `cfg[key]` (empty when absent or null): a list of ints, each checked."
    v = cfg.get(key)
    if v is None: return frozenset()
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"config.json {key}: expected a list of layer indices (ints), got {type(v).__name__} {v!r}")
    return frozenset(check_int(f"config.json {key}[{j}]", i, lo=0, hi=SIZE_LIMIT) for j, i in enumerate(v))

def _rule_first_k_dense(c, t, n):
    k = _count(c, "first_k_dense_replace", _FIRST_K_DENSE_DEFAULT.get(t, 0))
    return lambda i: i >= k                           # transformers' rule: moe_layer_freq is not read (note above)

def _rule_sparse_step(c, t, n):
    dense, step = _layer_set(c, "mlp_only_layers"), _count(c, "decoder_sparse_step", 1, lo=1)
    return lambda i: i not in dense and (i + 1) % step == 0

def _rule_moe_layers(c, t, n):
    if c.get("moe_layers") is not None: moe = _layer_set(c, "moe_layers"); return lambda i: i in moe
    step = _count(c, "interleave_moe_layer_step", 1, lo=1)
    return lambda i: (i + 1) % step == 0

MOE_LAYER_RULES = {   # rule -> (config dict, model_type, number of layers) -> is layer i MoE (keys checked once)
    "all": lambda c, t, n: lambda i: True,
    "first_k_dense_replace": _rule_first_k_dense,
    "decoder_sparse_step": _rule_sparse_step,
    "moe_layers": _rule_moe_layers,
}

# %%
#| export
def _check_config_dict(cfg):
    if not isinstance(cfg, dict): raise ValueError(f"cfg: expected a config.json's contents (a dict), got {type(cfg).__name__}")

def checkpoint_layout(cfg: dict,  # a config.json's contents
                     ) -> tuple[str, CheckpointLayout]:
    """(model_type, its CheckpointLayout) of a config.json dict (the top-level model_type names the key prefix);
    ValueError for an unknown or non-str model_type, and naming `cfg` when it is not a dict. Source: moe-lit's own
    `LAYOUTS` table, read from transformers' `conversion_mapping.py` and `modeling_*.py` (table above)."""
    _check_config_dict(cfg)
    t = cfg.get("model_type")
    if t is not None and not isinstance(t, str):     # as moe_lit.models reads it: a str, looked up in a table
        raise ValueError(f"config.json model_type: expected a str, got {type(t).__name__} {t!r}")
    if t not in LAYOUTS:
        raise ValueError(f"config.json model_type: expected one of {sorted(LAYOUTS)} (a known checkpoint key layout), "
                         f"got {t!r}")
    return t, LAYOUTS[t]

def moe_layer_indices(config,  # a config.json's contents (dict), its path, or the checkpoint directory
                     ) -> list[int]:
    """The indices of the decoder layers of `config` that are MoE layers, by its family's rule (table above). ValueError
    naming `config` (not a dict, a missing file), the config.json key at fault (`model_type`,
    `num_hidden_layers` absent or past 2^16, a rule's key such as `first_k_dense_replace`, `decoder_sparse_step`,
    `mlp_only_layers`, `moe_layers`), or an unreadable JSON file. Source: transformers' decoder layers
    (`DeepseekV3DecoderLayer`, `Qwen2MoeDecoderLayer`, ...) and config-class defaults (note above)."""
    if not isinstance(config, dict): config = read_config_json(config, "config")[0]
    t, layout = checkpoint_layout(config)
    text = text_config_view(config)
    if text.get("num_hidden_layers") is None:
        raise ValueError("config.json num_hidden_layers: expected an int >= 1, got none (the key is missing or null)")
    n = _count(text, "num_hidden_layers", 0, lo=1)
    if n > MAX_LAYERS:                                 # (every index is listed below: a bound, not a minutes-long loop)
        raise ValueError(f"config.json num_hidden_layers: expected <= {MAX_LAYERS} (decoder layers of one model), got {n}")
    is_moe = MOE_LAYER_RULES[layout.moe_layers](text, t, n)
    return [i for i in range(n) if is_moe(i)]

MOE_LAYER_KEYS = {"all": (), "first_k_dense_replace": ("first_k_dense_replace",),                  # what each rule
                  "decoder_sparse_step": ("decoder_sparse_step", "mlp_only_layers"),           # of MOE_LAYER_RULES reads
                  "moe_layers": ("moe_layers", "interleave_moe_layer_step")}

def moe_layer_rule(config,  # a config.json's contents (dict), its path, or the checkpoint directory
                   ) -> str:
    """Which rule `moe_layer_indices` applied and the config.json values it read (absent keys as None: the rule's
    default), e.g. "the first_k_dense_replace rule of deepseek_v3: num_hidden_layers=2, first_k_dense_replace=1,
    and "moe_layer_freq=2 is not read (transformers' rule)" where the config has a value other than 1 -- for an error
    that says why a layer is not an MoE layer. ValueError as `moe_layer_indices`."""
    if not isinstance(config, dict): config = read_config_json(config, "config")[0]
    t, layout = checkpoint_layout(config)
    text = text_config_view(config)
    keys = ("num_hidden_layers", *MOE_LAYER_KEYS[layout.moe_layers])
    unread = (f"; moe_layer_freq={text['moe_layer_freq']!r} is not read (transformers' rule)"
              if layout.moe_layers == "first_k_dense_replace" and text.get("moe_layer_freq", 1) not in (1, None) else "")
    return f"the {layout.moe_layers} rule of {t}: " + ", ".join(f"{k}={text.get(k)!r}" for k in keys) + unread

# %%
#| test moe_layer_indices
test_eq(moe_layer_indices({"model_type": "mixtral", "num_hidden_layers": 3}), [0, 1, 2])
test_fail(lambda: moe_layer_indices({"model_type": "mixtral", "num_hidden_layers": 2_000_000_000}),
          contains="config.json num_hidden_layers: expected <= 65536")
ds = {"model_type": "deepseek_v3", "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1}
test_eq(moe_layer_indices(ds), [1, 2, 3, 4, 5])
test_eq(moe_layer_indices({**ds, "moe_layer_freq": 2}), [1, 2, 3, 4, 5])   # as transformers builds it (not Hub code's [2, 4])
test_eq(moe_layer_rule({**ds, "moe_layer_freq": 2}), "the first_k_dense_replace rule of deepseek_v3: num_hidden_layers=6, "
        "first_k_dense_replace=1; moe_layer_freq=2 is not read (transformers' rule)")
test_eq(moe_layer_rule(ds), "the first_k_dense_replace rule of deepseek_v3: num_hidden_layers=6, first_k_dense_replace=1")
test_eq(set(MOE_LAYER_KEYS), set(MOE_LAYER_RULES))                 # every rule says what it reads
test_eq(moe_layer_indices({"model_type": "deepseek_v3", "num_hidden_layers": 5}), [3, 4])   # DeepseekV3Config default 3
test_eq(moe_layer_indices({"model_type": "glm4_moe", "num_hidden_layers": 3}), [1, 2])
qw = {"model_type": "qwen2_moe", "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
test_eq(moe_layer_indices(qw), [1, 5])
test_eq(moe_layer_indices({"model_type": "qwen3_moe", "num_hidden_layers": 3, "mlp_only_layers": None}), [0, 1, 2])
l4 = {"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_hidden_layers": 4,
                                              "interleave_moe_layer_step": 2}}
test_eq(moe_layer_indices(l4), [1, 3])
test_eq(moe_layer_indices({**l4, "text_config": {**l4["text_config"], "moe_layers": [0, 2]}}), [0, 2])
test_fail(lambda: moe_layer_indices({"model_type": "llama", "num_hidden_layers": 2}),
          contains="config.json model_type: expected one of")
test_fail(lambda: moe_layer_indices({**qw, "decoder_sparse_step": 0}), contains="config.json decoder_sparse_step: expected >= 1")
test_fail(lambda: moe_layer_indices("no-such-dir"), contains="config: expected an existing config.json")
for bad in ("0", 5): test_fail(lambda: moe_layer_indices({**qw, "mlp_only_layers": bad}),
                               contains=f"config.json mlp_only_layers: expected a list of layer indices (ints), got")
for bad in ("01", 3): test_fail(lambda: moe_layer_indices({**l4, "text_config": {**l4["text_config"], "moe_layers": bad}}),
                                contains="config.json moe_layers: expected a list of layer indices (ints), got")
for bad in (True, 1.0):   # 1.0 == True == 1: would match layer 1
    test_fail(lambda: moe_layer_indices({**l4, "text_config": {**l4["text_config"], "moe_layers": [bad]}}),
              contains=f"config.json moe_layers[0]: expected an int, got {type(bad).__name__} {bad!r}")
test_fail(lambda: moe_layer_indices({**qw, "mlp_only_layers": [True]}), contains="config.json mlp_only_layers[0]: expected an int, got bool")
test_fail(lambda: moe_layer_indices({"model_type": ["mixtral"], "num_hidden_layers": 2}),
          contains="config.json model_type: expected a str, got list ['mixtral']")
test_fail(lambda: moe_layer_indices({"model_type": "mixtral"}), contains="config.json num_hidden_layers: expected an int >= 1, got none")
test_fail(lambda: moe_layer_indices({"model_type": "mixtral", "num_hidden_layers": 10**12}),
          contains=f"config.json num_hidden_layers: expected <= {SIZE_LIMIT - 1}, got {10**12}")

# %% [markdown]
# ## Quantization schemes
#
# `quantization_config.quant_method` in `config.json` names how a pre-quantized checkpoint stores its weights; moe-lit
# loads two of them as they are. The scheme applies to the experts only when their tensors are stored quantized
# (checked from the keys and dtypes): the router is never quantized, and a family may keep other layers in floats.
#
# | `quant_method` | moe-lit scheme | expert tensors | scale group |
# |---|---|---|---|
# | `fp8` | `fp8_w8a8_block` | `….weight` float8_e4m3fn, `….weight_scale_inv` fp32 | `weight_block_size`, default `[128, 128]` |
# | `mxfp4` | `mxfp4_w4a16` | `experts.*_blocks` uint8, `experts.*_scales` uint8 e8m0 | 1 × 32 |

# %%
#| export
QUANT_METHODS = {s.hf_quant_method: s.name for s in QUANT_SCHEME_TABLE.values() if s.hf_quant_method}   # -> scheme

def quant_scheme_from_hf(cfg: dict,  # a config.json's contents
                        ) -> tuple[str | None, tuple | None]:
    "(moe-lit scheme, scale block shape (rows, cols) in elements) named by config.json's quantization_config; (None, None) without one; ValueError for an unknown method or a bad `weight_block_size`."
    _check_config_dict(cfg)
    q = cfg.get("quantization_config")
    if q is None: return None, None
    if not isinstance(q, dict): raise ValueError(f"config.json quantization_config: expected an object, got {q!r}")
    method = q.get("quant_method")
    if not isinstance(method, str) or method not in QUANT_METHODS:
        raise ValueError(f"config.json quantization_config.quant_method: expected one of {list(QUANT_METHODS)}, "
                         f"got {method!r}")
    if method == "mxfp4": return QUANT_METHODS[method], (1, 32)
    act = q.get("activation_scheme", "dynamic")                    # activations quantized per call, 1×128 groups
    if not (isinstance(act, str) and act.lower() == "dynamic"):    # any case, as transformers' FP8 config reads it                                            # static scales are a different checkpoint format
        raise ValueError(f"config.json quantization_config.activation_scheme: expected 'dynamic' for FP8 block "
                         f"weights (activations are quantized per call), got {act!r}")
    block = q.get("weight_block_size")
    if block is None: block = [128, 128]                            # DeepSeek-V3's, the format's default
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and
            all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 2**16 for b in block)):
        raise ValueError(f"config.json quantization_config.weight_block_size: expected two positive ints (at most "
                         f"{2**16}), got {block!r}")
    from moe_lit.quant_weights import _check_block_shape          # the containers' rule, named by the file's key
    try: _check_block_shape(QUANT_METHODS[method], tuple(block))
    except ValueError as e: raise ValueError(f"config.json quantization_config.weight_block_size {list(block)}: {e}") from None
    return QUANT_METHODS[method], tuple(block)

# %%
#| test quant_scheme_from_hf
test_eq(quant_scheme_from_hf({"model_type": "mixtral"}), (None, None))
test_eq(quant_scheme_from_hf({"quantization_config": {"quant_method": "fp8"}}), ("fp8_w8a8_block", (128, 128)))
test_eq(quant_scheme_from_hf({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 128]}}),
        ("fp8_w8a8_block", (64, 128)))
test_eq(quant_scheme_from_hf({"quantization_config": {"quant_method": "mxfp4"}}), ("mxfp4_w4a16", (1, 32)))
test_fail(lambda: quant_scheme_from_hf({"quantization_config": {"quant_method": "awq"}}),
          contains="config.json quantization_config.quant_method: expected one of")
test_fail(lambda: quant_scheme_from_hf({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}),
          contains="activation_scheme: expected 'dynamic' for FP8 block weights (activations are quantized per call), got 'static'")
test_fail(lambda: quant_scheme_from_hf({"quantization_config": "fp8"}), contains="config.json quantization_config: expected an object")
for bad in (None, [1], "mixtral"):
    test_fail(lambda: quant_scheme_from_hf(bad), contains="cfg: expected a config.json's contents (a dict), got")
    test_fail(lambda: checkpoint_layout(bad), contains="cfg: expected a config.json's contents (a dict), got")
for bad in ([128], [128, 0], [True, 128], "128", [], 0, False, "", {}, [10**12, 1]):
    test_fail(lambda: quant_scheme_from_hf({"quantization_config": {"quant_method": "fp8", "weight_block_size": bad}}),
              contains="config.json quantization_config.weight_block_size: expected two positive ints")
test_fail(lambda: quant_scheme_from_hf({"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 16]}}),
          contains="config.json quantization_config.weight_block_size [32, 16]: block_shape[1]: expected >= 32, got 16")
