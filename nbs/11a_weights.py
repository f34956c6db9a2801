# %%
#| default_exp weights

# %% [markdown]
# # Weight sources
# > Where a layer's weights come from: random per expert, a mapping of tensors, or a checkpoint, behind one small protocol that hands a rank only its own experts.

# %%
#| export
from __future__ import annotations
import math
from collections.abc import Mapping, Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
import torch
from fastcore.basics import patch
from moe_lit.terms import check_int, check_tensor, check_dense, FLOAT_DTYPES
from moe_lit.config import MoEConfig

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# In this notebook: the `WeightSource` protocol, `weight_shapes` (the one table of names and global shapes),
# `RandomExpertWeights` and `TensorWeights`. Checkpoints implement the same protocol (`11c_checkpoint`). A
# **reference** page.
#
# ## The protocol
#
# A layer asks its source for four things, each a dict of CPU tensors named like the layer's own `state_dict`:
#
# | method | keys (shapes for the expert ids asked) | when |
# |---|---|---|
# | `router()` | `gate [E, H]`; `gate_bias [E]`; `e_score_correction_bias [E]` | bias keys only when the config has them |
# | `experts(ids)` | `w13 [n, 2·I, H]` (gate rows then up rows), `w2 [n, H, I]`; `w13_bias [n, 2·I]`, `w2_bias [n, H]` | biases only with `has_expert_bias` |
# | `quantized_experts(ids, scheme)` | a `QuantizedExpertWeights` of the codes as stored, or `None` | pre-quantized checkpoints |
# | `shared()` | `w13 [2·I_s, H]`, `w2 [H, I_s]`; `gate [1, H]` with `shared_expert_gate`; or `None` | shared experts |
#
# `ids` are **global** expert ids: an expert-parallel rank asks only for its own, so a checkpoint rank reads only its
# experts' bytes. Sources return tensors in the dtype they hold; the layer casts, pads to the backend's wire size and
# moves them to its device. `quant_scheme` names the scheme a source stores its experts in (`None`: floats).

# %%
#| export
def weight_shapes(config: MoEConfig) -> dict[str, tuple]:
    """Name -> global shape of every tensor a layer of `config` needs (state_dict names, all experts, unpadded).
    ValueError naming `config` when it is not a `MoEConfig`. Source: vLLM's FusedMoE parameters (`w13_weight
    [E, 2I, H]` gate rows then up rows, `w2_weight [E, H, I]`), under moe-lit's own state_dict names."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    c = config
    E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
    shapes = {"gate": (E, H), "w13": (E, 2 * I, H), "w2": (E, H, I)}
    if c.has_router_bias: shapes["gate_bias"] = (E,)
    if c.has_correction_bias: shapes["e_score_correction_bias"] = (E,)
    if c.has_expert_bias: shapes.update(w13_bias=(E, 2 * I), w2_bias=(E, H))
    if c.num_shared_experts:
        i_s = c.shared_intermediate_size or c.num_shared_experts * I
        shapes.update({"shared_experts.w13": (2 * i_s, H), "shared_experts.w2": (H, i_s)})
        if c.shared_expert_gate: shapes["shared_experts.gate"] = (1, H)
    return shapes

ROUTER_KEYS = ("gate", "gate_bias", "e_score_correction_bias")
EXPERT_KEYS = ("w13", "w2", "w13_bias", "w2_bias")

# %%
#| test weight_shapes
cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=6, num_shared_experts=1,
                shared_intermediate_size=10, shared_expert_gate=True)
test_eq(weight_shapes(cfg), {"gate": (4, 8), "w13": (4, 12, 8), "w2": (4, 8, 6), "shared_experts.w13": (20, 8),
                             "shared_experts.w2": (8, 10), "shared_experts.gate": (1, 8)})
oss = MoEConfig(4, 2, 8, 6, activation="swigluoai", has_expert_bias=True, has_router_bias=True)
test_eq(sorted(weight_shapes(oss)), ["gate", "gate_bias", "w13", "w13_bias", "w2", "w2_bias"])

# %%
#| export
def check_expert_ids(expert_ids, num_experts: int) -> list[int]:
    """`expert_ids` (a sequence or 1-D int32/int64 tensor of global ids) as a list of ints in `[0, num_experts)`.
    ValueError naming `expert_ids` (not a sequence, a set or mapping, a tensor of another rank or dtype) or `expert_ids[k]` at the
    position k of a bad entry (not an int, or out of range). Source: moe-lit's own."""
    if isinstance(expert_ids, torch.Tensor):
        check_tensor("expert_ids", expert_ids, ndim=1, dtype=(torch.int32, torch.int64))
        expert_ids = expert_ids.tolist()
    if isinstance(expert_ids, (str, bytes)) or not hasattr(expert_ids, "__iter__"):
        raise ValueError(f"expert_ids: expected a sequence of ints, got {type(expert_ids).__name__}")
    if isinstance(expert_ids, (AbstractSet, Mapping)):     # the output's rows follow the ids' order: it must have one
        raise ValueError(f"expert_ids: expected an ordered sequence of ints (the rows come back in its order), got "
                         f"{type(expert_ids).__name__}")
    return [check_int(f"expert_ids[{k}]", g, lo=0, hi=num_experts) for k, g in enumerate(expert_ids)]

class WeightSource:
    """The protocol of a layer's weights (see the table above); subclasses implement router, experts and shared.
    The base class checks nothing and raises nothing at construction; its three abstract methods raise
    NotImplementedError. Source: moe-lit's own (vLLM's loader pushes checkpoint tensors through `weight_loader`
    instead)."""
    config: MoEConfig
    quant_scheme: str | None = None           # the scheme the experts are stored in; None = float weights

    def router(self) -> dict[str, torch.Tensor]:
        """`gate [E, H]` and the config's router biases (`gate_bias [E]`, `e_score_correction_bias [E]`), CPU tensors.
        NotImplementedError here: a subclass implements it. Source: moe-lit's own protocol."""
        raise NotImplementedError
    def experts(self, expert_ids) -> dict[str, torch.Tensor]:
        """`w13 [n, 2·I, H]`, `w2 [n, H, I]` (+ biases) of the global `expert_ids`, CPU tensors. NotImplementedError
        here: a subclass implements it (and refuses bad ids with `check_expert_ids`'s ValueError). Source: moe-lit's
        own protocol."""
        raise NotImplementedError
    def shared(self) -> dict[str, torch.Tensor] | None:
        """The shared experts as one MLP (`w13 [2·I_s, H]`, `w2 [H, I_s]`, `gate [1, H]`), or None. NotImplementedError
        here: a subclass implements it. Source: moe-lit's own protocol."""
        raise NotImplementedError

    def quantized_experts(self, expert_ids, scheme: str):
        """The stored codes of `expert_ids` as a `QuantizedExpertWeights` when stored in `scheme`; else None. The base
        returns None for any argument and raises nothing. Source: moe-lit's own protocol."""
        return None

# %% [markdown]
# ## Random weights, one expert at a time
#
# A model's expert weights can be far larger than one machine's memory (DeepSeek-V3: 256 experts × 44 M parameters
# per layer, 22.5 GB in bf16). An expert-parallel rank holds only its own experts, so moe-lit generates weights *per
# global expert*, from a seed derived from `(seed, expert id)`: every rank, and the single-device computation, see
# exactly the same numbers for expert `g` without anyone holding all of them. Weights are scaled so activations stay
# of order 1 through the layer (`w13 ~ N(0, 1/H)`, `w2 ~ N(0, 1/I)`), which keeps the relative-error figures of the
# report meaningful; biases, when the config has them, are small (`N(0, 0.01²)`) like a trained model's.

# %%
#| export
class RandomExpertWeights(WeightSource):
    """Deterministic random weights for a model's MoE layer: expert `g`'s tensors depend only on `(seed, g)`.
    ValueError naming `config` (not a `MoEConfig`) or `seed` (not an int in [0, 2^40)). Source: moe-lit's own."""
    def __init__(self, config: MoEConfig, seed: int = 0):
        if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
        self.config, self.seed = config, check_int("seed", seed, lo=0, hi=2**40)   # seed·1_000_003 + g stays < 2^63

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def router(self) -> dict[str, torch.Tensor]:
        """`gate [num_experts, hidden_size]` fp32 (logits ~ N(0, 1)) holding values of a bf16/fp16 config's dtype, as
        such a checkpoint stores them; and the biases the config has (fp32 `[E]`). Takes no argument; raises nothing.
        Source: moe-lit's own."""
        c, g = self.config, self._gen(0)
        gate = torch.randn(c.num_experts, c.hidden_size, generator=g) / math.sqrt(c.hidden_size)
        if c.dtype in (torch.bfloat16, torch.float16): gate = gate.to(c.dtype).float()   # the layer's router reads that dtype
        out = {"gate": gate}
        if c.has_correction_bias: out["e_score_correction_bias"] = torch.randn(c.num_experts, generator=g) * 0.01
        if c.has_router_bias: out["gate_bias"] = torch.randn(c.num_experts, generator=g) * 0.1
        return out

# %%
#| export
@patch
def experts(self: RandomExpertWeights, expert_ids) -> dict[str, torch.Tensor]:
    """Stacked weights of the global experts `expert_ids`: `w13 [n, 2·I, H]`, `w2 [n, H, I]` (+ biases), config dtype.
    ValueError from `check_expert_ids` naming `expert_ids` or `expert_ids[k]`. Source: moe-lit's own."""
    c = self.config
    ids = check_expert_ids(expert_ids, c.num_experts)
    n, I, H = len(ids), c.intermediate_size, c.hidden_size
    out = {"w13": torch.empty(n, 2 * I, H, dtype=c.dtype), "w2": torch.empty(n, H, I, dtype=c.dtype)}
    if c.has_expert_bias: out.update(w13_bias=torch.empty(n, 2 * I, dtype=c.dtype), w2_bias=torch.empty(n, H, dtype=c.dtype))
    inference = torch.is_inference_mode_enabled()   # thread-local: the pool's threads fill in the caller's mode
    def fill(j, g):                      # torch's CPU generator is serial: one thread per expert instead
        with torch.inference_mode(inference):
            gen = self._gen(g + 1)
            out["w13"][j].normal_(0.0, 1.0 / math.sqrt(H), generator=gen)
            out["w2"][j].normal_(0.0, 1.0 / math.sqrt(I), generator=gen)
            if c.has_expert_bias:
                out["w13_bias"][j].normal_(0.0, 0.01, generator=gen); out["w2_bias"][j].normal_(0.0, 0.01, generator=gen)
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(fill, range(n), ids))
    return out

@patch
def shared(self: RandomExpertWeights) -> dict[str, torch.Tensor] | None:
    """The shared experts as one MLP: `w13 [2·I_s, H]`, `w2 [H, I_s]` (+ `gate [1, H]`); None without shared experts.
    Takes no argument; raises nothing. Source: moe-lit's own."""
    c = self.config
    if not c.num_shared_experts: return None
    shapes = weight_shapes(c)
    i_s, H = shapes["shared_experts.w2"][1], c.hidden_size
    gen = self._gen(c.num_experts + 1)
    out = {"w13": torch.empty(2 * i_s, H, dtype=c.dtype).normal_(0.0, 1.0 / math.sqrt(H), generator=gen),
           "w2": torch.empty(H, i_s, dtype=c.dtype).normal_(0.0, 1.0 / math.sqrt(i_s), generator=gen)}
    if c.shared_expert_gate: out["gate"] = torch.empty(1, H, dtype=c.dtype).normal_(0.0, 1.0 / math.sqrt(H), generator=gen)
    return out


# %%
#| test random_weights_are_per_expert
cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8)
src = RandomExpertWeights(cfg, seed=3)
a, b = src.experts([0, 1, 2, 3, 4, 5]), src.experts([4, 1])
assert torch.equal(a["w13"][[4, 1]], b["w13"]) and torch.equal(a["w2"][[4, 1]], b["w2"])   # the same expert, whoever asks
assert not torch.equal(a["w13"][0], a["w13"][1])                                           # different experts differ
test_eq((a["w13"].dtype, sorted(a)), (torch.bfloat16, ["w13", "w2"]))
test_fail(lambda: src.experts([6]), contains="expert_ids[0]: expected <= 5, got 6")
test_fail(lambda: src.experts([1, 2.7]), contains="expert_ids[1]: expected an int, got float")
test_fail(lambda: src.experts("12"), contains="expert_ids: expected a sequence of ints, got str")
for unordered in ({2, 1}, frozenset({1}), {1: 0}):
    test_fail(lambda: src.experts(unordered), contains="expert_ids: expected an ordered sequence of ints")
test_fail(lambda: RandomExpertWeights(cfg, seed=10**14), contains="seed: expected <= 1099511627775")
oss = RandomExpertWeights(cfg.replace(has_expert_bias=True, has_router_bias=True), seed=3)
test_eq(sorted(oss.experts([1])), ["w13", "w13_bias", "w2", "w2_bias"]); test_eq(sorted(oss.router()), ["gate", "gate_bias"])
assert torch.equal(oss.experts([1, 5])["w2_bias"][0], oss.experts([1])["w2_bias"][0])

# %% [markdown]
# ## A mapping of tensors
#
# `TensorWeights` wraps the tensors a user already has — for *all global experts*, named as in `weight_shapes` — and
# checks every name and shape once, at construction: a missing tensor, an unknown name or a wrong shape is a
# `ValueError` naming the key and both shapes. `FusedMoE(config, weights={...})` wraps a dict this way.

# %%
#| export
class TensorWeights(WeightSource):
    """A mapping of global tensors named like the layer's state_dict (see `weight_shapes`), served per expert.
    ValueError naming `config` (not a `MoEConfig`), `weights` (sic: the argument is `tensors`; not a mapping, or keys
    the config has no use for) or `weights[key]` (missing, wrong shape, not float, not dense). Source: moe-lit's own."""
    def __init__(self, config: MoEConfig, tensors: Mapping):
        shapes = weight_shapes(config)
        if not isinstance(tensors, Mapping): raise ValueError(f"weights: expected a mapping of tensors, got {type(tensors).__name__}")
        unknown = sorted(set(tensors) - set(shapes), key=repr)          # (keys of any type: sorted by their repr)
        if unknown: raise ValueError(f"weights: expected only the keys {sorted(shapes)} for this config, got {unknown}")
        for key, shape in shapes.items():
            if key not in tensors: raise ValueError(f"weights[{key!r}]: expected a tensor of shape {list(shape)}, got none")
            check_dense(f"weights[{key!r}]", check_tensor(f"weights[{key!r}]", tensors[key], shape=shape, dtype=FLOAT_DTYPES))
        self.config, self.tensors = config, dict(tensors)

    def router(self):
        "The router's tensors as given (`gate [E, H]`, biases `[E]`). Raises nothing. Source: moe-lit's own."
        return {k: self.tensors[k] for k in ROUTER_KEYS if k in self.tensors}

    def experts(self, expert_ids):
        """`w13 [n, 2·I, H]`, `w2 [n, H, I]` (+ biases) of the global `expert_ids`, copied to the CPU. ValueError from
        `check_expert_ids` naming `expert_ids` or `expert_ids[k]`. Source: moe-lit's own."""
        ids = torch.tensor(check_expert_ids(expert_ids, self.config.num_experts), dtype=torch.long)
        return {k: self.tensors[k][ids.to(self.tensors[k].device)].cpu() for k in EXPERT_KEYS if k in self.tensors}

    def shared(self):
        """The `shared_experts.*` tensors without the prefix (`w13 [2·I_s, H]`, `w2 [H, I_s]`, `gate [1, H]`), or None.
        Raises nothing. Source: moe-lit's own."""
        if not self.config.num_shared_experts: return None
        return {k.split(".", 1)[1]: v for k, v in self.tensors.items() if k.startswith("shared_experts.")}

# %%
#| test tensor_weights
cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=6, dtype=torch.float32)
full = {"gate": torch.randn(4, 8), "w13": torch.randn(4, 12, 8), "w2": torch.randn(4, 8, 6)}
src = TensorWeights(cfg, full)
assert torch.equal(src.experts([3, 1])["w13"], full["w13"][[3, 1]]); test_eq(src.shared(), None)
test_fail(lambda: TensorWeights(cfg, {**full, "w2": torch.randn(4, 6, 8)}),
          contains="weights['w2']: expected shape [4, 8, 6], got [4, 6, 8]")
test_fail(lambda: TensorWeights(cfg, {k: v for k, v in full.items() if k != "gate"}), contains="weights['gate']: expected a tensor")
test_fail(lambda: TensorWeights(cfg, {**full, "w13_bias": torch.zeros(4, 12)}), contains="weights: expected only the keys ['gate', 'w13', 'w2'] for this config, got ['w13_bias']")
test_fail(lambda: TensorWeights(cfg, [1, 2]), contains="weights: expected a mapping of tensors, got list")
