# %%
#| default_exp layer

# %% [markdown]
# # The MoE layer
# > FusedMoE: router, placement and one rank's expert weights in an nn.Module, and the emulated expert-parallel run whose ranks must sum to the single-device result.

# %%
#| export
from __future__ import annotations
import inspect, os, sys, time, dataclasses
from dataclasses import dataclass, field
import torch
from fastcore.basics import patch
from moe_lit.terms import check_int, check_tensor, check_choice, check_bool, check_finite, check_dense, progress, FLOAT_DTYPES, acc_dtype
from moe_lit.terms import check_device, gradient_wanted, triton_interpreting, triton_imported_interpreting, env_choice
from moe_lit.config import ActivationFormat, MoEConfig, ParallelConfig, BACKENDS
from collections.abc import Mapping
from moe_lit.routing import select_experts, router_logits, check_topk_ids
from moe_lit.placement import Placement, PLACEMENT_TABLES, PLACEMENT_STRATEGIES, eplb_replicas, map_to_physical
from moe_lit.formats import moe_reference_standard, Activation
from moe_lit.weights import WeightSource, RandomExpertWeights, TensorWeights, weight_shapes
from moe_lit.modular import ModularKernel, SharedExperts, make_prepare_finalize, make_experts, dispatch_quantization
from moe_lit.oracle import DEVICES, CPU_INTERPRETER, CANDIDATES, KERNEL_DTYPES, HALF_DTYPES, detect_device, select_experts_backend
from moe_lit.quant import quant_scheme_name
from moe_lit.quant_weights import QUANT_TENSORS, QuantizedExpertWeights

# %%
#| hide
from moe_lit.formats import expert_mlp
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close, record_launches, record_fills, assert_compiles_for_gpu, check_launch_keys
from moe_lit.kernels.batched import DEVICE
from moe_lit.testing import check_tolerance, check_output
from moe_lit.quant import QUANT_SCHEMES
from types import SimpleNamespace
import copy, io
import triton
from moe_lit.quant_weights import quantize_expert_weights
import moe_lit.kernels.batched as kb
from moe_lit.layer import _PlanRecorder
from moe_lit.kernels.contiguous import TritonExperts
from unittest import mock
import moe_lit.layer as layer_mod
import safetensors.torch, tempfile
from moe_lit.models import preset
import moe_lit.kernels.router as kr

# %% [markdown]
# In this notebook: `FusedMoE` (one rank's layer, from any weight source of `11a_weights` or a checkpoint) and
# `run_emulated_ep` (every rank of a deployment in turn, checked against the single-device and the float64 results).
# A **how-to** page with the reference of each symbol. The calls a user makes are in one cell, under *Using the layer*.
#
# Words from other chapters: slab, prepare / finalize, placement, `expert_map` and oracle are in the overview's list
# (`index`), every tensor name in `00_terms`; the ModularKernel (`10_modular`) is prepare → experts → finalize in one
# object; the descriptor table is `01_config`'s record per all2all backend; pair blocks (one block of the GEMM per
# token-expert pair at decode) are `08_kernels.contiguous`'s; PDL, programmatic dependent launch (a kernel's launch
# overlapping the end of the one before, sm_90+), and the split-K arrival counters are `06_kernels.batched`'s; EPLB,
# replicated experts, is `04_placement`'s.

# %% [markdown]
# ## FusedMoE: one rank's layer
#
# The layer holds the router (replicated on every rank), the rank's placement and only its local experts' weights.
# `forward` routes, turns global expert ids into the rank's local slots (through `expert_map`, or through
# `global_to_physical` when the backend addresses experts by physical id), and runs the experts (torch reference or
# Triton) **in the format the deployment's backend declares**: `config.activation_format`, a read of the descriptor table — there is no other
# place that decides it.

# %% [markdown]
# **Which experts run.** The activation format decides the *family* of experts — BatchedExperts slabs need batched
# experts (`06_kernels.batched`, `07_kernels.dispatch`), a flat token list needs the contiguous path
# (`08_kernels.contiguous`) — and the device decides the implementation within it: the Triton kernels on a GPU, the
# torch reference of the same contract on the CPU, where Triton would run in its slow interpreter.
# `experts="triton"` forces the kernels; without a GPU they run in Triton's interpreter, which needs
# `TRITON_INTERPRET=1` set before Triton is imported (the `moe-lit` command and the test command set it), and a layer
# built otherwise says so by name. *Using the layer*, after the CUDA graphs and launch plans below, shows the calls a
# user makes.

# %%
#| export
def _check_interpreter_switch():
    "TRITON_INTERPRET as moe-lit's kernels and Triton were imported with (they keep the switch they saw), else ValueError."
    kb = sys.modules.get("moe_lit.kernels.batched")
    if kb is not None and kb.INTERPRET != triton_interpreting():
        raise ValueError(f"TRITON_INTERPRET: expected the setting it had when moe_lit.kernels was imported (interpreter "
                         f"{'on' if kb.INTERPRET else 'off'}; set it before that import), got "
                         f"{os.environ.get('TRITON_INTERPRET', '(unset)')!r}")
    std = triton_imported_interpreting()                   # and so do Triton's own @jit helpers
    if std is not None and std != triton_interpreting():
        raise ValueError(f"TRITON_INTERPRET: expected the setting it had when triton was imported (interpreter "
                         f"{'on' if std else 'off'}; set it before anything imports triton), got "
                         f"{os.environ.get('TRITON_INTERPRET', '(unset)')!r}")

def resolve_experts(experts: str, activation_format: ActivationFormat, device: torch.device,
                    quant: str = "unquantized", config: MoEConfig | None = None, backend: str | None = None,
                   ) -> tuple[str, str]:
    """`(implementation, reason)`: 'triton', 'triton_quant' or 'torch' for the requested `experts` ('auto', 'triton',
    'torch'). ValueError naming `experts` (unknown; 'triton' for a float64 layer, on the CPU without the interpreter, on
    a GPU that cannot run the kernels, or disagreeing with a forced `backend`), `config` (None with a `backend`),
    `quant` (unknown; Triton quantized kernels on a layer that is not bf16/fp16), `TRITON_INTERPRET` (changed since the
    kernels were imported), and `select_experts_backend`'s own (`backend`, `quant_scheme`). Source: vLLM's oracle entry
    points (`select_*_moe_backend`, fused_moe/oracle/); the fallbacks without a GPU are moe-lit's own."""
    check_choice("experts", experts, ("auto", "triton", "torch")); quant = quant_scheme_name(quant)
    fmt, q = activation_format.value, quant != "unquantized"
    if experts == "triton" and config is not None and config.dtype not in KERNEL_DTYPES:   # (the oracle's record)
        raise ValueError(f"experts: expected 'torch' or 'auto' for a {str(config.dtype)[6:]} layer (the Triton kernels "
                         f"run {', '.join(str(d)[6:] for d in KERNEL_DTYPES)}), got 'triton'")
    if backend is not None or (experts == "auto" and device.type == "cuda" and config is not None):
        if config is None: raise ValueError("config: expected the MoEConfig when a backend is forced, got None")
        caps = detect_device() if device.type == "cuda" else \
            CPU_INTERPRETER if experts == "triton" and triton_interpreting() else DEVICES["cpu"]   # Triton's, asked for
        d = select_experts_backend(config, quant, activation_format, caps, backend)   # the oracle decides
        impl = d.chosen.implementation
        if impl != "torch": _check_interpreter_switch()
        if experts != "auto" and (impl == "torch") != (experts == "torch"):    # two requests that disagree: not guessed
            raise ValueError(f"experts: expected 'auto' or the implementation of backend {d.chosen.name!r} "
                             f"({'torch' if impl == 'torch' else 'triton'}), got {experts!r}")
        return impl, f"oracle: {d.chosen.name} — {dict((n, r) for n, _, r in d.trace)[d.chosen.name]}"
    kernels = ("Triton dispatch, batched GEMMs and combine" if activation_format is ActivationFormat.BatchedExperts
               else "Triton alignment, fused-MoE GEMMs and slot sum") + (f" on {quant} weights" if q else "")
    deq = f" on {quant} weights dequantized once (an emulation)" if q else ""
    if experts == "torch": return "torch", f"requested: the torch reference of the {fmt} contract{deq}"
    if experts != "torch": _check_interpreter_switch()
    if experts == "triton" and device.type == "cpu" and not triton_interpreting():
        raise ValueError("experts: expected a CUDA GPU for the Triton kernels, or TRITON_INTERPRET=1 set before "
                         "triton and moe_lit.kernels are imported (Triton's CPU interpreter; the moe-lit command sets it), got "
                         f"device cpu with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')!r}")
    impl = "triton_quant" if q else "triton"
    if impl == "triton_quant" and experts == "triton" and config is not None and config.dtype not in HALF_DTYPES:
        raise ValueError(f"quant: expected a bf16 or fp16 layer for the Triton {quant} kernels, got dtype "
                         f"{str(config.dtype)[6:]} (build it with experts='torch' or a bf16/fp16 config; on the command line --experts "
                         f"torch or --dtype bf16 / fp16)")
    if experts == "triton" and device.type == "cuda" and not triton_interpreting():   # the oracle's record of the
                                                                                         # kernels: this GPU runs them
        cand = next(c for c in CANDIDATES if c.implementation == impl and c.activation_format is activation_format
                    and quant in c.quant_schemes)
        ok, why = cand.check(detect_device())
        if not ok:
            raise ValueError(f"experts: expected a GPU that runs {cand.name} for 'triton' on {quant} weights, got one "
                             f"that does not ({why}); experts='auto' lets the oracle choose (e.g. the weights dequantized)")
    if experts == "triton": return impl, f"requested: {kernels}" + ("" if device.type == "cuda" else
                                                                    " (CPU: in the Triton interpreter)")
    if device.type == "cuda": return impl, f"format {fmt} on a GPU: {kernels}"
    return "torch", f"format {fmt} on the CPU: the torch reference{deq}; --experts triton (from Python: experts='triton' with TRITON_INTERPRET=1) runs the kernels in the interpreter"

# %%
#| hide
import moe_lit.kernels.batched as kb

# %%
#| hide
import subprocess, sys, os

# %%
#| test resolve_experts
B, S = ActivationFormat.BatchedExperts, ActivationFormat.Standard
test_eq(resolve_experts("auto", B, torch.device("cuda"))[0], "triton")
test_eq(resolve_experts("auto", B, torch.device("cpu"))[0], "torch")
test_eq(resolve_experts("triton", S, torch.device("cuda"))[0], "triton")
test_eq(resolve_experts("auto", S, torch.device("cpu"))[0], "torch")
test_fail(lambda: resolve_experts("cutlass", B, torch.device("cpu")), contains="experts: expected one of")
f64 = MoEConfig(8, 2, 64, 32, dtype=torch.float64)          # the kernels' dtypes: the oracle's record, one place
test_fail(lambda: resolve_experts("triton", B, torch.device("cpu"), config=f64),
          contains="experts: expected 'torch' or 'auto' for a float64 layer (the Triton kernels run bfloat16, float16, float32)")
# the interpreter switch, in fresh processes without it: the refusal imports no Triton, so setting it afterwards
head = ["import os, sys, torch", "from moe_lit.config import MoEConfig", "from moe_lit.layer import FusedMoE",
        "c = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32)"]   # works; Triton imported
# without it is refused (lines, not one string: a test's body is indented)
after = "\n".join(head + ["try: FusedMoE(c, experts='triton')",
                           "except ValueError: print('refused', 'triton' in sys.modules)",
                           "os.environ['TRITON_INTERPRET'] = '1'",
                           "print(FusedMoE(c, experts='triton')(torch.randn(2, 64, dtype=torch.bfloat16)).shape)"])
early = "\n".join(head + ["import triton.language", "os.environ['TRITON_INTERPRET'] = '1'",
                           "try: FusedMoE(c, experts='triton')", "except ValueError as e: print(e)",
                           "try: FusedMoE(c, experts='triton', backend='triton_contiguous')",   # forced: the same
                           "except ValueError as e: print(e)"])
env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
if not torch.cuda.is_available():
    r = subprocess.run([sys.executable, "-c", after], capture_output=True, text=True, env=env, timeout=600)
    test_eq(r.stdout.split("\n")[:2], ["refused False", "torch.Size([2, 64])"])
    r = subprocess.run([sys.executable, "-c", early], capture_output=True, text=True, env=env, timeout=600)
    assert r.stdout.count("TRITON_INTERPRET: expected the setting it had when triton was imported (interpreter off") == 2, r.stdout + r.stderr[-800:]
    bad_switch = "\n".join(head + ["try: FusedMoE(c, experts='triton', quant='fp8')",     # a quant kernel's switch
                                    "except ValueError as e: print('at construction:', e)"])  # is read when built
    r = subprocess.run([sys.executable, "-c", bad_switch], capture_output=True, text=True, timeout=600,
                       env={**env, "TRITON_INTERPRET": "1", "MOE_LIT_FP4_PREFETCH": "3"})
    assert "at construction: MOE_LIT_FP4_PREFETCH: expected '0' or '1' or '2' or '4' or '8', got '3'" in r.stdout, r.stdout + r.stderr[-800:]
test_eq(resolve_experts("triton", S, torch.device(DEVICE), "fp8_w8a8_block")[0], "triton_quant")
# an explicit 'triton' on a GPU without FP8 tensor cores (an A100):
with mock.patch.dict(resolve_experts.__globals__, detect_device=lambda: DEVICES["a100"],   # where resolve_experts
                     triton_interpreting=lambda: False, _check_interpreter_switch=lambda: None):   # looks them up
    for fmt in (S, B):                              # refused by the oracle's record, not run on unsupported hardware
        test_fail(lambda: resolve_experts("triton", fmt, torch.device("cuda"), "fp8"),
                  contains="experts: expected a GPU that runs triton_")
        test_fail(lambda: resolve_experts("triton", fmt, torch.device("cuda"), "fp8"),
                  contains="needs compute capability >= (8, 9), a100 has (8, 0)")
    test_eq(resolve_experts("triton", S, torch.device("cuda"), "mxfp4")[0], "triton_quant")   # w4a16: sm80 and up
    test_eq(resolve_experts("triton", B, torch.device("cuda"))[0], "triton")
impl, why = resolve_experts("auto", B, torch.device("cpu"), "mxfp4_w4a16")
assert impl == "torch" and "dequantized once (an emulation)" in why
impl, why = resolve_experts("auto", S, torch.device("cpu"), "nvfp4_w4a16", MoEConfig(8, 2, 64, 32), backend="torch_standard")
assert impl == "torch" and why.startswith("oracle: torch_standard")
test_fail(lambda: resolve_experts("triton", S, torch.device("cpu"), "unquantized", MoEConfig(8, 2, 64, 32),
                                  backend="torch_standard"), contains="experts: expected 'auto' or the implementation of backend 'torch_standard' (torch), got 'triton'")
test_fail(lambda: resolve_experts("auto", S, torch.device("cpu"), "nvfp4_w4a16", MoEConfig(8, 2, 64, 32),
                                  backend="triton_contiguous_w4a16"), contains="needs a CUDA GPU")
if not torch.cuda.is_available():          # asked for Triton on the CPU (the interpreter): a forced backend of its own
    impl, why = resolve_experts("triton", S, torch.device("cpu"), "nvfp4_w4a16", MoEConfig(8, 2, 64, 32),
                                backend="triton_contiguous_w4a16")
    assert impl == "triton_quant" and why.startswith("oracle: triton_contiguous_w4a16 — runs in Triton's CPU interpreter"), why
test_fail(lambda: resolve_experts("auto", S, torch.device("cpu"), "int3"), contains="quant: expected one of")
assert "fp8_w8a8_block weights dequantized once" in resolve_experts("auto", S, torch.device("cpu"), "fp8")[1]   # short name
test_fail(lambda: resolve_experts("triton", S, torch.device(DEVICE), "fp8_w8a8_block", MoEConfig(8, 2, 64, 32, dtype=torch.float32)),
          contains="quant: expected a bf16 or fp16 layer")
test_fail(lambda: check_device("bogus"), contains="device: expected 'cpu', 'cuda' or a torch.device, got 'bogus'")
test_fail(lambda: check_device(None), contains="device: expected")
saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "0" if kb.INTERPRET else "1"     # flipped after the kernels were imported: named
try: test_fail(lambda: resolve_experts("triton", S, torch.device(DEVICE)),
               contains="TRITON_INTERPRET: expected the setting it had when moe_lit.kernels was imported")
finally:
    if saved is None: os.environ.pop("TRITON_INTERPRET")
    else: os.environ["TRITON_INTERPRET"] = saved

# %%
#| export
_ROUTER = ("gate", "gate_bias", "e_score_correction_bias")   # the router's tensors: fp32, replicated

class FusedMoE(torch.nn.Module):
    """One EP rank's MoE layer: router, placement and local expert weights; forward through a ModularKernel.

    config: the model and its deployment (MoEConfig; `config.parallel` says which EP rank this is).
    weights: a WeightSource, a mapping of global tensors named like the state_dict, or None (random from `seed`).
    placement: 'linear' or 'round_robin' (resolved against the backend's record). experts: 'auto', 'triton', 'torch'.
    device: 'cpu', 'cuda' or a torch.device. quant: a scheme of QUANT_SCHEMES or a short name of QUANT_ALIASES. backend: an experts backend to force.
    debug: re-check the layer's own values on every call (host syncs; see "The hot path").
    forward(hidden [T, H] config.dtype, topk=None, add_shared=True) -> [T, H]; route(hidden) -> (topk_weights [T, top_k]
    fp32, topk_ids [T, top_k] in config.topk_indices_dtype); capture(batch_sizes) records CUDA graphs.
    Raises ValueError naming the argument for a bad config, weights, device, quant, backend or input.
    Source: vLLM's FusedMoE layer (vllm/model_executor/layers/fused_moe/layer.py) and its modular kernel design."""
    @torch.inference_mode(False)  # the layer's tensors keep version counters (in-place edits are followed), whatever the mode
    def __init__(self, config: MoEConfig,
                 weights: WeightSource | Mapping | None = None,  # a source, a mapping of global tensors, or None: random
                 placement: str = "linear", seed: int = 0, experts: str = "auto", device: str | torch.device = "cpu",
                 quant: str = "unquantized", backend: str | None = None,
                 debug: bool = False):   # re-check values on every call (see "The hot path"): host syncs
        super().__init__()
        self.debug = check_bool("debug", debug)
        if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
        check_choice("placement", placement, PLACEMENT_STRATEGIES)       # named as the caller knows it, not `strategy`
        try: asked = torch.device(device).type == "meta"        # device="meta", or `with torch.device("meta"):` around it
        except (RuntimeError, TypeError): asked = False         # (check_device names a bad one below)
        if asked or torch.get_default_device().type == "meta":
            what = "a device" if asked else "torch's default device"
            raise ValueError(f"device: expected {what} to hold values while the layer is built (it makes or loads "
                             f"weights and checks them), got meta; build it, then .to('meta'), or load a checkpoint "
                             f"with FusedMoE.from_pretrained")
        device, quant = check_device(device), quant_scheme_name(quant)   # 'fp8' -> 'fp8_w8a8_block'
        self.experts, self.experts_reason = resolve_experts(experts, config.activation_format, device, quant, config,
                                                            backend)
        self.quant = quant
        self.config, self.activation = config, Activation.of(config)
        self.placement = Placement.build(config, strategy=placement)
        source = _weight_source(config, weights, seed)
        for name, t in _checked(source.router(), config, _ROUTER,
                                source=source).items():
            self.register_buffer(name, None if t is None else   # [E, H] / [E] fp32, replicated, dense: the layer's own
                                 t.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True))
        self._load_experts(source, device)
        shared = source.shared()
        if (shared is None) != (not config.num_shared_experts):
            raise ValueError(f"weights: expected shared experts iff num_shared_experts > 0 "
                             f"({config.num_shared_experts}), got {'none' if shared is None else 'some'}")
        if shared is not None:
            shared = _checked({f"shared_experts.{k}": v for k, v in shared.items()}, config,
                              ("shared_experts.w13", "shared_experts.w2", "shared_experts.gate"), source=source)
            shared = [None if t is None else t.to(config.dtype).to(device) for t in shared.values()]
        self.shared_experts = None if shared is None else SharedExperts(*shared)
        self._register_load_state_dict_pre_hook(_refuse_quantized_state, with_module=True)
        self.register_load_state_dict_post_hook(_requantize_after_load)
        self._build_hot_path()

# %% [markdown]
# **Where the weights come from.** `weights` is any `WeightSource` (`11a_weights`: random, a mapping, a checkpoint)
# or a plain mapping of global tensors named like the layer's `state_dict`, which the layer wraps in `TensorWeights`.
# The layer asks the source for its own experts only (`placement.local_to_global`), checks every tensor's name and
# shape once, here, casts to the layer's dtype and pads `hidden_size` to the backend's wire size with zeros (zero
# columns of `w13`, zero rows of `w2` and `w2_bias`). A source built for another model — other shapes, biases,
# activation or shared experts — is refused by naming both.
#
# **The state_dict.** `gate [num_experts, H]` fp32 (with `gate_bias` and `e_score_correction_bias` where the family
# has them), `w13 [E_local, 2·I, H_padded]` — the gate projection's rows, then the up projection's (transformers'
# `gate_proj` then `up_proj`; vLLM's `w13_weight`) —, `w2 [E_local, H_padded, I]` (`down_proj`; `w2_weight`), the
# experts' biases where the family has them, `shared_experts.w13` and `.w2` with shared experts (and `.gate` where the
# family gates them), and `_extra_state` (the local experts' global ids). `H_padded` is `config.padded_hidden_size`:
# `hidden_size` itself unless the tokens travel through an all2all backend that sends only some sizes (NIXL EP and
# DeepEP low-latency: the next of their supported sizes, so 2880 becomes 3072 and a small test shape's 64 becomes
# 2048). A state_dict holds the padded tensors, so it loads into a layer of the same deployment; for
# another, build from the unpadded source (`weights=`, `from_pretrained`).

# %%
#| export
def _facts(c: MoEConfig) -> tuple:
    "What a weight source must agree on with the layer (its dtype may differ: the layer casts)."
    act = (c.activation, c.swiglu_alpha, c.swiglu_limit) if c.activation == "swigluoai" else c.activation
    return (c.num_experts, c.hidden_size, c.intermediate_size, c.has_correction_bias, c.has_router_bias,
            c.has_expert_bias, act, c.num_shared_experts, c.shared_intermediate_size, c.shared_expert_gate)

def _ids_text(t: torch.Tensor) -> str:
    "Int64 expert ids on the host for a message: the list, a long one abridged."
    return str(t.tolist()) if t.numel() <= 16 else f"{str(t[:8].tolist())[:-1]}, ... ({t.numel()} ids)"

def _expert_ids_arg(name: str, t) -> torch.Tensor:
    "`t` as the `[n]` int64 host tensor of expert ids a FusedMoE state_dict's `_extra_state` holds; ValueError naming `name`."
    if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype in (torch.int32, torch.int64) and not t.is_meta):
        got = type(t).__name__ if not isinstance(t, torch.Tensor) else \
            f"a {str(t.dtype)[6:]} tensor of shape {list(t.shape)}" + (" on meta (no values)" if t.is_meta else "")
        raise ValueError(f"{name}: expected the 1-D int32/int64 tensor of logical expert ids a FusedMoE's state_dict "
                         f"carries, got {got}")
    return t.detach().to("cpu", torch.int64)

_SLOT_TENSORS = ("w13", "w2", "w13_bias", "w2_bias")   # a state_dict's tensors with one row per expert slot

def _first_slots(name: str,            # the state_dict in messages: "weights" or "state_dict"
                 tensors: Mapping,      # the state_dict (its `_SLOT_TENSORS` that are tensors are compared)
                 ids: torch.Tensor,     # [slots] int64: the logical expert of each slot
                 prefix: str = "",
                 checked: bool = False, # the tensors were found dense and finite already (the load's pre-hook)
                ) -> dict:
    """`{logical id: its first slot}`; ValueError naming the tensor when one has not a row per id (`ids`' length), is
    not dense, or is not finite, and naming both slots when two replicas of one logical expert (EPLB's redundant
    slots) hold different weights — which copy a token reaches is the router's choice, so both must be the expert.
    Without replicas nothing is compared, and the values are left to the caller's own checks."""
    slots, replicas = {}, len(set(ids.tolist())) < len(ids)
    for n in _SLOT_TENSORS:
        t = tensors.get(prefix + n)
        if not isinstance(t, torch.Tensor): continue
        key = f"{name}[{prefix + n!r}]"
        if t.dim() == 0 or t.shape[0] != len(ids):
            raise ValueError(f"{key}: expected {len(ids)} rows, one per expert id of its _extra_state, got shape "
                             f"{list(t.shape)}")
        if replicas and not checked: check_finite(key, check_dense(key, t))   # (before comparing: NaN is no replica's value)
        slots[n] = t
    first = {}
    for p, e in enumerate(ids.tolist()):
        q = first.setdefault(e, p)
        if q == p: continue
        for n, t in slots.items():
            if not torch.equal(t[p], t[q]):
                raise ValueError(f"{name}[{prefix + n!r}]: expected slots {q} and {p}, replicas of logical expert {e}, "
                                 f"to hold the same weights, got different ones")
    return first

def _weight_source(config: MoEConfig, weights, seed: int) -> WeightSource:
    "`weights` as a WeightSource for `config`: random from `seed` when None, a mapping wrapped in TensorWeights."
    if weights is None: return RandomExpertWeights(config, seed)
    if isinstance(weights, Mapping):
        if "_extra_state" in weights:                # a FusedMoE state_dict: global only if it holds every expert
            ids, n = _expert_ids_arg("weights['_extra_state']", weights["_extra_state"]), config.num_experts
            if sorted(set(ids.tolist())) != list(range(n)):
                raise ValueError(f"weights['_extra_state']: expected the ids 0 .. {n - 1} of a single-device layer's "
                                 f"state_dict (global tensors: every expert, EPLB replicas too), got {_ids_text(ids)}: "
                                 f"one rank's state_dict holds only its experts; load it into that rank's layer with "
                                 f"load_state_dict")
            weights = {k: v for k, v in weights.items() if k != "_extra_state"}
            first = _first_slots("weights", weights, ids)   # every slot tensor a row per id; replicas alike
            if not torch.equal(ids, torch.arange(n)):    # EPLB's replicas, or another order: each expert from its first slot
                rows = torch.tensor([first[e] for e in range(n)])
                weights = {k: (v[rows.to(v.device)] if k in _SLOT_TENSORS and isinstance(v, torch.Tensor) else v)
                           for k, v in weights.items()}
        return TensorWeights(config, weights)
    if not isinstance(weights, WeightSource) or not isinstance(getattr(weights, "config", None), MoEConfig):
        raise ValueError(f"weights: expected a WeightSource (RandomExpertWeights, TensorWeights, CheckpointWeights) with "
                         f"a MoEConfig, or a mapping of tensors, got {type(weights).__name__}")
    if _facts(weights.config) != _facts(config):
        raise ValueError(f"weights: expected weights for (num_experts, hidden_size, intermediate_size, correction bias, "
                         f"router bias, expert bias, activation, shared experts, shared width, shared gate) = "
                         f"{_facts(config)}, got {_facts(weights.config)}")
    return weights

def _checked(tensors: dict, config: MoEConfig, names: tuple, num: int | None = None,
             expert_ids: list | None = None,   # the global experts asked (`num` of them): a non-finite value names its expert
             source=None) -> dict:             # the WeightSource: a checkpoint's description names the file
    "`{name: tensor or None}` for `names`: present and of the right shape iff the config needs it (`num`: experts asked)."
    shapes = weight_shapes(config)
    want = [n for n in names if n in shapes]
    if not isinstance(tensors, dict) or set(tensors) - set(want):
        raise ValueError(f"weights: expected the tensors {want}, got {sorted(tensors) if isinstance(tensors, dict) else tensors!r}")
    out = {}
    for n in names:
        if n not in shapes: out[n] = None; continue
        shape = shapes[n] if num is None or n.startswith("shared") or n in ("gate", "gate_bias") else (num, *shapes[n][1:])
        if n not in tensors: raise ValueError(f"weights[{n!r}]: expected a tensor of shape {list(shape)}, got none")
        t = check_dense(f"weights[{n!r}]", check_tensor(f"weights[{n!r}]", tensors[n], shape=shape, dtype=FLOAT_DTYPES))
        per_expert = expert_ids is not None and len(shape) > 1 and shape[0] == len(expert_ids)
        out[n] = _finite(f"weights[{n!r}]", t, expert_ids if per_expert else None, source)
        held = torch.float32 if n in _ROUTER else config.dtype   # the router's: fp32
        if t.dtype != held:                                                                  # cast: finite there too
            _finite(f"weights[{n!r}] in {held}", t.to(held), expert_ids if per_expert else None, source)
    return out

def _finite(name: str, t: torch.Tensor, expert_ids, source) -> torch.Tensor:
    "`check_finite`, its error completed with the global expert of the first bad value and a checkpoint's description."
    try: return check_finite(name, t)
    except ValueError as e:
        where = [] if expert_ids is None else [f"index 0 is the expert: global expert {expert_ids[int((~torch.isfinite(t)).nonzero()[0][0])]}"]
        if hasattr(source, "description"): where.append(f"from {source.description}")
        raise ValueError(f"{e} ({'; '.join(where)})" if where else str(e)) from None


# %%
#| export
@patch
def _load_experts(self: FusedMoE, source: WeightSource, device: torch.device):
    "This rank's experts from `source`: checked, cast, padded, quantized (or their stored codes taken as they are)."
    c = self.config
    ids = (self.placement.local_to_global % c.num_experts).tolist()   # EPLB: physical p holds logical p % num_experts
    self._expert_ids = torch.tensor(ids, dtype=torch.int64)        # (on the host: the state_dict's `_extra_state`)
    pad = c.padded_hidden_size - c.hidden_size                     # the backend's wire size (zero columns)
    ex = _checked(source.experts(ids), c, ("w13", "w2", "w13_bias", "w2_bias"), num=len(ids), expert_ids=ids,
                  source=source)
    w13, w2, b13, b2 = (None if t is None else t.to(c.dtype) for t in ex.values())
    if pad:
        w13, w2 = torch.nn.functional.pad(w13, (0, pad)), torch.nn.functional.pad(w2, (0, 0, 0, pad))
        b2 = None if b2 is None else torch.nn.functional.pad(b2, (0, pad))
    self.qweights, stored = None, self.quant != "unquantized" and source.quant_scheme == self.quant
    if stored:                                                     # the checkpoint's codes: no dequantize -> requantize
        if pad:                                                    # (zero columns would need codes and scales)
            as_is = [n for n, d in BACKENDS.items() if d.moves_tokens and d.round_up_hidden_size(c.hidden_size) ==
                     c.hidden_size]
            raise ValueError(f"quant: expected a deployment without hidden-size padding for {self.quant} codes read "
                             f"as stored, got hidden_size {c.hidden_size} padded to {c.padded_hidden_size} for "
                             f"{c.parallel.all2all_backend}'s wire; run them on an all2all that sends this size as it "
                             f"is ({', '.join(as_is)}), or dequantize them (quant='unquantized'; moe-lit run "
                             f"--quant unquantized)")
        self.qweights = source.quantized_experts(ids, self.quant).to(device).for_kernels()   # FP4: re-laid once
    elif self.quant != "unquantized":                              # quantize at load
        from moe_lit.quant_weights import quantize_expert_weights
        self.qweights = quantize_expert_weights(w13.to(device), w2.to(device), self.quant).for_kernels()
    if self.qweights is not None:                                  # the float weights kept are the dequantized ones
        w13 = w2 = None                                            # (the originals go first: a lower peak)
        w13, w2 = self.qweights.dequantize(c.dtype)
    param = lambda t: None if t is None else torch.nn.Parameter(t.to(device), requires_grad=False)
    self.w13, self.w2 = param(w13), param(w2)                      # [E_local, 2·I, H_padded], [E_local, H_padded, I]
    self.w13_bias, self.w2_bias = param(b13), param(b2)            # [E_local, 2·I], [E_local, H_padded] or None


# %% [markdown]
# **A quantized layer quantizes what it is given** — float weights at construction, and again after
# `load_state_dict`: the state_dict carries float weights (a quantized layer's own state_dict holds its dequantized
# weights), and the layer re-quantizes them, so the codes never go stale and a layer called quantized never runs
# anything else. Quantized tensors in a state_dict are refused. A checkpoint's own codes are the exception:
# `from_pretrained` of a quantized checkpoint runs them as stored (below); a later `load_state_dict` of floats then
# replaces them with the layer's own quantization of those floats.
#
# **Whose experts.** Under EP every rank's state_dict has tensors of the same shapes — its own local experts — so
# rank 1's weights would load into rank 0's layer without a complaint and route rank 0's tokens through the wrong
# experts. The state_dict therefore also carries `_extra_state` (torch's hook for it): the logical ids of the experts
# the layer holds, in slot order, an int64 tensor (so `safetensors` can store it). A load whose ids differ is refused
# before anything is copied; a state_dict without the key (one built by hand) loads as before.

# %%
#| export
@patch
def get_extra_state(self: FusedMoE) -> torch.Tensor:
    """`[num_local_experts]` int64 on the CPU: the logical ids of the experts in this layer's slots (its state_dict's
    `_extra_state`). Raises nothing. Source: torch's `nn.Module.get_extra_state` hook."""
    return self._expert_ids.clone()            # the ids `_load_experts` loaded (on the host: a meta layer has them too)

@patch
def set_extra_state(self: FusedMoE, state) -> None:
    """Nothing to set: the ids are the layer's own, and `load_state_dict`'s pre-hook has refused a state_dict of other
    experts. Raises nothing (`state` is ignored); the pre-hook raises ValueError naming
    `state_dict['<prefix>_extra_state']` for other ids. Source: torch's `nn.Module.set_extra_state` hook."""

def _check_expert_ids(module, state_dict, prefix):
    "A state_dict's `_extra_state` must name the experts `module` holds (another EP rank's weights have the same shapes)."
    key, own = prefix + "_extra_state", module.get_extra_state()
    if key not in state_dict: state_dict[key] = own; return   # built by hand: nothing says whose experts (strict loads
    got = _expert_ids_arg(f"state_dict[{key!r}]", state_dict[key])   # pass; another rank's weights are not caught)
    if not torch.equal(got, own):
        p = module.placement
        raise ValueError(f"state_dict[{key!r}]: expected the experts this layer holds (EP rank {p.ep_rank} of "
                         f"{p.ep_size}, logical ids {_ids_text(own)}), got ids {_ids_text(got)}: the weights of another "
                         f"rank or placement; load that rank's layer, or build this one from the checkpoint")

def _refuse_quantized_state(module, state_dict, prefix, local_metadata=None, *args):
    "load_state_dict pre-hook: expert tensors must be finite floats, finite in the layer's dtype too (a quantized layer quantizes them itself)."
    assign = bool((local_metadata or {}).get("assign_to_params_buffers", False))
    _check_settings_kept(module)                       # what the weights load into: the layer's own settings
    _check_expert_ids(module, state_dict, prefix)      # and the experts they are
    shared = _shared_by_key(module)
    for n in _TRACKED + tuple(shared):
        t = state_dict.get(prefix + n)
        if not isinstance(t, torch.Tensor): continue
        own = shared[n] if n in shared else getattr(module, n, None)
        check_dense(f"state_dict[{prefix + n!r}]", t)
        if isinstance(own, torch.Tensor) and tuple(t.shape) != tuple(own.shape):
            c, hint = module.config, ""               # only the hidden dimension differs: another deployment's padding
            diff = [d for d, (a, b) in enumerate(zip(own.shape, t.shape)) if a != b] if t.dim() == own.dim() else []
            if diff == [{"w13": 2, "w2": 1, "w2_bias": 1}.get(n, -1)] and t.shape[diff[0]] >= c.hidden_size:
                # the padded tensors' hidden dimension, at least hidden_size wide (padding only rounds up)
                pad = (f"hidden_size {c.hidden_size} padded to {c.padded_hidden_size} for "
                       f"{c.parallel.all2all_backend}'s wire" if c.padded_hidden_size != c.hidden_size
                       else f"hidden_size {c.hidden_size}, not padded")
                hint = (f" (the hidden dimension: this deployment's is {pad}; a state_dict of a deployment that pads "
                        f"otherwise? build the layer from the unpadded weights instead: weights= or from_pretrained)")
            raise ValueError(f"state_dict[{prefix + n!r}]: expected shape {list(own.shape)}, got {list(t.shape)}{hint}")
        if t.dtype not in FLOAT_DTYPES:
            what = ("float weights" if module.quant == "unquantized" else
                    f"float weights (a {module.quant} layer quantizes what it is given)")
            raise ValueError(f"state_dict[{prefix + n!r}]: expected {what}, got dtype {str(t.dtype)[6:]}")
        if assign and isinstance(own, torch.Tensor) and not t.is_contiguous():  # the kernels read it as laid out
            raise ValueError(f"state_dict[{prefix + n!r}]: expected a contiguous tensor with assign=True (or load "
                             f"without assign, which copies), got strides {tuple(t.stride())}")
        if assign and isinstance(own, torch.Tensor) and t.is_inference():      # no version counter: edits unseen
            raise ValueError(f"state_dict[{prefix + n!r}]: expected a normal tensor with assign=True (an inference "
                             f"tensor keeps no version counter, so the layer could not follow an edit of it), got an "
                             f"inference tensor; load without assign, which copies")
        if assign and isinstance(own, torch.Tensor) and t.dtype != own.dtype:   # assign swaps the tensor in as it is
            raise ValueError(f"state_dict[{prefix + n!r}]: expected dtype {own.dtype} with assign=True (or load "
                             f"without assign, which casts), got {t.dtype}")
        check_finite(f"state_dict[{prefix + n!r}]", t)     # before anything is copied: a refused load changes nothing
        if isinstance(own, torch.Tensor) and own.dtype != t.dtype:       # the copy casts: finite there too
            check_finite(f"state_dict[{prefix + n!r}] in {own.dtype}", t := t.to(own.dtype))
        if n in ("w13", "w2") and module.quant != "unquantized":       # what the post-hook will quantize: in range too
            from moe_lit.quant_weights import check_quantizable
            check_quantizable(f"state_dict[{prefix + n!r}]", t, module.quant)
    _first_slots("state_dict", state_dict, module.get_extra_state(), prefix, checked=True)   # EPLB's replicas alike

@torch.inference_mode(False)             # the codes it makes keep version counters (edits of them are followed)
def _requantize_after_load(module, incompatible_keys):
    "load_state_dict post-hook: re-quantize the loaded float experts of a quantized layer; rebuild the hot path's state."
    shared = _shared_by_key(module)
    for n, t in [(n, getattr(module, n)) for n in ("w13", "w2", "w13_bias", "w2_bias")] + list(shared.items()):
        if t is not None and t.dtype != module.config.dtype:   # `assign=True` would swap in the state_dict's own tensors
            raise ValueError(f"state_dict[{n!r}]: expected dtype {module.config.dtype} after loading (load without "
                             f"assign=True, or build the layer in that dtype), got {t.dtype}")
    module._build_hot_path()                           # the router's gate copy; captured graphs are dropped
    if module.quant == "unquantized": return
    from moe_lit.quant_weights import quantize_expert_weights
    with torch.no_grad():
        module.qweights = quantize_expert_weights(module.w13.data, module.w2.data, module.quant).for_kernels()
    _floats_follow_codes(module)
    module._record_build()                                # after the copies, which count as edits

def _floats_follow_codes(layer):
    "A quantized layer's float experts (its state_dict) set to its codes dequantized, refused by name if not finite in its dtype."
    with torch.no_grad():
        w13, w2 = (w.to(layer.w13.dtype) for w in layer.qweights.dequantize())
        for n, w in (("w13", w13), ("w2", w2)):           # as construction and loading refuse them: named, nothing copied
            check_finite(f"qweights (its {n} dequantized to {w.dtype})", w)
        layer.w13.copy_(w13); layer.w2.copy_(w2)

# %%
#| export
@patch(cls_method=True)
def from_pretrained(cls: FusedMoE, checkpoint_dir, layer_index: int, parallel: ParallelConfig | None = None,
                     dtype: torch.dtype | None = None, **kwargs) -> "FusedMoE":
    """The MoE layer of decoder layer `layer_index` of a Hugging Face checkpoint directory (see `11c_checkpoint`).

    `checkpoint_dir`: a directory with `config.json` and safetensors (a model saved by transformers' `save_pretrained`;
    its `model_type` one of `02_models`' families: the Qwen MoEs, Mixtral, DeepSeek-V2/V3, GLM-4 MoE, gpt-oss, Llama 4, MiniMax-M2). `layer_index`: a decoder layer with an MoE block
    (ValueError listing them otherwise). `parallel`: an expert-parallel `ParallelConfig` reads only this rank's
    experts. `dtype`: the layer's dtype (default: the checkpoint's). Every other keyword goes to `FusedMoE` —
    `experts`, `quant` (default: the checkpoint's own quantization, run as stored), `device`, `placement`, `debug`;
    `weights` and `config` come from the checkpoint and are refused.

    ValueError naming `checkpoint_dir` (no directory, no config.json, a family moe-lit does not know, missing or
    misshaped tensors: the safetensors key), `layer_index`, `dtype` (not a float torch.dtype), `weights` or `config`
    (given), any other keyword `FusedMoE` does not take, and whatever `FusedMoE` refuses. Source: transformers' `from_pretrained` layout of the same checkpoint."""
    from moe_lit.checkpoint import CheckpointWeights
    for k in ("weights", "config"):
        if k in kwargs: raise ValueError(f"{k}: expected none with from_pretrained (the checkpoint gives it), got {kwargs[k]!r:.40}")
    takes = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "config", "weights")]
    for k in kwargs:                                  # before reading the checkpoint: a typo costs no load
        if k not in takes: raise ValueError(f"{k}: expected one of the FusedMoE keywords {takes}, got {k}={kwargs[k]!r:.40}")
    src = CheckpointWeights(checkpoint_dir, layer_index, parallel=parallel, dtype=dtype)
    kwargs.setdefault("quant", src.quant_scheme or "unquantized")     # pre-quantized codes run as they are stored
    return cls(src.config, weights=src, **kwargs)


# %% [markdown]
# ## The hot path
#
# A serving engine calls the layer once per step and replays decode steps as CUDA graphs, so `forward` must never
# wait for the GPU: no `.item()`, no `.any()` on a device tensor, no host↔device copy, no object built per call.
# Everything that does not depend on the batch is settled here, once:
#
# - **values the layer owns are checked at construction** (weights, router, correction bias: finite, right shapes)
#   and again by `load_state_dict`'s hooks; per call only shapes and dtypes — Python metadata — are checked;
# - **the router plan** (`03a_kernels.router.router_plan`: the method, its options, the grouped fall-back) and the
#   gate in the layer's dtype when that copy is exact (every bf16 checkpoint's is), read at half the bytes of an
#   fp32 gate: up to `ROUTER_GEMV_MAX_TOKENS` = 16 tokens by `03a`'s logits kernel and the selection — one launch in
#   eager up to `ROUTER_SELECT_MAX_TOKENS` = 2 tokens (the logits program that finishes last selects), two launches
#   past that and always inside a captured graph, where two are the faster — and past 16 tokens by one cuBLAS call
#   with an fp32 result (`matmul_acc`) before the selection;
# - **the placement's tables on the layer's device** (`expert_map`, `global_to_physical`);
# - **the prepare/finalize, experts and ModularKernel**, built on first use and kept: one for the Standard format,
#   one per per-rank token count for the batched format (its slab capacity).
#
# The ids the layer's own router makes are in range by construction, and the batched slabs of this layer hold
# `ceil(T / ep_size) · ep_size ≥ T` rows, so no expert can overflow (a token's `top_k` experts are distinct): the
# hot path runs the kernels without their host-side checks. **`debug=True`** — the one place that lists what it
# does — turns those checks back on and re-reads the layer's values on every call, one sync each: the router's
# tensors (gate, its bias, the correction bias) and every expert tensor (the shared experts' too) are finite; the
# router's 16-bit gate copy and a quantized layer's codes still match the parameters they were made from (an edit
# through `.data` leaves them stale: *Edits no counter sees*, below); the router's arrival counter is 0; the ids are
# in range where the placement looks them up (EPLB's replica table too); the dispatch did not overflow; the batched
# GEMMs' counts are within their slabs. A debug layer runs no launch plan and cannot be captured (`capture` refuses
# it): its checks read values on the host. Ids a *caller* passes in `topk` are not the layer's: they are checked
# (range, and distinct per token; one sync) in both modes, before anything reads them.
#
# How much host time the checks, the launches and the Python between them cost, measured step by step, is under
# *Host time, measured*, after the launch plans.

# %%
#| export
@patch
def _build_hot_path(self: FusedMoE):
    "Settle what forward needs and does not depend on the batch: router plan, gate copy, device tables; drop graphs."
    c, dev = self.config, self.gate.device
    _check_one_device(self)
    self.use_triton = self.experts != "torch"
    if self.use_triton:       # imported here, not with the module: the command sets Triton's interpreter switch first
        from moe_lit.kernels.router import router_plan, _route_tokens  # unchecked: the plan, gate and biases (checked
        self.router, self._route_tokens = router_plan(c), _route_tokens   # at construction) are the layer's
        import moe_lit.kernels.batched as kb
                                                  # (its PDL switch: "auto" turns it on for a one-chain forward, below)
        if self.experts == "triton_quant":        # its switches (MOE_LIT_FP4_*, MOE_LIT_FP8_ACT_QUANT, read once, at
            import moe_lit.kernels.quant_experts  # import): a bad value is refused at the first such construction, not
                                                  # at a call; later changes to the environment are not read
    else: self.router = None
    self._one_chain = self._modules.get("shared_experts") is None    # no side stream beside the routed experts
    g = self.gate.to(c.dtype)                                 # exact for bf16 checkpoints: the GEMM reads bf16
    exact = dev.type != "meta" and torch.equal(g.float(), self.gate)          # (a meta layer holds no values to compare)
    self.router_gate = g if c.dtype in (torch.bfloat16, torch.float16) and exact else self.gate
    self.placement = self.placement.to(dev)
    self.replicas = None if not c.num_redundant_experts else tuple(     # EPLB: (logical_to_physical, counts)
        t.to(dev) for t in eplb_replicas(c.num_experts, c.num_redundant_experts, c.ep_size))
    self._kernels, self.graphs, self._plans, self._seen = {}, {}, {}, set()   # (launch plans: this build's tensors)
    # the router's arrival counter: in eager decode the logits launch's last program also selects (03a); the kernel
    # leaves it 0. It is the layer's, so one eager forward of a layer runs at a time (on one stream)
    self._router_counter = torch.zeros(1, dtype=torch.int32, device=dev) if self.use_triton and dev.type != "meta" else None
    self._ids_dtype = c.topk_indices_dtype                    # the config's derived facts, read once, not per forward
    self._slab_ranks = c.ep_size if c.activation_format is ActivationFormat.BatchedExperts else 0
    self.dispatch_quant, self.dispatch_quant_reason = dispatch_quantization(   # FP8 before dispatch, or not, and why
        c, self.experts, self.qweights if isinstance(self.qweights, QuantizedExpertWeights) else None)
    self._record_build()

def _check_one_device(layer):
    "Every parameter and buffer on one device (a partial `load_state_dict(..., assign=True)` can leave some on meta)."
    where = {}
    for n, t in list(layer.named_parameters()) + list(layer.named_buffers()): where.setdefault(str(t.device), []).append(n)
    if len(where) > 1:
        raise ValueError("parameters and buffers: expected all on one device, got " + "; ".join(
            f"{', '.join(ns)} on {d}" for d, ns in where.items()) + " (load_state_dict(..., assign=True) must give every "
            "tensor: strict=True)")

_TRACKED = (*_ROUTER, "w13", "w2", "w13_bias", "w2_bias")   # what the kernels read

def _identity(t: torch.Tensor | None, version: bool) -> tuple | None:
    "Which tensor `t` is, where and how large; with `version`, how often it was edited in place (an inference tensor has no count)."
    if t is None: return None
    if not version: return (id(t), t.data_ptr(), t.shape)   # (a meta tensor's address is 0)
    try: return (id(t), t.data_ptr(), t.shape, t._version)
    except RuntimeError: return (id(t), t.data_ptr(), t.shape, None)   # "Inference tensors do not track version counter"

@patch
def _weight_versions(self: FusedMoE) -> tuple:
    """What the hot path was built from, cheaply: the tensors the kernels read as `_identity` sees them (a swapped or
    resized one is noticed, and an in-place edit of the router's tensors — their values checked again, the gate's bf16
    copy rebuilt — or of the float experts a quantized layer keeps codes of), then the objects it holds (qweights, config, placement, shared experts), its switches, and
    the placement's tables (an in-place edit of one is checked again, as a new placement is), the EPLB replica tables
    (derived from the config: an edit is refused), and last the quantized experts' codes and scales (an in-place edit:
    the container checked again, as a new one is)."""
    p, b, place = self._parameters, self._buffers, self.placement
    quantized = isinstance(self.qweights, QuantizedExpertWeights)   # (anything else: named below)
    return tuple(_identity(p[n] if n in p else b.get(n), n in _ROUTER or (quantized and n in ("w13", "w2")))
                 for n in _TRACKED) + (id(self.qweights), id(self.config), id(place),
                                       id(self._modules.get("shared_experts")), self.debug, self.experts, self.quant) + \
        tuple(_identity(t, False) for t in _shared_tensors(self)) + \
        tuple(_identity(getattr(place, n, None), True) for n in PLACEMENT_TABLES) + \
        (_replicas_identity(self.replicas),) + \
        ((tuple(_identity(getattr(self.qweights, n), True) for n in QUANT_TENSORS) if quantized else None),)

def _replicas_identity(replicas) -> tuple | None:
    "`_identity` of the EPLB tables `(logical_to_physical, counts)` (None without replicas; anything else by its type)."
    if replicas is None: return None
    if not (isinstance(replicas, tuple) and all(isinstance(t, torch.Tensor) for t in replicas)):
        return (f"a {type(replicas).__name__}",)
    return tuple(_identity(t, True) for t in replicas)

_SHARED = ("w13", "w2", "gate")                    # the shared experts' tensors (`10_modular.SharedExperts`)

def _shared_tensors(layer) -> tuple:
    "The shared experts' `(w13, w2, gate)` as the layer holds them, or `()` without shared experts."
    sh = layer._modules.get("shared_experts")
    return () if sh is None else tuple(sh._parameters.get(n) for n in _SHARED)

def _shared_by_key(layer) -> dict:
    "The shared experts' tensors by state_dict key (`shared_experts.w13`, ...), or `{}` without shared experts."
    return dict(zip((f"shared_experts.{n}" for n in _SHARED), _shared_tensors(layer)))

def _meta(t) -> tuple | None:
    "What the unchecked launches assume of a tensor: shape, dtype, device, and a contiguous layout."
    return None if t is None else (tuple(t.shape), t.dtype, t.device, t.is_contiguous())

def _qmeta(q) -> tuple | None:
    if q is None: return None
    if not isinstance(q, QuantizedExpertWeights): return (f"a {type(q).__name__}, not a QuantizedExpertWeights",)
    return (q.num_experts, q.hidden_size, q.intermediate_size, q.device, q.scheme)

@patch
def _record_build(self: FusedMoE):
    "After a build (construction, load, move, rebuild): what `_follow_inplace_edits` compares with."
    self._versions = self._weight_versions()
    self._weight_meta = {n: _meta(getattr(self, n)) for n in _TRACKED}
    self._kernel_tensors = tuple((n, t) for n, t in [(n, getattr(self, n)) for n in _TRACKED] +   # (a swap rebuilds,
                                 list(_shared_by_key(self).items()) if isinstance(t, torch.Tensor))   # so these stay current)
    self._held = dict(qweights=_qmeta(self.qweights), shared=tuple(_meta(t) for t in _shared_tensors(self)))
    if "_settings" not in self.__dict__:         # recorded once, at construction: no later build re-records them
        self._settings = dict(config=self.config, placement=_placement_key(self.placement), quant=self.quant,
                              experts=self.experts)

def _check_settings_kept(layer):
    """What the layer was built for — its config, placement, quant scheme and experts implementation — is fixed at
    construction: an assignment of another is refused by name at the next call, load_state_dict or move."""
    h = layer._settings
    fixed = lambda n, want, got: ValueError(f"{n}: expected {want} (fixed at construction), got {got}; build a new "
                                            f"layer for another (load_state_dict loads weights, not settings)")
    if not isinstance(layer.config, MoEConfig) or layer.config != h["config"]:      # an equal copy is the same config
        raise fixed("config", "the layer's MoEConfig", "another" if isinstance(layer.config, MoEConfig) else
                    f"a {type(layer.config).__name__}, not a MoEConfig")
    pshow = lambda k: ("not a Placement" if k is None else f"rank {k[2]} of {k[1]}, {k[0]}, local experts {list(k[4])} of "
                       f"{k[3]}" + ", expert_map" * (not k[5]) + ", round-robin tables" * (not k[6]))
    if (key := _placement_key(layer.placement)) != h["placement"]:   # a swap to one the weights were not loaded for
        raise fixed("placement", pshow(h["placement"]), pshow(key))
    for n in ("quant", "experts"):
        if getattr(layer, n) != h[n]: raise fixed(n, repr(h[n]), repr(getattr(layer, n)))

def _placement_key(p) -> tuple | None:
    "Which experts a placement puts on this rank, and the tables ids reach them by: what the weights were loaded for."
    if not isinstance(p, Placement): return None
    return (p.strategy, p.ep_size, p.ep_rank, p.num_experts, tuple(p.local_to_global.tolist()),
            p.expert_map is None, p.global_to_physical is None)

@patch
def _follow_inplace_edits(self: FusedMoE):
    "After an in-place edit or a swap of what the layer holds: the swapped part checked once, the copies rebuilt; no sync."
    now = self._weight_versions()
    if now != self._versions: _take_edits(self, now)

def _check_held_finite(named):
    "Each `(name, tensor)` the layer holds refused by name if not finite (a sync each; None and meta tensors skipped)."
    for n, t in named:
        if t is not None and t.device.type != "meta": check_finite(n, t)

@torch.inference_mode(False)             # what it rebuilds keeps version counters, under torch.inference_mode() too
def _take_edits(self: FusedMoE, now: tuple):
    "`_follow_inplace_edits` once something changed (`now`: the layer's `_weight_versions`)."
    _check_one_device(self)
    bad = lambda n, want, got: ValueError(f"{n}: expected {want} (the layer's, checked at load), got {got}; load new "
                                          f"weights with load_state_dict, or build a new layer")
    show = lambda m: "none" if m is None else f"shape {list(m[0])}, {m[1]} on {m[2]}" + ("" if m[3] else ", not contiguous")
    for n in _TRACKED:                                   # the unchecked launches read what they are given
        got = _meta(getattr(self, n))
        if got != self._weight_meta[n]: raise bad(n, show(self._weight_meta[n]), show(got))
    _check_held_finite((n, getattr(self, n)) for i, n in enumerate(_TRACKED)   # a swapped or edited tensor's values,
                       if now[i] != self._versions[i])   # as at load (a sync an edit, not a call): a NaN gate would
                                                         # route every token to weight 0
    if now[-2] != self._versions[-2]:                    # EPLB's tables: the config's, which the weights were loaded by
        c = self.config
        want, r = eplb_replicas(c.num_experts, c.num_redundant_experts, c.ep_size), self.replicas
        if not (isinstance(r, tuple) and len(r) == 2 and all(isinstance(t, torch.Tensor) and t.shape == w.shape
                                                               and torch.equal(t.cpu(), w) for t, w in zip(r, want))):
            raise bad("replicas", "eplb_replicas(num_experts, num_redundant_experts, ep_size) of the config, fixed at "
                      "construction", "an edit or another value")
    h = self._held
    _check_settings_kept(self)
    shared = tuple(_meta(t) for t in _shared_tensors(self))
    if len(shared) != len(h["shared"]):
        raise bad("shared_experts", "some" if h["shared"] else "none", "some" if shared else "none")
    for n, want, got in zip(_SHARED, h["shared"], shared):     # (a gated one's gate included)
        if got != want: raise bad(f"shared_experts.{n}", show(want), show(got))
    check_bool("debug", self.debug); check_choice("experts", self.experts, ("torch", "triton", "triton_quant"))
    if self.experts == "triton_quant" and self.qweights is None:          # its kernels read the codes
        raise bad("experts", "'torch' or 'triton' for an unquantized layer", repr(self.experts))
    q = self.qweights
    qshow = lambda m: "none" if m is None else m[0] if len(m) == 1 else \
        "{} experts, hidden_size {}, intermediate_size {} on {}, {}".format(*m)
    if _qmeta(q) != h["qweights"]: raise bad("qweights", qshow(h["qweights"]), qshow(_qmeta(q)))
    floats_edited = (now[3], now[4]) != (self._versions[3], self._versions[4])
    if q is not None and floats_edited and now[-1] != self._versions[-1]:   # which should follow which: not guessed
        raise ValueError("w13, w2 and qweights: expected an in-place edit of the float experts or of the codes and "
                         "scales between two calls, got edits of both (each is made to follow the other); load new "
                         "weights with load_state_dict, or build a new layer")
    if q is not None and floats_edited:
        _requantize_after_load(self, None)            # quantizes the edited float experts, rebuilds the rest
        return
    swapped = q is not None and now[len(_TRACKED)] != self._versions[len(_TRACKED)]   # another container
    edited = q is not None and not swapped and now[-1] != self._versions[-1]             # its codes or scales, in place
    if edited: q.recheck_if_edited()                   # checked again, as a new container is (an MXFP4 container
                                                        # keeps facts of its scales for the decode)
    if swapped or edited: _floats_follow_codes(self)    # new codes: the float experts (state_dict) follow them
    self._build_hot_path()

def _check_copies_current(layer):
    """debug: what the layer derived from its parameters still matches them — the router's 16-bit copy of the gate and
    a quantized layer's codes (its floats are their dequantized values). An edit version counters do not see (through
    `.data`) leaves them stale; `refresh()` re-derives them. Syncs: for `debug=True` only."""
    hint = "an edit through .data, which no version counter sees; call layer.refresh() after such an edit"
    g = layer.router_gate
    if g is not layer.gate and layer.gate.device.type != "meta" and not torch.equal(g.float(), layer.gate):
        raise ValueError(f"gate: expected the values the router's {g.dtype} copy was made from, got others ({hint})")
    q = layer.qweights
    if isinstance(q, QuantizedExpertWeights) and layer.w13.device.type != "meta":
        for n, w in zip(("w13", "w2"), q.dequantize(layer.w13.dtype)):
            if not torch.equal(w, getattr(layer, n)):
                raise ValueError(f"{n}: expected the dequantized values of the {layer.quant} codes the experts run, "
                                 f"got others ({hint})")

@patch
@torch.inference_mode(False)
def refresh(self: FusedMoE) -> FusedMoE:
    """Re-derive everything the layer keeps from its parameters, after an edit it cannot see: a write through `.data`
    (which bumps no version counter) or into the memory by other means. The parameters are checked as at load (finite,
    the layer's dtype), the router's 16-bit gate copy is rebuilt, a quantized layer re-quantizes its float experts (the
    floats lead, as in `load_state_dict`), and launch plans and captured graphs are dropped. Returns the layer.
    Raises ValueError as `load_state_dict` does (naming the tensor: not finite, another shape, dtype or device). Edits
    in place (`with torch.no_grad(): layer.w13.mul_(2)`) and swaps need no call: the next forward sees them.
    Source: moe-lit's own (the check and rebuild of `load_state_dict`'s hooks)."""
    self._follow_inplace_edits()                    # first what a counter saw; a `.data =` swap of another shape,
                                                    # dtype or layout is refused there, as at a call
    _check_settings_kept(self)
    _check_held_finite([(n, getattr(self, n)) for n in _TRACKED] + list(_shared_by_key(self).items()))
    _requantize_after_load(self, None)              # the hot path rebuilt (one device checked); quantized: codes from the floats
    return self

@patch
@torch.inference_mode(False)             # moved tensors keep version counters, as built ones do (below)
def _apply(self: FusedMoE, fn, recurse=True):
    "A move of the module (`.to`, `.cuda`) takes what is not a parameter along: quantized experts, device tables, gate copy."
    built = "_kernels" in self.__dict__                           # during construction `__init__` settles the rest
    if built:                 # what the layer cannot follow is refused before anything moves: `fn` on empty views
        self._follow_inplace_edits()                              # (pending in-place edits first: the move rebuilds
                                                                  # from what the layer runs)
        _check_settings_kept(self)                                # (a move rebuilds: not over a swapped setting)
        try: fn(self.gate.detach()[:0])
        except NotImplementedError:                             # off meta: nothing to copy (before RuntimeError, its base)
            raise ValueError("device: expected meta for a layer on meta (it holds no values to move; build the layer "
                             "again, or load_state_dict into one built on the device)") from None
        except (AssertionError, RuntimeError) as e:            # `.cuda()` on a machine without one: torch's own words
            raise ValueError(f"device: expected a device this machine has, got an error moving there ({e})") from None
        to = fn(self.w13.detach()[:0]).dtype                     # the experts' dtype: the config's, fixed
        if to != self.w13.dtype:
            raise ValueError(f"w13: expected the layer to keep its dtype {self.w13.dtype} (build it in the dtype "
                             f"wanted), got a conversion to {to}")
        if self.qweights is not None and fn(self.gate.detach()[:0]).device.type == "meta":
            raise ValueError(f"device: expected a device with values for a {self.quant} layer (its codes and scales are "
                             f"data, not parameters), got meta")
    # a cast to the experts' own dtype (`model.to(torch.bfloat16)` around a bf16 layer) leaves the router's fp32
    # tensors fp32: they are taken out while torch converts the rest, then only moved
    router = {n: t for n in _ROUTER if (t := self._buffers.get(n)) is not None}
    cast = built and fn(self.gate.detach()[:0]).dtype != self.gate.dtype
    if cast:
        for n in router: self._buffers[n] = None
    try: super(FusedMoE, self)._apply(fn, recurse)
    finally:
        for n, t in router.items() if cast else ():
            self._buffers[n] = t.to(self.w13.device)
    if not built: return self
    if self.qweights is not None and self.qweights.device != self.gate.device: self.qweights = self.qweights.to(self.gate.device)
    self._build_hot_path()                                        # tables on the new device; captured graphs dropped
    return self

@patch
def extra_repr(self: FusedMoE) -> str:
    """What `print(layer)` shows: the sizes, this rank's experts and where they run (torch's module repr). Raises
    nothing. Source: torch's `nn.Module.extra_repr`."""
    c, p = self.config, self.placement
    return (f"num_experts={c.num_experts}, top_k={c.top_k}, hidden_size={c.hidden_size}, "
            f"intermediate_size={c.intermediate_size}, dtype={c.dtype}, format={c.activation_format.value}, "
            f"all2all={c.parallel.all2all_backend}, ep_rank={p.ep_rank}/{p.ep_size} holding {p.num_local_experts} "
            f"experts ({p.strategy}), experts={self.experts!r}, quant={self.quant}, device={self.gate.device}")

def _kernel_key(layer, num_tokens: int) -> int:
    "Which ModularKernel serves `num_tokens` tokens: one per slab capacity in the batched format, one in the Standard."
    return -(-num_tokens // layer._slab_ranks) if layer._slab_ranks else 0

@patch
def _modular_kernel(self: FusedMoE, num_tokens: int) -> ModularKernel:
    "The ModularKernel for `num_tokens` tokens: built once (per slab capacity for the batched format), then reused."
    key = _kernel_key(self, num_tokens)
    mk = self._kernels.get(key)
    if mk is None:
        pf = make_prepare_finalize(self.config, num_tokens, use_triton=self.use_triton, validate=self.debug,
                                   quant_block=self.dispatch_quant)
        mk = self._kernels[key] = ModularKernel(pf, make_experts(pf, self.experts, trusted=not self.debug),   # weights
                                                self.shared_experts, owned=not self.debug)                # checked at load
    return mk


# %% [markdown]
# Routing runs in fp32 on every rank with the same router, so every rank agrees on `topk_ids`. The ids take the
# dtype the backend wants (`topk_indices_dtype`: int64 for DeepEP and NIXL EP, int32 otherwise). With Triton experts
# the router is the one-launch kernel of `03a_kernels.router`; with the torch experts it is its spec, `select_experts`.
# With EPLB replicas (`num_redundant_experts`, `parallel.enable_eplb`) the ids are physical: each logical choice is
# mapped to one of its replicas (`04_placement.map_to_physical`), and each rank holds the weights of its physical
# experts, physical `p` being a copy of logical `p % num_experts`.

# %%
#| export
def _check_on_layer_device(layer: FusedMoE, t: torch.Tensor, name: str = "hidden"):
    "A tensor on the layer's device (metadata only: no sync); ValueError naming it otherwise."
    if t.device != layer.gate.device:
        raise ValueError(f"{name}: expected a tensor on the layer's device {layer.gate.device}, got {t.device}")
    if t.is_meta:                                    # a meta layer holds no weights: nothing to compute with
        raise ValueError(f"{name}: expected a tensor with values, got a meta tensor (a layer moved to the meta device "
                         f"has no weights: build it on a real device or load its weights first)")

def _refuse_gradient(layer, hidden: torch.Tensor, topk=None, weights: bool = True):
    """A Triton layer's forward keeps no autograd graph: under autograd, a gradient wanted by `hidden`, a caller's
    `topk_weights` or (with `weights`) a tensor the kernels read would be silently zero, so refuse it by name."""
    if not torch.is_grad_enabled(): return                # (the common case, before building the list)
    named = (("hidden", hidden),) + ((("topk_weights", topk[0]),) if isinstance(topk, tuple) and len(topk) == 2 else ()) \
        + (layer._kernel_tensors if weights else ())      # the tensors the kernels read, noted at the last build
    if (name := gradient_wanted(named)) is not None:
        raise ValueError(f"{name}: expected a tensor that needs no gradient (the Triton kernels keep no autograd "
                         f"graph), got one with requires_grad=True under autograd: run inference under "
                         f"torch.inference_mode() or torch.no_grad(), detach it, or build the layer with "
                         f"experts='torch' for gradients through it (its w13 and w2 are created frozen: "
                         f"requires_grad_() them to train them; the router's gate is a buffer)")

@patch
def route(self: FusedMoE, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(topk_weights [T, top_k] fp32, topk_ids [T, top_k] in config.topk_indices_dtype)` for `hidden [T, H]` (any float
    dtype): the router's logits in fp32 (Triton on a GPU layer, torch otherwise), then the config's routing method.
    A NaN row gets ids 0..top_k-1 with weight 0. No host sync unless `debug`. ValueError naming `hidden` for a wrong
    shape, dtype or device, or for needing a gradient a Triton layer cannot give, and the layer's tensor that an
    in-place edit made invalid. Source: vLLM's `FusedMoE.select_experts` (fused_moe/layer.py)."""
    self._follow_inplace_edits()                     # first: a swapped-out gate or config is named, not read
    check_tensor("hidden", hidden, shape=(None, self.config.hidden_size), dtype=FLOAT_DTYPES)
    _check_on_layer_device(self, hidden)
    if self.router is not None: _refuse_gradient(self, hidden)
    return self._route(hidden)

@patch
def _route(self: FusedMoE, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "`route` after its checks of `hidden` (forward checked it)."
    bias = self.e_score_correction_bias
    if self.debug:                                   # the router's values, as at construction: one sync each
        _check_held_finite((n, getattr(self, n)) for n in _ROUTER)
        _check_copies_current(self)                  # and the copies made of them: an edit no counter saw
    if self.debug and self._router_counter is not None and (n := int(self._router_counter)) != 0:   # one sync
        raise ValueError(f"_router_counter: expected 0 before a forward (each launch leaves it 0; one eager forward of "
                         f"a layer at a time, on one stream), got {n}")
    if self.router is not None:       # logits and selection on the GPU (03a): at decode one launch in eager, where
        wts, ids = self._route_tokens(self.router, hidden if hidden.stride(-1) == 1 else hidden.contiguous(),   # the host
                                      self.router_gate, self.gate_bias, bias, self._ids_dtype,   # is the bottleneck;
                                      self._router_counter)                                       # two in a graph
    else:
        logits = router_logits(hidden, self.router_gate, self.gate_bias)    # [T, num_experts] fp32
        wts, ids = select_experts(self.config, logits, bias, validate=False)    # checked above when debug
    if self.replicas is not None: ids = map_to_physical(ids, *self.replicas, validate=self.debug)   # EPLB
    return wts, ids if ids.dtype == self._ids_dtype else ids.to(self._ids_dtype)   # (a no-op `to` is a dispatch too)

@patch
def _check_topk(self: FusedMoE, topk, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    "A caller's `(topk_weights, topk_ids)`: shapes, dtypes and the id range (one host sync: the ids are not the layer's)."
    if not isinstance(topk, tuple) or len(topk) != 2:
        got = f"a {len(topk)}-tuple" if isinstance(topk, tuple) else type(topk).__name__
        raise ValueError(f"topk: expected a (topk_weights, topk_ids) tuple, got {got}")
    k = self.config.top_k
    wts = check_tensor("topk_weights", topk[0], shape=(num_tokens, k), dtype=torch.float32)
    ids = check_tensor("topk_ids", topk[1], shape=(num_tokens, k), dtype=(torch.int32, torch.int64))
    _check_on_layer_device(self, wts, "topk_weights"); _check_on_layer_device(self, ids, "topk_ids")
    check_finite("topk_weights", wts)                        # a NaN weight would turn its token's output NaN
    check_topk_ids(ids, self.placement.num_experts)          # physical ids (EPLB: replicas), distinct per token
    if self.replicas is not None:                            # two replicas of one logical expert: that expert twice
        n = self.config.num_experts
        try: check_topk_ids(torch.where(ids >= 0, ids % n, ids), n)
        except ValueError as e:
            raise ValueError(f"topk_ids: expected physical ids of distinct logical experts per token (physical p is a "
                             f"replica of logical p % {n}): {e}") from None
    return wts, ids.to(self.config.topk_indices_dtype)


# %% [markdown]
# The forward pass is a `ModularKernel` (`10_modular`) for every path: the prepare/finalize is built from the
# backend's record — its format, its topk id dtype, and for the batched format the DeepEP low-latency capacity
# `max_num_tokens_per_rank · num_dispatchers` (in the emulation all `T` tokens stand for `ep_size` ranks of
# `ceil(T / ep_size)` tokens, which must not exceed `max_num_tokens`) — and the experts are chosen by *its* format.
# The shared experts are added when `add_shared` says this rank owns them (the emulation adds them once). When graphs
# were captured (`capture`, below) and the batch fits one, forward replays it.

# %%
#| export
@patch
def forward(self: FusedMoE, hidden: torch.Tensor, topk: tuple | None = None, add_shared: bool = True) -> torch.Tensor:
    """This rank's share of the MoE output `[T, H]` in config.dtype; the sum over ranks is the layer's output.

    `hidden [T, H]` config.dtype on the layer's device. `topk`: None (the layer routes, `route`) or a caller's
    `(topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32/int64 global ids, -1 none)`, checked with one host sync
    (finite weights, ids in range and distinct per token). `add_shared`: add the shared experts (one rank of an
    emulated EP run adds them). Replays a captured graph where one fits (`capture`). Non-finite `hidden` is not checked:
    a NaN row gives a NaN output row. ValueError naming `hidden` (also for more rows than the batched format's slabs
    hold: `max_num_tokens` a rank), `topk`, `topk_weights`, `topk_ids` or `add_shared`; for an input or weight that
    needs a gradient a Triton layer cannot give, `hidden`, `topk_weights` or the weight's name; for an in-place edit
    the layer refuses (as `route`), the edited tensor's name. Source: vLLM's `FusedMoE.forward` and modular kernel
    (fused_moe/layer.py, modular_kernel.py)."""
    self._follow_inplace_edits()                     # first: a swapped-out gate or config is named, not read
    check_tensor("hidden", hidden, shape=(None, self.config.hidden_size), dtype=self.config.dtype)
    if _kernel_key(self, hidden.shape[0]) > self.config.max_num_tokens:   # batched: rows a rank's slab needs (else 0)
        raise ValueError(f"hidden: expected at most max_num_tokens · ep_size = {self.config.max_num_tokens} · "
                         f"{self._slab_ranks} = {self.config.max_num_tokens * self._slab_ranks} rows (max_num_tokens "
                         f"a rank), got {hidden.shape[0]}")
    _check_on_layer_device(self, hidden); check_bool("add_shared", add_shared)
    if self.use_triton: _refuse_gradient(self, hidden, topk)
    if torch.is_autocast_enabled(hidden.device.type):   # the router is fp32 and the experts the config's dtype, by
        with torch.autocast(hidden.device.type, enabled=False):   # contract: autocast would recast their matmuls
            return self._chained(hidden, topk, add_shared)   # (checked once: not `forward` again)
    return self._chained(hidden, topk, add_shared)

@patch
def _chained(self: FusedMoE, hidden: torch.Tensor, topk, add_shared: bool) -> torch.Tensor:
    "`forward` after its checks, with programmatic dependent launch on for a one-chain forward's launches (06)."
    kb = sys.modules["moe_lit.kernels.batched"] if self.use_triton else None
    if kb is None or kb.PDL != "auto" or not self._one_chain or not hidden.is_cuda:
        return self._forward(hidden, topk, add_shared)
    kb.PDL_IN_CHAIN = True
    try: return self._forward(hidden, topk, add_shared)
    finally: kb.PDL_IN_CHAIN = False

@patch
def _forward(self: FusedMoE, hidden: torch.Tensor, topk, add_shared: bool) -> torch.Tensor:
    "`forward` after its checks."
    if self.graphs and topk is None and add_shared is True and not torch.cuda.is_current_stream_capturing():
        out = self._replay(hidden)
        if out is not None: return out
    if LAUNCH_PLANS and topk is None and add_shared is True and self.use_triton and not self.debug:
        out = self._planned(hidden)                  # the eager forward's launches, replayed without its Python
        if out is not None: return out
    return self._eager(hidden, topk, add_shared)

@patch
def _eager(self: FusedMoE, hidden: torch.Tensor, topk, add_shared: bool) -> torch.Tensor:
    "The forward as Python runs it: route, then the ModularKernel (prepare, experts, finalize, shared experts)."
    if self.debug:                                   # the experts' values, as at load (a sync each): the kernels read
        _check_held_finite([(n, getattr(self, n)) for n in _TRACKED if n not in _ROUTER]   # them as they are, and an
                           + list(_shared_by_key(self).items()))   # unquantized layer follows no edit of them
    wts, ids = self._route(hidden) if topk is None else self._check_topk(topk, len(hidden))
    mk = self._modular_kernel(len(hidden))
    w13, w2 = (self.qweights, None) if self.experts == "triton_quant" else (self.w13, self.w2)
    return mk(hidden, w13, w2, wts, ids, self.placement, self.config.apply_router_weight_on_input,
              add_shared=add_shared, w13_bias=self.w13_bias, w2_bias=self.w2_bias, activation=self.activation)


# %% [markdown]
# ## CUDA graphs
#
# `capture(batch_sizes)` records one graph of the whole forward — router, dispatch, experts, combine, shared
# experts — per token bucket, the way serving engines capture their decode batch sizes. All buckets share one memory
# pool. A later `forward` of `T` tokens replays the smallest bucket `≥ T`: it copies the tokens into the bucket's
# static input, zeroes the tail rows, replays, and returns the first `T` rows. The padded rows are routed and computed
# like any token — a token's output depends on its own row only — and are never returned. Batches larger than the
# largest bucket, `topk` given by the caller, or `add_shared=False` run eagerly. `load_state_dict` drops the graphs
# (the weights they read may be replaced): capture again after loading. `layer.graphs` maps each captured token count
# to `(torch.cuda.CUDAGraph, static input [T, H], static output [T, H])` — what a benchmark or an engine replays directly.
#
# The warm-up runs and the capture use one side stream, so the split-K arrival counters the warm-up made for that stream
# (`06_kernels.batched.arrival_counters`: kept per stream, left zero by every launch) are the ones the graph reads — no
# fill is captured for them. Graphs captured by one `capture` call share those counters: replay them one at a time (as
# `forward` does), not concurrently on two streams. Where a forward launches with programmatic dependent launch
# (`06`: by default, a layer without shared experts on sm_90+; `MOE_LIT_PDL=1` every layer) the graphs are captured
# with it: each kernel's launch overlaps the end of the one before inside the replay too.

# %%
#| export
@patch
def capture(self: FusedMoE, batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),   # token counts to record, one graph each
             warmup: int = 2,                                         # eager runs before each capture (JIT, cuBLAS)
            ) -> "FusedMoE":
    """Record one CUDA graph of `forward` per token count in `batch_sizes`; later calls replay the smallest that fits,
    the tail rows padded (they contribute nothing), and a batch past the largest runs eagerly. Returns the layer.
    The graphs read the layer's tensors by address and hold their own activations (one memory pool, the largest
    bucket's); a load or move drops them. A bucket past what the layer takes (`forward`'s `max_num_tokens` for the
    batched format) fails in its warm-up, with `forward`'s ValueError naming `hidden`.
    ValueError naming `capture` (a layer not on a CUDA GPU or without Triton experts), `debug` (True), `batch_sizes`
    (empty, not a sequence, or a count < 1) or `warmup` (< 1). Source: the CUDA-graph capture sizes of serving engines
    (vLLM's `cudagraph_capture_sizes`), `torch.cuda.graph`."""
    if self.gate.device.type != "cuda" or not self.use_triton:
        raise ValueError(f"capture: expected a layer on a CUDA GPU with Triton experts, got device {self.gate.device} "
                         f"and experts {self.experts!r}")
    if self.debug: raise ValueError("debug: expected False for capture (debug checks read values on the host), got True")
    if not isinstance(batch_sizes, (list, tuple, range)) or not len(batch_sizes):
        raise ValueError(f"batch_sizes: expected a non-empty list, tuple or range of token counts, got {batch_sizes!r}")
    sizes = sorted({check_int("batch_sizes", b, lo=1) for b in batch_sizes}, reverse=True)   # largest first: one pool
    check_int("warmup", warmup, lo=1)
    self.graphs, pool, side = {}, torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    graphs = {}
    for T in sizes:
        x = torch.zeros(T, self.config.hidden_size, dtype=self.config.dtype, device=self.gate.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup): self(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, stream=side): y = self(x)      # the warm-up's stream: its split-K counters
        graphs[T] = (g, x, y)
    self.graphs = dict(sorted(graphs.items()))
    return self

@patch
def _replay(self: FusedMoE, hidden: torch.Tensor) -> torch.Tensor | None:
    "The output of the smallest captured bucket that holds `hidden`'s rows, or None when none does."
    T = len(hidden)
    bucket = next((b for b in self.graphs if b >= T), None)
    if bucket is None or hidden.device != self.gate.device: return None
    g, x, y = self.graphs[bucket]
    x[:T].copy_(hidden)
    if T < bucket: x[T:].zero_()
    g.replay()
    return y[:T].clone()                                     # the static output is overwritten by the next replay

# %% [markdown]
# ## Launch plans: the eager forward without its Python
#
# At decode the eager forward is host-bound: a few kernels of a few microseconds each, and between them moe-lit's
# Python — argument checks of internal calls, tile choices, strides, allocation sizes — about 80 % of the layer's own
# host time (`nbs/bench/host_plan_bound.py`). None of that Python depends on the tokens' values, only on their shape
# and on what the layer holds, so it can be done once. The second eager forward of a shape is *recorded*: every torch
# op it dispatches (a `TorchDispatchMode` sees allocations, views, pads) and every Triton launch (`06`'s
# `launch_kernel` reports each to the recorder: on the GPU the compiled kernel and its final argument list, in the
# interpreter the call), each tensor argument noted as the forward's input, the output of an earlier step, or a
# tensor that existed before the forward (weights, tables, kept counters: held by reference, read as eager reads
# them). From the third forward of that shape on, the plan runs those steps in order on the new input: the same
# launches with the same arguments, so the same bits (the tests compare). A forward that reads a value on the host,
# compiles a kernel while recording, or passes an intermediate inside a list is not planned and stays eager.
#
# A plan is kept per key: the token count, the input's strides and 16-byte alignment (the compiled kernels were
# specialised on them), device and stream (split-K counters are per stream), and the switches a launch depends on
# (`PDL`, the direct-launch path, Triton's debug flag, `FP8_ACT_QUANT`, the tile-table directory, the Standard
# experts' `TritonExperts.combine_in_gemm2` and `pair_blocks_max_pairs`, the router's `ROUTER_SELECT_MAX_TOKENS`). A
# forward under
# `torch.autocast` runs with autocast off (the router is fp32 and the experts the config's dtype by contract), so
# no plan ever holds an autocast cast. Anything the layer rebuilds from — weights
# swapped or edited, a move, a load — drops every plan (`_build_hot_path`), as it drops captured graphs. Plans are
# skipped under `debug=True`, with a caller's `topk`, with `add_shared=False`, while a CUDA graph is captured, and when
# `MOE_LIT_LAUNCH_PLAN=0` (read at import). Python-side state the forward touches is unchanged by a successful
# forward (the batched prepare's counts are zeroed on the device by the combine); a replay that raises drops the plans
# and marks those counts dirty, and while any forward has left them dirty (an eager one that raised half way) the
# next forward runs eagerly, whose prepare zeroes them first.
#
# **Measured.** On an H100 (`nbs/bench/launch_plan_gpu.py`, `launch_plan_h100_be8465f.json`; bf16, eager with plans
# off and on alternating, beside the graph replay of the same forward, the planned outputs equal to the unplanned bit
# for bit on every row), the host overhead at T = 1 (eager − replay, µs): Qwen3 on one GPU 94 → 5, Qwen3 EP2 nixl_ep
# 83 → 3, Mixtral 0.4 → 0.8 (the GPU is the bound either way), gpt-oss 11 → 2, DeepSeek-V3 EP8 nixl_ep 145 → 21,
# allgather 222 → 24; at T = 8 the largest is allgather's, 237 → 37. On the 2-core CPU with the launches stubbed
# (`launch_plan_host_cpu.py`, `launch_plan_host_cpu_be8465f.log`), moe-lit's own Python a forward: 62 → 48 µs (Qwen3),
# 132 → 93 (DeepSeek-V3 nixl_ep); what stays is the forward's checks (shape, device, gradient, in-place edits of the
# weights), the key, one Python step per op or launch, and the launches and allocations themselves.

# %%
#| export
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
LAUNCH_PLANS = env_choice("MOE_LIT_LAUNCH_PLAN", "1", ("0", "1")) == "1"   # "0": every eager forward runs its Python
_PLANS_MAX = 64                                    # keys kept per layer; past it, start over

class _V:
    "The i-th value of a recorded forward (0: its input)."
    __slots__ = ("i",)
    def __init__(self, i: int): self.i = i

_aten = torch.ops.aten
_PURE = {_aten.empty.memory_format, _aten.detach.default, _aten.view.default, _aten.unsqueeze.default,
         _aten.slice.Tensor, _aten.select.int, _aten.t.default, _aten.expand.default}   # no effect but their output
_FAST = {_aten.detach.default: torch.Tensor.detach, _aten.view.default: torch.Tensor.view,   # the Python-level call:
         _aten.unsqueeze.default: torch.Tensor.unsqueeze}                                 # an OpOverload's costs more

class _PlanRecorder(TorchDispatchMode):
    "One forward's torch ops and launches as steps, tensors replaced by `_V` references (values known by identity)."
    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.steps, self.ids, self.n, self.keep, self.why = [], {id(x): 0}, 1, [x], None   # keep: ids stay theirs
    def ref(self, t):
        return _V(self.ids[id(t)]) if isinstance(t, torch.Tensor) and id(t) in self.ids else t
    def define(self, t):
        if not isinstance(t, torch.Tensor): return t
        self.ids[id(t)], self.n = self.n, self.n + 1
        self.keep.append(t)
        return _V(self.n - 1)
    def refuse(self, why: str):
        self.why = self.why or why
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _aten._local_scalar_dense.default: self.refuse("the forward read a value on the host")
        self.steps.append(("op", func, tree_map(self.ref, args), tree_map(self.ref, kwargs), tree_map(self.define, out)))
        return out
    def call(self, fn, args, kwargs):                 # a launch through the JIT or the interpreter
        self.steps.append(("call", fn, tree_map(self.ref, args), tree_map(self.ref, kwargs), None))
    def direct(self, run, grid, function, metadata, argv):   # a compiled kernel's launch (`06`'s fast path)
        self.steps.append(("direct", (run, grid, function, metadata), tree_map(self.ref, argv), {}, None))

def _holds_ref(v) -> bool:
    "A `_V` anywhere in `v` (lists, tuples, dicts)."
    if isinstance(v, _V): return True
    if isinstance(v, (list, tuple)): return any(map(_holds_ref, v))
    return isinstance(v, dict) and any(map(_holds_ref, v.values()))

class LaunchPlan:
    """A recorded eager forward's steps, run again on a new input of the recorded shape (see above). `FusedMoE` builds
    one from its recorder at the second forward of a key; `replay(x)` takes `x` of the recorded shape, strides, dtype
    and device and returns a new output tensor. ValueError, with the reason, for a forward it cannot replay: one that
    read a value on the host, compiled a kernel while recording, passed an intermediate inside a list, or returned a
    tensor it did not make. Source: torch's `TorchDispatchMode` (torch.utils._python_dispatch) for the ops; the launches
    as `06`'s `launch_kernel` makes them."""
    __slots__ = ("steps", "out", "stream")
    def __init__(self, rec: _PlanRecorder,   # the recorder of one eager forward
                 out: torch.Tensor,          # that forward's output
                 stream):                    # () -> (device, stream): the current stream, as the direct launches take it
        plan, out = rec.steps, rec.ref(out)
        if rec.why: raise ValueError(rec.why)
        if not isinstance(out, _V): raise ValueError("the output is not a value of the forward")
        outs = lambda o: [r for r in (o if isinstance(o, (tuple, list)) else (o,))]
        used, keep = {out.i}, []
        for kind, fn, a, k, o in reversed(plan):                 # pure ops whose outputs nothing reads: dropped
            if kind == "op" and fn in _PURE and not used.intersection(r.i for r in outs(o) if isinstance(r, _V)):
                keep.append(False); continue
            keep.append(True)
            used.update(v.i for v in (*a, *k.values()) if isinstance(v, _V))
        keep.reverse()
        renum, n = {0: 0}, 1                                      # the kept steps' values, numbered again
        for (kind, fn, a, k, o), kept in zip(plan, keep):
            for r in outs(o) if kept else ():
                if isinstance(r, _V): renum[r.i], n = n, n + 1
        self.steps, self.out, self.stream = [], renum[out.i], None
        for (kind, fn, a, k, o), kept in zip(plan, keep):
            if not kept: continue
            if any(not isinstance(v, _V) and _holds_ref(v) for v in (*a, *k.values())):
                raise ValueError(f"{fn}: an intermediate inside a list argument")
            a, k = list(a), dict(k)
            fill_a = tuple((i, renum[v.i]) for i, v in enumerate(a) if isinstance(v, _V))
            fill_k = tuple((key, renum[v.i]) for key, v in k.items() if isinstance(v, _V))
            res = None if kind != "op" else tuple(renum[r.i] if isinstance(r, _V) else None for r in outs(o))
            call = _FAST.get(fn, fn) if kind == "op" else fn
            if fn is _aten.empty.memory_format and not fill_k:          # torch.empty itself, with what it was given
                call, k = torch.empty, {n: k[n] for n in ("dtype", "device") if n in k}
            if kind == "direct": self.stream = stream
            self.steps.append((kind == "direct", call, a, k, fill_a, fill_k, res))

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        """The forward's output for `x` (the recorded shape, strides and device). No checks, raises nothing of its own
        (a hot path): `FusedMoE` replays a plan only for an `x` whose `_plan_key` matches the recording; called directly
        with another shape it runs the recorded launches unchecked. Source: moe-lit's own."""
        vals = [x]
        stream = self.stream()[1] if self.stream is not None else None
        for direct, call, a, k, fill_a, fill_k, res in self.steps:
            if fill_a:
                a = a.copy()
                for i, v in fill_a: a[i] = vals[v]
            if fill_k:
                k = k.copy()
                for key, v in fill_k: k[key] = vals[v]
            if direct:
                run, grid, function, metadata = call
                run(*grid, stream, function, metadata, None, None, None, *a)
                continue
            got = call(*a, **k)
            if res is not None:
                for o, i in zip(got if isinstance(got, (tuple, list)) else (got,), res):
                    if i is not None: vals.append(o)
        return vals[self.out]

def _plan_key(layer, hidden: torch.Tensor) -> tuple:
    """What a launch plan was recorded for: shape, strides, alignment, device and stream, the launch switches, the
    Standard experts' class-wide switches (`TritonExperts.combine_in_gemm2`, `pair_blocks_max_pairs`) and the router's
    (`ROUTER_SELECT_MAX_TOKENS`: how many tokens select in the logits launch)."""
    kb, q = sys.modules["moe_lit.kernels.batched"], sys.modules.get("moe_lit.kernels.quant")
    te = getattr(sys.modules.get("moe_lit.kernels.contiguous"), "TritonExperts", None)   # its class-wide switches
    kr = sys.modules.get("moe_lit.kernels.router")
    return (hidden.shape[0], hidden.stride(), hidden.data_ptr() % 16, hidden.device,
            kb._stream_of_current_device()[1] if hidden.is_cuda else None, kb.PDL, kb.fast_launch_on(),
            kb.triton.knobs.runtime.debug, getattr(q, "FP8_ACT_QUANT", None), kb._tile_config_root(),
            None if te is None else (te.combine_in_gemm2, te.pair_blocks_max_pairs),
            getattr(kr, "ROUTER_SELECT_MAX_TOKENS", None))

@patch
def __getstate__(self: FusedMoE) -> dict:
    """What pickling, `torch.save` and `copy.deepcopy` keep: everything but the launch plans, a cache of launch
    callables, and captured CUDA graphs (bound to this layer's memory), after pending in-place edits are taken (as the
    next call would). Plain `pickle` of float8 tensors fails in torch itself: save a quantized layer with `torch.save`."""
    if "_versions" in self.__dict__: self._follow_inplace_edits()   # an edit a counter saw is taken first: a copy
    state = self.__dict__.copy()                                     # is built from what the original would run
    state["_plans"], state["_seen"], state["graphs"] = {}, set(), {}
    return state

@patch
def __setstate__(self: FusedMoE, state: dict):
    """A copy (`copy.deepcopy`, `torch.load`) holds new tensors of the same values: its hot path is built again from
    them, and what the next call compares with recorded (a quantized copy's floats and codes are both new objects:
    not an edit of both)."""
    torch.nn.Module.__setstate__(self, state)
    if "_versions" in state:                   # (a layer pickled mid-construction has nothing to rebuild)
        with torch.inference_mode(False): self._build_hot_path()

@patch
def _planned(self: FusedMoE, hidden: torch.Tensor) -> torch.Tensor | None:
    "The forward from its launch plan (recorded at the second forward of its key), or None: run eagerly."
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing(): return None
    key = _plan_key(self, hidden)
    plan = self._plans.get(key)
    if isinstance(plan, LaunchPlan):
        mk = self._kernels.get(_kernel_key(self, hidden.shape[0]))   # the ModularKernel (and counts) it launches with
        if mk is not None and mk.prepare_finalize.__dict__.get("_counts_dirty"):
            return None                                          # a forward that failed left counts: eager zeroes them
        try: return plan.replay(hidden)
        except BaseException:                                    # the device state as eager would leave it: unknown
            self._plans = {}
            for mk in self._kernels.values():
                if "_counts" in mk.prepare_finalize.__dict__: mk.prepare_finalize._counts_dirty = True
            raise
    if plan is not None: return None                             # seen once more than never: refused (a reason)
    if key not in self._seen:
        if len(self._seen) >= _PLANS_MAX: self._seen.clear()
        self._seen.add(key); return None                         # the first forward of a key builds what it needs
    rec, kb = _PlanRecorder(hidden), sys.modules["moe_lit.kernels.batched"]
    kb.RECORDERS.append(rec)
    try:
        with rec: out = self._eager(hidden, None, True)
    finally: kb.RECORDERS.remove(rec)
    if len(self._plans) >= _PLANS_MAX: self._plans.clear()
    try: self._plans[key] = LaunchPlan(rec, out, kb._stream_of_current_device)
    except ValueError as e: self._plans[key] = str(e)            # not plannable: this key stays eager
    return out

# %% [markdown]
# ### Host time, measured
#
# How the layer's host time came down to what the plans leave, step by step.
#
# **Checked once, not once per launcher.** The metadata checks cost host time too: each public launcher
# (`fused_moe_gemm`, `batched_moe_gemm`, the quantized GEMMs, `route_topk`, `combine_pairs`, `batched_dispatch` /
# `batched_combine`) checks every argument it is given, and an experts class used to call them one after another,
# so one forward checked the same tensors up to three times (the layer, the experts class, then each launcher: 28
# `check_tensor` calls at T = 1, `nbs/bench/host_overhead_cpu_da44b2c.log`). Now each public
# function is its checks plus an unchecked twin (`_fused_moe_gemm`, `_batched_moe_gemm`, `_fused_moe_gemm_quant`,
# `_batched_moe_gemm_quant`, `_route_topk` / `_route_tokens`, `_combine_pairs`, `_batched_dispatch`, `_batched_combine`, `_local_slots`), and a caller
# that has checked or built every argument itself — the experts classes, the prepare/finalize on the layer's own
# ids, the layer's router — calls the twin. Tile choices are resolved once per shape (an `lru_cache`), and the
# host-side grid arithmetic avoids `triton.cdiv` / `triton.next_power_of_2`, whose Python wrappers (Triton's
# constexpr-function machinery) cost 2–4 µs a call under cProfile here. Measured on 2 CPU cores
# with the launches stubbed (`nbs/bench/host_overhead_cpu.py`, `host_overhead_cpu_checked_once.log`), moe-lit's own
# Python per forward went from 121–179 µs to 70–137 µs unquantized and from 150–224 to 93–158 µs with NVFP4 over
# the benchmark's deployments. On the H200 host the whole eager forward at T = 1 is still 350–820 µs against
# 43–196 µs replayed (`eager_vs_replay_h200_400d47b.log`, unquantized): the host is the bottleneck there. Triton's
# launch path (about 20 µs a kernel through the JIT against 6.5 µs for a compiled kernel's direct launch,
# `launch_cost_h200.log`) is part of it; how much of the rest is that machine's Python was not measured separately.
# Every kernel of the layer is now launched through `launch_kernel` (`06_kernels.batched`), which calls the compiled
# kernel directly after the first launch of each key: the JIT's binding and key took 47–50 µs of a decode forward's
# five or six launches on the 2-core CPU, `launch_kernel`'s own key and argument list 25–26 µs
# (`nbs/bench/launch_key_cpu.log`; the key alone over one forward's real arguments, 2.9–3.4 µs a launch: 13–14 µs a
# forward on one GPU, 22 µs on DeepSeek-V3, `host_overhead_cpu.py --keys`, `host_overhead_cpu_keys_6c08cb7.log`,
# which the stubbed-launch measurement above does not include), and the JIT's other per-call work (launch metadata, hook chains, driver lookups)
# is skipped too. On the H200 host, eager at T = 1 alternately through the JIT and through `launch_kernel`'s direct
# path in one process (`nbs/bench/eager_vs_replay.py --ab launch`, `eager_vs_replay_launch_h200_6f16892.log`, the
# same bits both ways): host time Qwen3 123 → 89 µs, Qwen3 EP2 157 → 116, gpt-oss 88 → 54, DeepSeek-V3 334 → 250
# (nixl_ep) and 324 → 249 (allgather). The host machines lent for these runs differ by 2–3× in speed (the same A/B on
# another one, `eager_vs_replay_launch_h200_5ab72e3_slowhost.log`: Qwen3 416 → 309), so compare within a run.
# Capture the forward (*CUDA graphs*, above) where host time matters.
#
# **What is left is the Python between the launches.** The same stubbed forward, with its Triton launches called
# again straight from a record of their arguments and ten allocations (`nbs/bench/host_plan_bound.py`,
# `host_plan_bound_cpu_2b07837.log`): DeepSeek-V3 nixl_ep 131 µs against 19 µs, allgather 105 against 18, Qwen3 on one
# GPU 63 against 14. About 80 % of moe-lit's own host time is the routing, dispatch, experts and combine code deciding
# again, on every call, what it decided on the last call of the same shape. A launch plan recorded once per shape
# (token count, dtype, device, the layer's weights version and the process switches: `FP8_ACT_QUANT`, the tile-table
# root, PDL) and replayed with the new input would remove most of it; it has to carry the forward's torch ops too
# (the hidden padding, allocations, views) and the shared experts' side stream. A prototype on the CPU
# (`launch_plan_proto_cpu_6b10a4a.log`; the script became the layer's own plans, above: torch's `TorchDispatchMode` records the
# aten ops, a wrapper the interpreter's kernel calls) replays every deployment's forward bit for bit on fresh inputs
# and halves the host time: Qwen3 64 → 33 µs, Qwen3 EP2 93 → 54, DeepSeek-V3 nixl_ep 137 → 71, allgather 107 → 54.
# The layer now keeps such plans, the GPU's direct launches and PDL included (the eager forward runs on one stream:
# the shared experts' side stream exists only inside a captured graph): the plans above.

# %% [markdown]
# ## Using the layer
#
# The calls a user makes, on a small layer with random weights so that the cell runs anywhere (on the CPU the
# experts are the torch reference; on a GPU, the Triton kernels). From a checkpoint,
# `FusedMoE.from_pretrained(checkpoint_dir, layer_index, parallel=...)` builds the same layer from one MoE layer's
# tensors (`11c_checkpoint`; `12c_real_models` checks it against transformers' own blocks). Under expert parallelism
# each rank builds its own layer with its `ParallelConfig` and `forward` returns that rank's share: the layer's
# output is the sum over ranks (the all-reduce, or the backend's combine; `run_emulated_ep` below runs every rank in
# one process, `13b_distributed` across processes).

# %%
# outside this notebook: from moe_lit.config import MoEConfig; from moe_lit.layer import FusedMoE;
#                        from moe_lit.testing import assert_close
device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.bfloat16)
layer = FusedMoE(cfg, seed=0, device=device)                       # random weights; `weights=` takes a source
x = torch.randn(5, 64, device=device).to(torch.bfloat16)          # [T, hidden_size] in config.dtype
y = layer(x)                                                        # [5, 64] bf16: route, experts, combine
topk_weights, topk_ids = layer.route(x)                            # the router alone: [5, 2] fp32, [5, 2] int32
state = layer.state_dict()                                          # the local experts' tensors, by name
print({k: tuple(v.shape) for k, v in state.items() if v is not None and k in ("gate", "w13", "w2")})
layer.load_state_dict(state)                                        # checked (finite, shapes) and taken
if layer.gate.is_cuda:
    layer.capture([1, 2, 4, 8])                                     # one CUDA graph per bucket
    assert_close(layer(x), y.double(), name="replayed")             # 5 tokens: the bucket of 8 replays
print(layer.experts, tuple(y.shape), y.dtype, tuple(topk_ids.shape), topk_ids.dtype)

# %% [markdown]
# The tests compare planned forwards with eager ones (`LAUNCH_PLANS` off) bit for bit, on fresh inputs, for both
# formats, quantized or not, with shared experts; then what must invalidate or bypass a plan — an in-place edit of the
# weights (read through the plan), a swapped gate (rebuilt: plans dropped), a strided input (its own key) — a replay
# that fails (plans dropped, the next eager forward right), and the recorder's refusals.

# %%
#| test launch_plans
g = torch.Generator().manual_seed(11)
base = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.bfloat16,
                 num_shared_experts=1, shared_intermediate_size=32)
xs = [torch.randn(3, 64, generator=g).to(DEVICE, torch.bfloat16) for _ in range(4)]
def plans(on: bool):     # the switch where forward reads it: the module's (the tests), this notebook's own (the docs)
    layer_mod.LAUNCH_PLANS = globals()["LAUNCH_PLANS"] = on
def planned_and_eager(layer, inputs):
    got = [layer(x) for x in inputs]                          # the 2nd records, the 3rd and 4th replay
    plans(False)
    try: want = [layer(x) for x in inputs]
    finally: plans(True)
    return got, want
for backend, quant in (("none", "unquantized"), ("nixl_ep", "unquantized"), ("nixl_ep", "fp8_w8a8_block"),
                       ("allgather_reducescatter", "mxfp4_w4a16")):
    cfg = base.replace(parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend))
    layer = FusedMoE(cfg, seed=1, experts="triton", quant=quant, device=DEVICE)
    got, want = planned_and_eager(layer, xs)
    test_eq([type(p).__name__ for p in layer._plans.values()], ["LaunchPlan"])
    for i, (a, b) in enumerate(zip(got, want)): assert torch.equal(a, b), f"{backend} {quant} call {i}"
layer = FusedMoE(base, seed=1, experts="triton", device=DEVICE)
planned_and_eager(layer, xs)
with torch.no_grad(): layer.w13.mul_(0.5)                     # edited in place: read through the plan as eager reads it
got, want = planned_and_eager(layer, xs)
for a, b in zip(got, want): assert torch.equal(a, b)
strided = [torch.randn(3, 128, generator=g).to(DEVICE, torch.bfloat16)[:, ::2] for _ in range(4)]   # its own key
got, want = planned_and_eager(layer, strided)
for a, b in zip(got, want): assert torch.equal(a, b)
test_eq(len(layer._plans), 2)
layer.gate = torch.nn.Parameter(layer.gate * 2, requires_grad=False)   # swapped: rebuilt, every plan dropped
layer(xs[0]); test_eq(layer._plans, {})
# the Standard experts' class-wide switches are in the key: a plan recorded with GEMM2's slot sum is not replayed
# after it is turned off (pair blocks: 64 experts, 2 pairs), and a bad value is named, not replayed past
layer = FusedMoE(base.replace(num_experts=64, num_shared_experts=0, shared_intermediate_size=None), seed=1,
                 experts="triton", device=DEVICE)
for _ in range(3): want = layer(xs[0][:1])                    # planned from the second call
names = lambda: [k.fn.__name__ for k, _, _ in seen]
try:
    TritonExperts.combine_in_gemm2 = "never"
    with record_launches() as seen: assert_close(layer(xs[0][:1]), want, name="slot sum off")
    assert "_batched_combine_kernel" in names(), names()
    TritonExperts.combine_in_gemm2 = "sometimes"
    test_fail(lambda: layer(xs[0][:1]), contains="combine_in_gemm2: expected 'auto', 'always' or 'never'")
finally: TritonExperts.combine_in_gemm2 = "auto"
with record_launches() as seen: assert torch.equal(layer(xs[0][:1]), want)
assert "_batched_combine_kernel" not in names(), names()
# and the router's: a plan recorded selecting in the logits launch is not replayed once that is turned off
in_logits = lambda: [kw.get("SELECT", False) for k, _, kw in seen if k.fn.__name__ == "_router_logits_kernel"]
test_eq(in_logits(), [True])
select_default = kr.ROUTER_SELECT_MAX_TOKENS
try:
    kr.ROUTER_SELECT_MAX_TOKENS = 0
    with record_launches() as seen: assert torch.equal(layer(xs[0][:1]), want)   # same code, same order: same bits
    test_eq(in_logits(), [False]); assert "_route_topk_kernel" in names(), names()
finally: kr.ROUTER_SELECT_MAX_TOKENS = select_default
# a replay that fails: the plans are dropped and the batched prepare's kept counts marked dirty; the next forward is right
cfg = base.replace(parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
layer = FusedMoE(cfg, seed=1, experts="triton", device=DEVICE)
want = [layer(x) for x in xs[:2]]
plan = next(iter(layer._plans.values()))
def boom(*a, **k): raise RuntimeError("a launch failed")
plan.steps.insert(len(plan.steps) // 2, (False, boom, [], {}, (), (), None))   # half way: the counts are dirty
test_fail(lambda: layer(xs[0]), contains="a launch failed")
test_eq(layer._plans, {})
assert next(iter(layer._kernels.values())).prepare_finalize._counts_dirty
assert torch.equal(layer(xs[1]), want[1])
# an eager forward of another token count that fails after its dispatch leaves the shared counts dirty: the next
# forward of a planned key runs eagerly (which zeroes them), not the plan
layer = FusedMoE(cfg, seed=1, experts="triton", placement="round_robin", device=DEVICE)
while True:                                                   # a row whose top-2 experts are both on this rank:
    row = torch.randn(1, 64, generator=g).to(DEVICE, torch.bfloat16)   # repeated, it fills their slabs (capacity 8)
    if bool((layer.placement.local_slot(layer.route(row)[1]) >= 0).all()): break
x7, x8 = row.repeat(7, 1), row.repeat(8, 1)                    # one slab bucket: T = 7 and 8 share the counts
want = layer(x7); layer(x7)                                   # the second forward of T = 7 records its plan
assert isinstance(next(iter(layer._plans.values())), LaunchPlan)
mk = layer._modular_kernel(8); apply = mk.experts.apply
mk.experts.apply = boom
test_fail(lambda: layer(x8), contains="a launch failed")      # T = 8 fails after its dispatch: the counts are dirty
mk.experts.apply = apply
assert torch.equal(layer(x7), want)                           # eager this time (the plan would add to the counts)
assert torch.equal(layer(x7), want)                           # and the plan again
layer = FusedMoE(cfg, seed=1, experts="triton", placement="round_robin", device=DEVICE)
with torch.inference_mode(): assert torch.equal(layer(x7), want)   # the kept counts made under inference mode,
mk = layer._modular_kernel(8); apply, mk.experts.apply = mk.experts.apply, boom   # left dirty, zeroed outside it
test_fail(lambda: layer(x8), contains="a launch failed")
mk.experts.apply = apply
assert torch.equal(layer(x7), want)
# under autocast the layer runs as without it (no cast recorded into a plan); a bad tile-table directory is refused
# by a planned forward as by an eager one (the directory is part of the key)
layer = FusedMoE(base.replace(shared_intermediate_size=None, num_shared_experts=0), seed=1, experts="triton", device=DEVICE)
x20 = torch.randn(20, 64, generator=g).to(DEVICE, torch.bfloat16)     # T > 16: the router's torch matmul
want = layer(x20)
with torch.autocast(x20.device.type, dtype=torch.bfloat16):
    for _ in range(3): assert torch.equal(layer(x20), want)
assert torch.equal(layer(x20), want)
saved = os.environ.get("MOE_LIT_TILE_CONFIG_DIR")
os.environ["MOE_LIT_TILE_CONFIG_DIR"] = "/no/such/dir"
try: test_fail(lambda: layer(x20), contains="MOE_LIT_TILE_CONFIG_DIR")
finally:
    if saved is None: os.environ.pop("MOE_LIT_TILE_CONFIG_DIR")
    else: os.environ["MOE_LIT_TILE_CONFIG_DIR"] = saved
assert torch.equal(copy.deepcopy(layer)(x20), want)           # a copy computes the same, and so does a pickled one
buf = io.BytesIO(); torch.save(layer, buf); buf.seek(0)
assert torch.equal(torch.load(buf, weights_only=False)(x20), want)
# what the recorder refuses: a value read on the host, an intermediate inside a list
x = xs[0].float()
for body, why in ((lambda: (x * 2, float((x * 2).sum())), "read a value on the host"),
                  (lambda: (torch.cat([x * 2, x]),), "an intermediate inside a list argument")):
    rec = _PlanRecorder(x)
    with rec: y = body()[0]
    try: LaunchPlan(rec, y, None); raise AssertionError(f"no refusal: {why}")
    except ValueError as e: assert why in str(e), (why, str(e))
rec = _PlanRecorder(x)
with rec: y = x * 2
plan = LaunchPlan(rec, y, None)
assert torch.equal(plan.replay(xs[1].float()), xs[1].float() * 2)           # a fresh input: its own result


# %% [markdown]
# The hot path checks metadata only; `debug=True` re-checks the layer's own values on every call, and a caller's ids
# are always checked. Each check below fails without it: a gate or expert value made non-finite after construction
# (through `.data`, or an unquantized layer's experts edited in place: the kernels read them as they are) is found
# only in debug mode; out-of-range caller ids are refused in both modes, before any kernel reads them.

# %%
#| test layer_debug_checks
torch.manual_seed(2)
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.float32,
                routing_method="grouped_topk", num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                has_correction_bias=True)
x = torch.randn(5, 32)
for debug in (False, True):
    layer = FusedMoE(cfg, seed=1, debug=debug)
    want = layer(x)
    layer.e_score_correction_bias[3] = float("nan")                     # changed behind the layer's back
    test_fail(lambda: layer(x), contains="e_score_correction_bias: expected finite values")   # the edit is seen:
                                                                        # checked once (a sync an edit, not a call)
    layer.e_score_correction_bias[3] = 0.0
    g = layer.gate[2, 3].item(); layer.gate.data[2, 3] = float("inf")     # through .data: no version, unseen
    if debug: test_fail(lambda: layer(x), contains="gate: expected finite values, got inf at [2, 3]")
    else: layer(x)
    layer.gate.data[2, 3] = g
    layer.w2.data[1, 0, 0] = float("nan")                               # an expert's value: read as it is, ...
    if debug: test_fail(lambda: layer(x), contains="w2: expected finite values, got nan at [1, 0, 0]")
    else: layer(x)
    layer.w2.data[1, 0, 0] = 0.0
    wts, ids = layer.route(x)
    for bad in (8, -2):
        test_fail(lambda: layer(x, (wts, torch.full_like(ids, bad))), contains="topk_ids: expected ids in [-1, 8)")
    test_fail(lambda: layer(x, (wts, ids[:, :1])), contains="topk_ids: expected shape [5, 2]")
    test_fail(lambda: layer(x, wts), contains="topk: expected a (topk_weights, topk_ids) tuple, got Tensor")
    test_fail(lambda: layer(x, (wts, ids, None)), contains="topk: expected a (topk_weights, topk_ids) tuple, got a 3-tuple")
    test_fail(lambda: layer(x, add_shared="yes"), contains="add_shared: expected a bool")
    test_fail(lambda: layer(x, (wts, torch.zeros_like(ids))), contains="topk_ids: expected distinct ids per token")
    layer(x, (wts, torch.full_like(ids, -1)))                             # -1 (no expert) may repeat
    sd = layer.state_dict(); sd["gate"] = sd["gate"][:, :7]
    test_fail(lambda: layer.load_state_dict(sd), contains="state_dict['gate']: expected shape [8, 32], got [8, 7]")
    assert layer._modular_kernel(5) is layer._modular_kernel(5)        # built once, reused
ep2 = lambda backend: FusedMoE(cfg.replace(parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True,
                                                                        all2all_backend=backend)), seed=1)
wide, narrow = ep2("nixl_ep"), ep2("allgather_reducescatter")      # the same experts; NIXL EP pads H 32 to 2048
test_fail(lambda: wide.load_state_dict(narrow.state_dict()),
          contains="expected shape [4, 32, 2048], got [4, 32, 32] (the hidden dimension: this deployment's is "
                   "hidden_size 32 padded to 2048 for nixl_ep's wire")
test_fail(lambda: narrow.load_state_dict(wide.state_dict()),
          contains="expected shape [4, 32, 32], got [4, 32, 2048] (the hidden dimension: this deployment's is "
                   "hidden_size 32, not padded")
test_fail(lambda: FusedMoE(cfg, debug=1), contains="debug: expected a bool")
test_fail(lambda: FusedMoE(cfg).capture(), contains="capture: expected a layer on a CUDA GPU with Triton experts")
on_gpu = SimpleNamespace(gate=SimpleNamespace(device=torch.device("cuda", 0)), use_triton=True, debug=False)  # the
for bad in (torch.tensor([1, 2]), 1.0, 4, {1: 2}, [], "8"):                              # checks after the device's
    test_fail(lambda: FusedMoE.capture(on_gpu, batch_sizes=bad), contains="batch_sizes: expected a non-empty list")
test_fail(lambda: FusedMoE.capture(on_gpu, batch_sizes=[4, 0]), contains="batch_sizes: expected >= 1")

# %% [markdown]
# A decode forward writes no constant buffer of its own: what it needs zeroed (dispatch counts, split-K counters) is
# made once and left zero again by the kernel that used it, and a few pairs take one block each with no alignment
# buffers (`08_kernels.contiguous`); the batched dispatch writes the wire's zero columns itself where a backend sends
# rows wider than the model's (`07`, `hidden_width`). `record_fills` (`00_testing`) lists any zeros / full / fill_ /
# arange / pad made during the third forward at T = 1 — the launch plan's — for both formats, with shared experts and
# a grouped router; each would be one more launch on every step.

# %%
#| test layer_decode_writes_no_constants
torch.manual_seed(10)
cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=64, intermediate_size=32, dtype=torch.bfloat16,
                routing_method="grouped_topk", num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                has_correction_bias=True, routed_scaling_factor=2.5, num_shared_experts=1, shared_intermediate_size=32)
x = torch.randn(1, 64, device=DEVICE).bfloat16()
for backend, placement in (("none", "linear"), ("allgather_reducescatter", "linear"), ("nixl_ep", "round_robin"),
                           ("deepep_low_latency", "linear")):
    par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
    layer = FusedMoE(cfg.replace(parallel=par), seed=1, device=DEVICE, experts="triton", placement=placement)
    want = layer(x); layer(x)
    with record_fills(capturing=False) as fills: got = layer(x)
    assert not fills, (backend, fills)
    assert torch.equal(got, want), backend

# %% [markdown]
# On the GPU: a forward runs without one host sync (`torch.cuda.set_sync_debug_mode("error")` raises on any), and the
# replayed graphs give the eager result — both formats, with and without quantization, a correction bias and shared
# experts, at batch sizes that fill a bucket and that leave a padded tail. The shared experts' side stream has its
# split-K counters before the capture (`10_modular`), and a capture of the decode buckets records no fill
# (`record_fills`, `00_testing`): each would be one more launch in every replay.

# %%
#| test layer_cuda_graphs
#| gpu
torch.manual_seed(8)
base = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                 routing_method="grouped_topk", num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                 has_correction_bias=True, routed_scaling_factor=2.5, num_shared_experts=1, shared_intermediate_size=64)
x = torch.randn(16, 256, device="cuda").bfloat16()
for backend, placement in (("none", "linear"), ("allgather_reducescatter", "linear"), ("nixl_ep", "round_robin"),
                           ("deepep_low_latency", "linear")):
    par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
    for quant in ("unquantized", "fp8_w8a8_block", "mxfp4_w4a16"):
        cfg = base.replace(parallel=par)
        layer = FusedMoE(cfg, seed=1, device="cuda", quant=quant, placement=placement)
        eager = {T: layer(x[:T]) for T in (5, 8, 13, 16)}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try: layer(x[:13])                                       # no host sync anywhere in forward
        finally: torch.cuda.set_sync_debug_mode(0)
        with record_fills() as fills: layer.capture((1,))        # one pair block a pair: no alignment, whose buffers
                                                                 # are filled each forward (4 pairs <= 16 experts / 4)
        assert not fills, (backend, quant, fills)                # every constant a replay needs was made before it
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:   # and what the replay
            layer.graphs[1][0].replay(); torch.cuda.synchronize()                                  # launches: no fill,
        launched = [e.name for e in prof.events() if e.device_type.name == "CUDA"]                # whichever op (an aten
        assert not [k for k in launched if "FillFunctor" in k], (backend, quant, launched)        # op's own included)
        layer.capture((8, 16))
        for mk in layer._kernels.values():                       # the shared experts' stream was made before the capture,
            if mk.shared_experts is not None:                    # its counters kept: no fill recorded in the graph
                assert (torch.cuda.current_device(), mk._side_stream.cuda_stream) in kb._COUNTERS, (backend, quant)
        for T, want in eager.items():                            # 5 and 13 run with a padded tail
            got = layer(x[:T])
            test_eq(got.shape, (T, 256))
            rtol = check_tolerance(cfg.dtype, quant, layer.experts)[0]
            assert_close(got, want.double(), rtol=rtol, name=f"{backend} {quant} T={T}")
        big = layer(x.repeat(2, 1))                              # larger than every bucket: eager
        assert_close(big[16:], eager[16].double(), rtol=rtol)

# %% [markdown]
# On the GPU the layer's launches skip Triton's JIT after the first of each key (`launch_kernel`,
# `06_kernels.batched`): a second forward makes no JIT launch at all, and gives the JIT path's bits, for both formats, quantized or not.

# %%
#| test layer_fast_launch
#| gpu
assert kb.FAST_LAUNCH == triton.__version__.startswith("3.6.")       # on by default where its convention was checked
torch.manual_seed(9)
x = torch.randn(6, 256, device="cuda").bfloat16()
first, stream = kb._first_launch, kb._stream_of_current_device
counts = {"first": 0, "launches": 0}
def counting_first(*a): counts["first"] += 1; return first(*a)
def counting_stream(): counts["launches"] += 1; return stream()
for backend in ("none", "nixl_ep"):
    par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
    for quant in ("unquantized", "fp8_w8a8_block", "nvfp4_w4a16"):
        cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                        num_shared_experts=1, shared_intermediate_size=64, parallel=par)
        layer = FusedMoE(cfg, seed=1, device="cuda", quant=quant)
        kb.FAST_LAUNCH = False
        try: want = [layer(x), layer(x[:1])]
        finally: kb.FAST_LAUNCH = True
        layer(x); layer(x[:1])                                         # first launch of each key: the JIT
        kb._first_launch, kb._stream_of_current_device = counting_first, counting_stream
        counts.update(first=0, launches=0)
        try: got = [layer(x), layer(x[:1])]
        finally: kb._first_launch, kb._stream_of_current_device = first, stream
        assert counts["first"] == 0 and counts["launches"] >= 8, counts   # every launch straight to its compiled kernel
        for g, w in zip(got, want): assert torch.equal(g, w), f"{backend} {quant}: the fast launch changed the result"

# %%
#| test layer_programmatic_dependent_launch
#| gpu
torch.manual_seed(10)
xs = [torch.randn(8, 256, device="cuda").bfloat16() for _ in range(4)]
saved = kb.PDL
try:
    for shared in (1, 0):                                      # the default, "auto": on only without shared experts
        cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                        num_shared_experts=shared, shared_intermediate_size=64 if shared else None)
        layer, kb.PDL = FusedMoE(cfg, seed=1, device="cuda"), "auto"
        with record_launches() as seen: layer(xs[0][:1])
        test_eq({kw.get("PDL") is True for _, _, kw in seen}, {not shared})
        test_eq(kb.PDL_IN_CHAIN, False)                        # set for the forward's launches only
    for backend, quant in (("none", "unquantized"), ("nixl_ep", "unquantized"), ("allgather_reducescatter", "unquantized"),
                           ("none", "fp8_w8a8_block"), ("nixl_ep", "nvfp4_w4a16"), ("none", "mxfp4_w4a16")):
        par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
        cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                        num_shared_experts=1, shared_intermediate_size=64, parallel=par)
        layer = FusedMoE(cfg, seed=1, device="cuda", quant=quant)
        kb.PDL = False
        want = [layer(x[:t]) for x in xs for t in (1, 2, 8)]
        kb.PDL = True                                          # as MOE_LIT_PDL=1 at import
        with record_launches() as seen: layer(xs[0][:1])
        assert seen and all(kw.get("PDL") is True and kw.get("launch_pdl") is True for _, _, kw in seen), \
            f"{backend} {quant}: a launch without the attribute: {[k.fn.__name__ for k, _, kw in seen if not kw.get('PDL')]}"
        got = [layer(x[:t]) for x in xs for t in (1, 2, 8)]   # back to back, no sync between: a missing wait shows
        layer.capture(batch_sizes=(1, 8))
        replayed = [layer(x[:t]) for x in xs for t in (1, 2, 8)]
        layer.graphs = {}
        for i, (g, r, w) in enumerate(zip(got, replayed, want)):
            assert torch.equal(g, w) and torch.equal(r, w), f"{backend} {quant} call {i}: PDL changed the result"
finally: kb.PDL = saved

# %%
#| test fused_moe_single_device
torch.manual_seed(0)
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.float32)
layer = FusedMoE(cfg, seed=1)
x = torch.randn(5, 32)
wts, ids = layer.route(x)
test_eq((wts.dtype, ids.dtype, tuple(ids.shape)), (torch.float32, torch.int32, (5, 2)))
want = moe_reference_standard(x.double(), layer.w13.double(), layer.w2.double(), wts, ids)
assert_close(layer(x), want)
test_fail(lambda: layer(x.bfloat16()), contains="hidden: expected dtype torch.float32")
test_fail(lambda: layer(torch.randn(5, 31)), contains="hidden: expected shape [*, 32]")
test_fail(lambda: layer(x.to("meta")), contains="hidden: expected a tensor on the layer's device cpu, got meta")
test_fail(lambda: layer.route(x.to("meta")), contains="hidden: expected a tensor on the layer's device cpu, got meta")
w, i = layer.route(x)
test_fail(lambda: layer(x, (w.to("meta"), i)), contains="topk_weights: expected a tensor on the layer's device cpu, got meta")
test_fail(lambda: layer(x, (w, i.to("meta"))), contains="topk_ids: expected a tensor on the layer's device cpu, got meta")
test_fail(lambda: layer(x, (w.clone().fill_(float("nan")), i)), contains="topk_weights: expected finite values, got nan")

# %% [markdown]
# The Triton kernels keep no autograd graph, so a Triton layer refuses an input that wants a gradient (its gradient
# would be silently zero, or only the shared experts' part) and names the ways out; the torch layer trains.

# %%
#| test layer_refuses_a_gradient
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float32,
                num_shared_experts=1, shared_intermediate_size=48)
layer, torch_layer = FusedMoE(cfg, experts="triton", seed=1, device=DEVICE), FusedMoE(cfg, experts="torch", seed=1)
x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
for f in (lambda: layer(x), lambda: layer.route(x)):
    test_fail(f, contains="hidden: expected a tensor that needs no gradient (the Triton kernels keep no autograd graph)")
w, i = layer.route(x.detach())
test_fail(lambda: layer(x.detach(), (w.clone().requires_grad_(), i)), contains="topk_weights: expected a tensor that needs no")
for name in ("w13", "gate", "shared_experts.w2"):                               # a weight made trainable: named too
    t = layer.get_parameter(name) if name != "gate" or "gate" in layer._parameters else layer.get_buffer(name)
    t.requires_grad_(True)
    try: test_fail(lambda: layer(x.detach()), contains=f"{name}: expected a tensor that needs no gradient")
    finally: t.requires_grad_(False)
with torch.no_grad(): y = layer(x)                                              # inference is what it is for
assert torch.equal(layer(x.detach()), y) and not y.requires_grad
xt = x.detach().cpu().requires_grad_()
torch_layer(xt).square().sum().backward()                                      # the torch layer's gradient flows
assert xt.grad is not None and xt.grad.abs().sum() > 0
assert torch_layer.w13.grad is None                                             # its weights are created frozen ...
for p in (torch_layer.w13, torch_layer.w2): p.requires_grad_(True)              # ... and train once asked to
torch_layer(xt).square().sum().backward()
assert torch_layer.w13.grad.abs().sum() > 0 and torch_layer.w2.grad.abs().sum() > 0
for p in (torch_layer.w13, torch_layer.w2): p.requires_grad_(False); p.grad = None
assert_close(torch_layer(x.detach().cpu()), y.cpu())

# %% [markdown]
# **Quantized weights.** With `quant`, the layer quantizes float experts at load (`09a_quant_weights`; a quantized
# checkpoint's codes run as stored, `from_pretrained`) and keeps the
# dequantized weights beside the codes: the quantized experts read the codes, the torch references (and the dequant
# emulations) read the dequantized weights, so a check against the reference measures the kernels, and the
# activation quantization of w8a8 — never the weight rounding, which both sides share. The price is memory: the layer holds
# both, the 16-bit parameters and the codes (for a DeepSeek-V3 EP8 rank's 32 local experts in bf16, 2.8 GB of
# parameters plus 0.79 GB of NVFP4 codes and scales, 0.75 GB of MXFP4 or 1.4 GB of FP8), so today a quantized layer costs more memory than a
# 16-bit one, not less; what the quantized kernels save is bandwidth, and their time.

# %%
#| test fused_moe_quantized
torch.manual_seed(3)
x = torch.randn(6, 64).bfloat16()
for fmt_backend in ("none", "nixl_ep"):
    par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=fmt_backend)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=64, parallel=par)
    for quant, experts in (("fp8_w8a8_block", "triton"), ("mxfp4_w4a16", "triton"), ("nvfp4_w4a16", "torch"),
                           ("fp8_w8a8_channel", "torch")):
        layer = FusedMoE(cfg, seed=1, quant=quant, experts=experts, device=DEVICE)
        test_eq(layer.experts, {"triton": "triton_quant", "torch": "torch"}[experts])
        fp8_wire = (fmt_backend, quant, experts) == ("nixl_ep", "fp8_w8a8_block", "triton")   # FP8 before dispatch
        test_eq(layer.dispatch_quant, (1, 128) if fp8_wire else None)
        topk = layer.route(x.to(DEVICE))
        local = layer.placement.local_slot(topk[1])
        w13, w2 = layer.w13[:, :, :64].double().cpu(), layer.w2[:, :64].double().cpu()   # NIXL EP pads H to 2048
        want = moe_reference_standard(x.double(), w13, w2, topk[0].cpu(), local.cpu())
        got = layer(x.to(DEVICE), topk)
        rtol = check_tolerance(cfg.dtype, quant, layer.experts)[0]     # w8a8 also rounds activations, twice
        assert_close(got.cpu(), want, rtol=rtol, name=f"{fmt_backend} {quant} {experts}")
        cos = torch.nn.functional.cosine_similarity(got.double().cpu().flatten(), want.flatten(), dim=0)
        assert cos > 0.995, (quant, cos)
        if experts == "triton":                    # debug: the experts' checked entry, not the layer's trusted one
            checked = FusedMoE(cfg, seed=1, quant=quant, experts=experts, device=DEVICE, debug=True)
            assert not checked._modular_kernel(len(x)).experts.trusted and layer._modular_kernel(len(x)).experts.trusted
            test_eq(torch.equal(checked(x.to(DEVICE), topk), got), True)
test_fail(lambda: FusedMoE(cfg, quant="int4"), contains="quant: expected one of")
sc = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32, num_shared_experts=1, shared_intermediate_size=32)
xs = torch.randn(3, 64, dtype=sc.dtype).to(DEVICE)
for quant in ("unquantized", "fp8_w8a8_block"):       # with shared experts: debug adds checks, not another rounding
    fast, checked = (FusedMoE(sc, seed=1, quant=quant, experts="triton", device=DEVICE, debug=d) for d in (False, True))
    assert torch.equal(fast(xs), checked(xs)), quant

# %% [markdown]
# Moving the module (`layer.to(device)`, as `model.to("cuda")` does in transformers) takes along what is not a
# parameter: the quantized experts, the placement tables and the router's gate copy, rebuilt on the new device
# (captured graphs are dropped). A dtype conversion is refused by name: the config says the layer's dtype.
# A layer built on `meta` (deferred initialization: no memory until the weights come) is given values the usual ways,
# `to_empty(device=...)` then `load_state_dict`, or `load_state_dict(..., assign=True)`; its placement tables, which
# hold no values on meta, are made again on the device from the placement they describe (`04_placement.Placement.to`).
# A load that leaves some tensors on meta (`strict=False`) is refused by name, and so is building the layer under
# `with torch.device("meta")` (the layer makes or loads its weights and checks them while it is built).

# %%
#| test layer_moves_with_module
cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=64, intermediate_size=64)
for quant in ("unquantized", "mxfp4_w4a16"):
    layer = FusedMoE(cfg, seed=1, quant=quant)                  # built on the cpu
    x = torch.randn(3, 64).bfloat16()
    want = layer(x)
    if DEVICE != "cpu":                                       # a GPU machine: the cpu-built layer runs there
        layer.to(DEVICE)
        held = [t for t in (layer.router_gate, layer.placement.slot_table, layer.placement.expert_map) if t is not None]
        if layer.qweights is not None: held += [layer.qweights.w13, layer.qweights.w2_scale]
        test_eq({t.device.type for t in held}, {"cuda"})
        assert_close(layer(x.to(DEVICE)).cpu(), want.double(), rtol=check_tolerance(cfg.dtype, quant, layer.experts)[0])
layer = FusedMoE(cfg, seed=1).to("meta")                       # no values, but every device tensor follows
test_eq({t.device.type for t in (layer.router_gate, layer.placement.slot_table, layer.w13)}, {"meta"})
test_fail(lambda: layer(x.to("meta")), contains="hidden: expected a tensor with values, got a meta tensor")
test_fail(lambda: layer.to("cpu"), contains="device: expected meta for a layer on meta (it holds no values to move")
ref = FusedMoE(cfg, seed=1, device=DEVICE)
for how in ("to_empty", "assign"):                            # deferred initialization: built on meta, then given values
    deferred = FusedMoE(cfg, seed=2, device=DEVICE).to("meta")   # built where it will run: the same experts as ref
    if how == "to_empty": deferred.to_empty(device=DEVICE).load_state_dict(ref.state_dict())
    else: deferred.load_state_dict(ref.state_dict(), assign=True)
    test_eq({t.device.type for t in (deferred.router_gate, deferred.placement.slot_table, deferred.w13)}, {ref.gate.device.type})
    assert torch.equal(deferred(x.to(DEVICE)), ref(x.to(DEVICE))), how
partial = FusedMoE(cfg, seed=2).to("meta")                   # a partial assign leaves w2 on meta: named, then and after
test_fail(lambda: partial.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "w2"}, strict=False, assign=True),
          contains=f"parameters and buffers: expected all on one device, got w13, gate on {ref.gate.device}; w2 on meta")
test_fail(lambda: partial(x.to(DEVICE)), contains="parameters and buffers: expected all on one device")
with torch.device("meta"):                                   # built under torch's default device meta: refused by name
    test_fail(lambda: FusedMoE(cfg), contains="device: expected torch's default device to hold values")
test_fail(lambda: FusedMoE(cfg, device="meta"), contains="device: expected a device to hold values while the layer is "
          "built (it makes or loads weights and checks them), got meta; build it, then .to('meta')")
test_fail(lambda: FusedMoE(cfg, device="metal"), contains="device: expected 'cpu', 'cuda' or a torch.device, got 'metal'")
assert "num_experts=4, top_k=2, hidden_size=64" in repr(layer) and "holding 4 experts" in repr(layer)   # print(layer)
qlayer = FusedMoE(cfg, seed=1, quant="mxfp4_w4a16")
test_fail(lambda: qlayer.to("meta"), contains="device: expected a device with values for a mxfp4_w4a16 layer")
test_eq({t.device.type for t in (qlayer.w13, qlayer.gate, qlayer.qweights.w13)}, {"cpu"})   # refused before a move
layer = FusedMoE(cfg, seed=1)
test_fail(lambda: layer.to(torch.float32), contains="w13: expected the layer to keep its dtype torch.bfloat16")
y, gate = layer(x), layer.gate.clone()
for cast in (lambda m: m.bfloat16(), lambda m: m.to(torch.bfloat16), lambda m: torch.nn.Sequential(m).to(torch.bfloat16)):
    cast(layer)                             # a cast to the layer's own dtype: the experts as they were, the router fp32
    test_eq((layer.w13.dtype, layer.gate.dtype), (torch.bfloat16, torch.float32))
    assert torch.equal(layer.gate, gate) and torch.equal(layer(x), y)
test_fail(lambda: torch.nn.Sequential(layer).half(), contains="w13: expected the layer to keep its dtype torch.bfloat16 (build it")
if not torch.cuda.is_available():
    test_fail(lambda: layer.cuda(), contains="device: expected a device this machine has, got an error moving there")
test_fail(lambda: FusedMoE(MoEConfig(8, 2, 32, 16), backend="foo"), contains="backend: expected one of")
test_fail(lambda: FusedMoE(MoEConfig(8, 2, 32, 16), placement="bogus"), contains="placement: expected one of ['linear', 'round_robin']")
if not torch.cuda.is_available():        # a forced Triton backend on the CPU runs in the interpreter (resolve_experts)
    c8 = MoEConfig(8, 2, 64, 32)
    lay = FusedMoE(c8, seed=1, experts="triton", quant="fp8", backend="triton_contiguous_dequant")   # FP8 dequantized
    test_eq(lay.experts, "triton"); xq = torch.randn(3, 64, dtype=c8.dtype)
    ref = moe_reference_standard(xq.double(), lay.w13.double(), lay.w2.double(), *lay.route(xq))
    assert check_output(lay(xq), ref, c8.dtype)["ok"]
test_eq((layer.w13.dtype, layer.gate.dtype), (torch.bfloat16, torch.float32))                            # nothing converted

# %% [markdown]
# `load_state_dict` into a quantized layer re-quantizes: after loading another layer's float weights, the output is
# the new weights' (dequantized) result with both the Triton quantized experts and the torch experts, and quantized
# tensors in the state_dict are refused.

# %%
#| test quantized_layer_load_state_dict
torch.manual_seed(7)
cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=128)
x = torch.randn(5, 128).bfloat16().to(DEVICE)
donor = FusedMoE(cfg, seed=11, device=DEVICE)                                   # other float weights
for experts in ("torch", "triton"):
    layer = FusedMoE(cfg, seed=1, quant="fp8_w8a8_block", experts=experts, device=DEVICE)
    old = layer.qweights.w13.clone()
    layer.load_state_dict(donor.state_dict())
    assert not torch.equal(layer.qweights.w13.view(torch.uint8), old.view(torch.uint8))   # the codes were redone
    cos = torch.nn.functional.cosine_similarity(layer.w13.double().flatten(), donor.w13.double().flatten(), dim=0)
    assert cos > 0.999, cos                                                      # the kept floats are the new weights'
    topk = layer.route(x)
    ref = moe_reference_standard(x.double().cpu(), layer.w13.double().cpu(), layer.w2.double().cpu(), topk[0].cpu(), topk[1].cpu())
    check = check_output(layer(x, topk), ref, cfg.dtype, layer.quant, layer.experts)
    assert check["ok"], (experts, check)                                         # the codes are the new weights' too
    q = layer.state_dict(); q["w13"] = layer.qweights.w13
    test_fail(lambda: layer.load_state_dict(q), contains="state_dict['w13']: expected float weights")
    codes = layer.qweights.w13.clone()
    bad = {**donor.state_dict(), "w2": donor.w2 * float("nan")}
    test_fail(lambda: layer.load_state_dict(bad), contains="state_dict['w2']: expected finite values")
    assert torch.equal(layer.qweights.w13.view(torch.uint8), codes.view(torch.uint8)) and layer.w2.isfinite().all()
mx = FusedMoE(cfg, seed=1, quant="mxfp4_w4a16", device=DEVICE)
before, y = {k: v.clone() for k, v in mx.state_dict().items()}, mx(x)
big = {k: v.clone() for k, v in before.items()}; big["w13"].view(-1)[7] = 1e36   # finite in bf16, past MXFP4's range
test_fail(lambda: mx.load_state_dict(big), contains="state_dict['w13']: expected |values| <= 6·2^113")
assert all(torch.equal(v, before[k]) for k, v in mx.state_dict().items()) and torch.equal(mx(x), y)   # nothing changed

# %% [markdown]
# Under EP each rank's state_dict names its experts (`_extra_state`): rank 1's weights, the same shapes as rank 0's,
# are refused by rank 0's layer, which keeps its own; its own state_dict, a state_dict without the key and a
# safetensors round trip load.

# %%
#| test state_dict_names_its_experts
x = torch.randn(5, 128).bfloat16().to(DEVICE)
for backend, quant in (("nixl_ep", "unquantized"), ("allgather_reducescatter", "fp8_w8a8_block")):
    mk = lambda r: MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64,
                             parallel=ParallelConfig.make(1, 2, dp_rank=r, enable_expert_parallel=True,
                                                          all2all_backend=backend))
    r0, r1 = (FusedMoE(mk(r), seed=1, quant=quant, device=DEVICE) for r in (0, 1))
    sd0, sd1 = r0.state_dict(), r1.state_dict()
    test_eq((sd0["_extra_state"].tolist(), sd1["_extra_state"].tolist(), sd1["_extra_state"].dtype), ([0, 1], [2, 3], torch.int64))
    assert sd0["w13"].shape == sd1["w13"].shape and not torch.equal(sd0["w13"], sd1["w13"])   # same shapes, other experts
    y = r0(x)
    test_fail(lambda: r0.load_state_dict(sd1), contains="state_dict['_extra_state']: expected the experts this layer "
              "holds (EP rank 0 of 2, logical ids [0, 1]), got ids [2, 3]")
    assert all(torch.equal(v, sd0[k]) for k, v in r0.state_dict().items()) and torch.equal(r0(x), y)   # nothing changed
    for bad, msg in (([0, 1], "got list"), (torch.tensor([0.0, 1.0]), "got a float32 tensor of shape [2]"), (None, "got NoneType"),
                     (torch.tensor([0, 1], dtype=torch.uint8), "got a uint8 tensor"),
                     (torch.arange(2, device="meta"), "on meta (no values)")):
        test_fail(lambda: r0.load_state_dict({**sd0, "_extra_state": bad}), contains=msg)
    r0.load_state_dict(sd0)                                                     # its own
    r0.load_state_dict({k: v for k, v in sd0.items() if k != "_extra_state"})    # built by hand: strict, no key
    with tempfile.TemporaryDirectory() as d:
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd0.items()}, os.path.join(d, "r0.safetensors"))
        r0.load_state_dict(safetensors.torch.load_file(os.path.join(d, "r0.safetensors"), device=str(DEVICE)))
    assert torch.equal(r0(x), y)
rr = FusedMoE(MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64, scoring_func="sigmoid",
                        routing_method="grouped_topk", num_expert_group=2, topk_group=1,
                        parallel=ParallelConfig.make(1, 2, dp_rank=1, enable_expert_parallel=True,
                                                     all2all_backend="nixl_ep")), seed=1, device=DEVICE,
              placement="round_robin")
test_eq((rr.placement.strategy, rr.state_dict()["_extra_state"].tolist()), ("round_robin", [1, 3, 5, 7]))   # r, r + 2, ...
one = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64)
glob = FusedMoE(one, seed=2, device=DEVICE).state_dict()                      # a single-device state_dict: global
test_eq(torch.equal(FusedMoE(mk(1), weights=glob, device=DEVICE).w13, FusedMoE(mk(1), seed=2, device=DEVICE).w13), True)
test_fail(lambda: FusedMoE(one, weights={**glob, "_extra_state": torch.tensor([2, 3])}),
          contains="weights['_extra_state']: expected the ids 0 .. 3 of a single-device layer's state_dict")
for bad in (None, torch.arange(4, dtype=torch.uint8), torch.arange(4, device="meta")):   # as load_state_dict refuses them
    test_fail(lambda: FusedMoE(one, weights={**glob, "_extra_state": bad}), contains="weights['_extra_state']: expected the 1-D")
eplb = one.replace(parallel=ParallelConfig.make(tp_size=1, dp_size=1, enable_eplb=True), num_redundant_experts=2)
lb = FusedMoE(eplb, seed=2, device=DEVICE)                  # a single device with two replicas: slots of 0 1 2 3 0 1
sd = lb.state_dict()
test_eq(sd["_extra_state"].tolist(), [0, 1, 2, 3, 0, 1])
test_eq(torch.equal(FusedMoE(one, weights=sd, device=DEVICE).w13, lb.w13[:4]), True)    # global: every expert is there
test_eq(torch.equal(FusedMoE(eplb, weights=sd, device=DEVICE).w13, lb.w13), True)
xe = torch.randn(3, eplb.hidden_size, dtype=eplb.dtype, device=DEVICE)
want = lb(xe)
with torch.no_grad(): lb.replicas[0].copy_(lb.replicas[0][[1, 0, 2, 3]])   # EPLB's table edited in place (a valid
test_fail(lambda: lb(xe), contains="replicas: expected eplb_replicas(num_experts, num_redundant_experts, ep_size) of "
          "the config")                                     # permutation): the weights were loaded by the config's
with torch.no_grad(): lb.replicas[0].copy_(lb.replicas[0][[1, 0, 2, 3]])   # put back: taken
test_eq(torch.equal(lb(xe), want), True)
for key in ("w13", "w2"):                                   # replicas that differ: refused by both entry points, by slot
    bad = {**sd, key: sd[key].clone()}
    bad[key][5] += 1
    test_fail(lambda: lb.load_state_dict(bad), contains=f"state_dict['{key}']: expected slots 1 and 5, replicas of "
              "logical expert 1, to hold the same weights")
    test_fail(lambda: FusedMoE(one, weights=bad), contains=f"weights['{key}']: expected slots 1 and 5")
    test_fail(lambda: lb.load_state_dict({k: v for k, v in bad.items() if k != "_extra_state"}), contains="slots 1 and 5")
assert torch.equal(lb.w13, sd["w13"].to(DEVICE)) and torch.equal(lb.w13[5], lb.w13[1])  # a refused load changes nothing
for bad, msg in (({**sd, "w13": sd["w13"].to("meta")}, "expected a dense tensor with values, got a meta tensor"),
                 ({**sd, "w2": sd["w2"].to_sparse()}, "expected a dense tensor with values, got layout torch.sparse_coo"),
                 ({**sd, "w2": sd["w2"][[1, 0, 2, 3]]}, "['w2']: expected 6 rows, one per expert id of its _extra_state"),
                 ({**sd, "_extra_state": torch.tensor([3, 2, 1, 0, 3])}, "['w13']: expected 5 rows, one per expert id")):
    test_fail(lambda: FusedMoE(one, weights=bad), contains=msg)
nan = {**sd, "w13": sd["w13"].clone()}
nan["w13"][[1, 5], 0, 0] = float("nan")                     # both replicas NaN: named as NaN, not as a mismatch
test_fail(lambda: FusedMoE(one, weights=nan), contains="weights['w13']: expected finite values")
test_fail(lambda: lb.load_state_dict(nan), contains="state_dict['w13']: expected finite values")
perm = FusedMoE(one, seed=4, device=DEVICE).state_dict()    # a state_dict of every expert in another order
order = torch.tensor([2, 0, 3, 1])
swapped = {**perm, "_extra_state": order, **{k: perm[k][order.to(perm[k].device)] for k in ("w13", "w2")}}
test_eq(torch.equal(FusedMoE(one, weights=swapped, device=DEVICE).w13, perm["w13"].to(DEVICE)), True)

# %% [markdown]
# An in-place edit of a weight the hot path keeps a copy of — the gate (its bf16 copy for the router's GEMM), a
# quantized layer's float experts (their codes) — is followed at the next call: the layer compares the tensors'
# version counters (no sync), and which tensors they are, and rebuilds the copy, as `load_state_dict` does. So is
# an edit of a quantized layer's codes or scales (`layer.qweights.w2_scale.mul_(2)`): the container is checked again,
# as a new one would be (NaN codes, scale ranges), and the float experts follow the codes; edits of both the float
# experts and the codes before one call are refused (neither is guessed to win). Captured
# graphs are dropped then. The layer makes its tensors outside inference mode even when it is built, moved or
# reloaded inside `torch.inference_mode()` (whose tensors keep no version counter), so edits there are followed
# too. An edit through `.data` (`layer.gate.data.copy_(w)`) bypasses the version counter, and so does one to an
# inference tensor swapped in by hand: after those, call `layer.refresh()` (*Edits no counter sees*, below).

# %%
#| hide
import dataclasses

# %%
#| test layer_follows_inplace_edits
torch.manual_seed(12)
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64, dtype=torch.bfloat16)
x = torch.randn(6, 128).bfloat16().to(DEVICE)
for experts in ("torch", "triton"):
    layer = FusedMoE(cfg, seed=1, experts=experts, device=DEVICE)
    before = layer.route(x)[1]
    with torch.no_grad(): layer.gate.mul_(-1)                                  # every choice flips to the other end
    fresh = FusedMoE(cfg, seed=2, experts=experts, device=DEVICE)
    fresh.load_state_dict(layer.state_dict())                                  # the edited gate, loaded
    test_eq(layer.route(x)[1].cpu(), fresh.route(x)[1].cpu())                  # (fastcore compares through numpy)
    assert not torch.equal(layer.route(x)[1].sort(-1).values, before.sort(-1).values)
    bl = FusedMoE(cfg.replace(has_router_bias=True, has_correction_bias=True, scoring_func="sigmoid"), seed=1,
                  experts=experts, device=DEVICE)
    for n in ("gate_bias", "e_score_correction_bias"):                       # every router tensor alike (a NaN
        with torch.no_grad(): getattr(bl, n)[1] = float("nan")              # bias, too, zeroed the output)
        test_fail(lambda: bl(x), contains=f"{n}: expected finite values, got nan at [1]")
        with torch.no_grad(): getattr(bl, n)[1] = 0.0
        test_eq(bl(x).shape, (6, 128))
    g35 = layer.gate[3, 5].item()
    with torch.no_grad(): layer.gate[3, 5] = float("nan")                   # a NaN written in: refused where it is
    for f in (lambda: layer(x), lambda: layer.route(x)):                     # seen (it would route every token to
        test_fail(f, contains="gate: expected finite values, got nan at [3, 5]")   # weight 0: an output of zeros)
    with torch.no_grad(): layer.gate[3, 5] = g35
    q = FusedMoE(cfg, seed=1, quant="fp8_w8a8_block", experts=experts, device=DEVICE)
    codes = q.qweights.w13.clone()
    with torch.no_grad(): q.w13[:, :8].neg_()                                # (a power-of-two scale would keep the codes)
    y = q(x)                                                                   # the codes follow the edited floats
    assert not torch.equal(q.qweights.w13.view(torch.uint8), codes.view(torch.uint8))
    ref = moe_reference_standard(x.double().cpu(), q.w13.double().cpu(), q.w2.double().cpu(), *[t.cpu() for t in q.route(x)])
    r = check_output(y.cpu(), ref, cfg.dtype, q.quant, q.experts); assert r["ok"], (experts, r)
    versions = q._versions
    q(x); test_eq(q._versions, versions)                                       # no edit since: nothing redone
    q.w13 = torch.nn.Parameter(q.w13.detach().clone(), requires_grad=False)   # a swapped Parameter counts too
    q(x); assert q._versions != versions
    good_q = q.qweights
    q.qweights = quantize_expert_weights(q.w13.detach()[:3], q.w2.detach()[:3], q.quant)   # codes of 3 experts, not 4
    test_fail(lambda: q(x), contains=f"qweights: expected 8 experts, hidden_size 128, intermediate_size 64 on {q.gate.device}")
    q.qweights = "fp8 codes"                                                   # not a container at all: named too
    test_fail(lambda: q(x), contains="qweights: expected 8 experts, hidden_size 128, intermediate_size 64 on")
    test_fail(lambda: q(x), contains="got a str, not a QuantizedExpertWeights")
    q.qweights = dataclasses.replace(good_q, w13_scale=good_q.w13_scale * 4)     # new scales, same codes: taken,
    y = q(x)                                                                   # and the float experts follow them
    assert torch.equal(q.w13.detach(), q.qweights.dequantize()[0].to(q.w13.dtype))
    ref = moe_reference_standard(x.double().cpu(), q.w13.double().cpu(), q.w2.double().cpu(), *[t.cpu() for t in q.route(x)])
    r = check_output(y.cpu(), ref, cfg.dtype, q.quant, q.experts); assert r["ok"], (experts, r)
    with torch.no_grad(): q.qweights.w2_scale.mul_(2)                          # scales edited in place: followed too
    y = q(x)
    assert torch.equal(q.w2.detach(), q.qweights.dequantize()[1].to(q.w2.dtype))
    ref = moe_reference_standard(x.double().cpu(), q.w13.double().cpu(), q.w2.double().cpu(), *[t.cpu() for t in q.route(x)])
    r = check_output(y.cpu(), ref, cfg.dtype, q.quant, q.experts); assert r["ok"], (experts, r)
    with torch.no_grad(): q.qweights.w2_scale.mul_(2); q.w13.mul_(1.0)          # both edited: which wins is not guessed
    test_fail(lambda: q(x), contains="w13, w2 and qweights: expected an in-place edit of the float experts or of the codes")
    q.load_state_dict(q.state_dict())                                          # a load settles it: the codes follow
    ref = moe_reference_standard(x.double().cpu(), q.w13.double().cpu(), q.w2.double().cpu(), *[t.cpu() for t in q.route(x)])
    r = check_output(q(x).cpu(), ref, cfg.dtype, q.quant, q.experts); assert r["ok"], (experts, r)
    q.qweights.w2.view(torch.uint8)[1, 2, 3] = 0x7F                            # a NaN code written in place: refused
    test_fail(lambda: q(x), contains="w2: expected FP8 e4m3 codes, none NaN (0x7F/0xFF), got NaN at index [1, 2, 3]")
    mk = layer._modular_kernel(6)                                              # the layer's own: no per-call checks
    test_eq((mk.owned, getattr(mk.experts, "weights_checked", experts == "torch")), (True, True))
    for name, bad in (("w13", layer.w13.detach()[:, :-2]), ("w2", layer.w2.detach().float()),
                      ("gate", layer.gate.detach()[:-1])):              # so a swap is checked once, where it happens
        good = getattr(layer, name)
        setattr(layer, name, torch.nn.Parameter(bad, requires_grad=False) if name != "gate" else None)
        if name == "gate": layer.register_buffer("gate", bad)
        test_fail(lambda: layer(x), contains=f"{name}: expected shape")
        if name == "gate": layer.register_buffer("gate", good)
        else: setattr(layer, name, good)
    good = layer.gate; layer.gate = None                                       # gone: named before anything reads it
    for f in (lambda: layer(x), lambda: layer.route(x)): test_fail(f, contains="gate: expected shape")
    layer.gate = good
    test_eq(layer(x).shape, (6, 128))
    good = layer.placement                                                     # the tables the kernels index with
    layer.placement = Placement.build(cfg.replace(num_experts=16))
    test_fail(lambda: layer(x), contains="placement: expected rank 0 of 1, linear, local experts [0, 1, 2, 3, 4, 5, 6, 7] of 8")
    layer.placement = good
    conf = layer.config; layer.config = conf.replace(top_k=3)
    test_fail(lambda: layer(x), contains="config: expected the layer's MoEConfig (fixed at construction), got another")
    layer.config = conf
    sd = layer.state_dict(); sd["gate"] = sd["gate"].t().contiguous().t()      # same values, column-major
    test_fail(lambda: layer.load_state_dict(sd, assign=True), contains="state_dict['gate']: expected a contiguous tensor")
    layer.gate = layer.gate.t().contiguous().t()                               # (a buffer swapped by hand)
    test_fail(lambda: layer(x), contains=f"gate: expected shape [8, 128], torch.float32 on {layer.gate.device} (the layer's")
    layer.gate = layer.gate.contiguous()
    test_eq(layer(x).shape, (6, 128))
sc = cfg.replace(num_shared_experts=1, shared_intermediate_size=48)               # the shared experts are followed too
sl = FusedMoE(sc, seed=3, experts="triton", device=DEVICE)
test_eq(sl(x).shape, (6, 128))
good = sl.shared_experts.w2
sl.shared_experts.w2 = torch.nn.Parameter(good.detach()[:, :8].contiguous(), requires_grad=False)   # a narrower one
test_fail(lambda: sl(x), contains="shared_experts.w2: expected shape [128, 48]")
sl.shared_experts.w2 = torch.nn.Parameter(good.detach().clone(), requires_grad=False)               # a valid swap: used
test_eq(torch.equal(sl(x).cpu(), FusedMoE(sc, seed=3, experts="triton", device=DEVICE)(x).cpu()), True)
sd = sl.state_dict()
for key, bad in (("shared_experts.w13", float("nan")), ("shared_experts.w2", float("inf"))):
    broken = dict(sd); broken[key] = sd[key].clone(); broken[key][0, 0] = bad
    test_fail(lambda: sl.load_state_dict(broken), contains=f"state_dict['{key}']: expected finite values")
broken = dict(sd); broken["shared_experts.w13"] = sd["shared_experts.w13"].float()
test_fail(lambda: sl.load_state_dict(broken, assign=True), contains="state_dict['shared_experts.w13']: expected dtype torch.bfloat16 with assign=True")
db = FusedMoE(cfg, seed=1, experts="triton", device=DEVICE, debug=True)         # debug: the router's counter checked
db._router_counter.fill_(3)
test_fail(lambda: db(x[:1]), contains="_router_counter: expected 0 before a forward")
with torch.inference_mode():                         # built under inference mode, the layer's tensors still count
    inf = FusedMoE(cfg, seed=1, experts="torch", device=DEVICE)                  # their edits: followed as outside it
    test_eq(inf(x).shape, (6, 128))
    before = inf.route(x)[1]
    inf.gate.mul_(-1)
    assert not torch.equal(inf.route(x)[1].sort(-1).values, before.sort(-1).values)
    qi = FusedMoE(cfg, seed=1, quant="fp8_w8a8_block", experts="torch", device=DEVICE).to(DEVICE)   # (a move too)
    codes = qi.qweights.w13.clone(); qi.w13[:, :8].neg_(); y = qi(x)
    assert not torch.equal(qi.qweights.w13.view(torch.uint8), codes.view(torch.uint8))      # the codes followed
    ref = moe_reference_standard(x.double().cpu(), qi.w13.double().cpu(), qi.w2.double().cpu(), *[t.cpu() for t in qi.route(x)])
    assert check_output(y.cpu(), ref, cfg.dtype, qi.quant, qi.experts)["ok"]
    qi.qweights.w2_scale.mul_(2); qi(x)                                        # codes' scales edited: the floats follow
    assert torch.equal(qi.w2.detach(), qi.qweights.dequantize()[1].to(qi.w2.dtype))
inf(x)
mq = FusedMoE(cfg, seed=1, quant="mxfp4_w4a16", device=DEVICE); sd = mq.state_dict()
mq.quant = "fp8_w8a8_block"                                                    # the scheme is fixed at construction:
for f in (lambda: mq(x), lambda: mq.load_state_dict(sd)):                      # an assignment is named, not run
    test_fail(f, contains="quant: expected 'mxfp4_w4a16' (fixed at construction), got 'fp8_w8a8_block'; build a new layer")
mq.quant = "mxfp4_w4a16"; mq.load_state_dict(sd); test_eq(mq(x).shape, (6, 128))
for name, other in (("config", cfg.replace(top_k=1)), ("experts", "torch" if mq.experts != "torch" else "triton"),
                    ("placement", Placement.build(cfg.replace(num_experts=16))), ("config", {})):
    good = getattr(mq, name); setattr(mq, name, other)                         # settings: fixed, a load refuses them
    for f in (lambda: mq(x), lambda: mq.load_state_dict(sd), lambda: mq.to(DEVICE)):
        test_fail(f, contains=f"{name}: expected ")
        test_fail(f, contains="(fixed at construction)")
    setattr(mq, name, good)
mq.config = dataclasses.replace(cfg); test_eq(mq(x).shape, (6, 128))          # an equal copy is the same config
with torch.inference_mode(): isd = {k: v.clone() for k, v in sd.items()}
test_fail(lambda: mq.load_state_dict(isd, assign=True), contains="state_dict['gate']: expected a normal tensor with assign=True")
mq.load_state_dict(isd); test_eq(mq(x).shape, (6, 128))                        # copied: fine


# %%
#| test layer_refuses_another_ranks_placement
# The weights a layer holds are its rank's experts: a placement swapped in must put the same experts on this rank,
# found the same way — another rank's with the same counts would run expert 2's tokens through expert 0's weights.
par = ParallelConfig.make(tp_size=1, dp_size=2, enable_expert_parallel=True, all2all_backend="allgather_reducescatter")
c = MoEConfig(4, 2, 64, 32, parallel=par)
layer = FusedMoE(c, experts="torch")
x = torch.randn(3, 64, dtype=c.dtype)
want = layer(x)
layer.placement = Placement.build(c, ep_rank=1)
test_fail(lambda: layer(x), contains="placement: expected rank 0 of 2, linear, local experts [0, 1] of 4, expert_map (fixed at construction), got rank 1 of 2")
layer.placement = "linear"
test_fail(lambda: layer(x), contains="got not a Placement")
layer.placement = Placement.build(c)                       # an equal one, built again: taken
assert torch.equal(layer(x), want)
with torch.no_grad(): layer.placement.slot_table[0] = 9    # a table edited in place: checked again, named
test_fail(lambda: layer(x), contains="slot_table: expected [0, 1, -1, -1, -1] for rank 0 of 2 with strategy 'linear'")
layer.placement = Placement.build(c)
assert torch.equal(layer(x), want)
half = FusedMoE(c.replace(dtype=torch.float16), quant="fp8_w8a8_block", experts="torch")   # fp16: max 65504
half.qweights = dataclasses.replace(half.qweights, w13_scale=half.qweights.w13_scale * 1e6)   # a fine container...
test_fail(lambda: half(x.half()), contains="qweights (its w13 dequantized to torch.float16): expected finite values")

# %% [markdown]
# **Edits no counter sees, and copies.** A write through `.data` bumps no version counter, so the layer cannot see it:
# the router would keep its 16-bit copy of the old gate and a quantized layer its old codes. `debug=True` compares
# those copies with the parameters on every call and names the stale one; `refresh()` re-derives them (the
# parameters lead, as in `load_state_dict`). (A quantized layer on the torch experts reads its float parameters, so
# there such a write does change the output, but unquantized, until `refresh()` re-quantizes; the 16-bit weights of
# an unquantized layer are read as they are and need no refresh. Switching `debug` on rebuilds the gate's copy like
# any setting the layer tracks, so a stale gate copy is named only by a layer that had `debug=True` before the write.)
# A copy (`copy.deepcopy`, `torch.save` and `torch.load`) takes the pending in-place edits and is built again from its
# own tensors, so a quantized copy runs as its original does.

# %%
#| test layer_refresh_and_copies
cfg = preset("qwen3-30b-a3b").replace(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64)
x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)
for quant, experts, name in (("unquantized", "torch", "gate"), ("fp8_w8a8_block", "torch", "w13"),
                             ("mxfp4_w4a16", "triton", "w2"), ("fp8_w8a8_block", "triton", "gate")):
    seen = FusedMoE(cfg, seed=1, quant=quant, experts=experts, device=DEVICE)
    with torch.no_grad(): getattr(seen, name).mul_(-1)                    # seen: the next forward follows it
    want = seen(x)
    unseen = FusedMoE(cfg, seed=1, quant=quant, experts=experts, device=DEVICE, debug=True)
    getattr(unseen, name).data.mul_(-1)                                    # unseen: debug names the stale copy
    msg = "gate: expected the values the router's" if name == "gate" else f"{name}: expected the dequantized values"
    test_fail(lambda: unseen(x), contains=msg)
    assert torch.equal(unseen.refresh()(x), want), (quant, experts, name)  # re-derived: as if the edit were seen
    for dup in (copy.deepcopy(seen), torch.load(io.BytesIO((buf := io.BytesIO(), torch.save(seen, buf))[0].getvalue()),
                                                weights_only=False)):
        assert torch.equal(dup(x), want), (quant, experts, name)          # a copy runs as its original
        with torch.no_grad(): dup.w13.mul_(2)                              # and follows its own edits, not the original's
        assert not torch.equal(dup(x), want) and torch.equal(seen(x), want)
bad = FusedMoE(cfg, seed=1, device=DEVICE)
bad.gate.data[0, 0] = float("nan")                                         # refresh checks what it derives from
test_fail(bad.refresh, contains="gate: expected finite values")
for name, swap in (("w13", lambda t: t[:2].clone()), ("gate", lambda t: t.bfloat16())):   # `.data =` another shape or
    bad = FusedMoE(cfg, seed=1, experts="triton", device=DEVICE)                        # dtype: refused as at a call
    getattr(bad, name).data = swap(getattr(bad, name).data)
    test_fail(bad.refresh, contains=f"{name}: expected shape")
ds = preset("deepseek-v3").replace(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64,
                                   shared_intermediate_size=64, num_expert_group=2, topk_group=1)
bad = FusedMoE(ds, seed=1, device=DEVICE)
bad.shared_experts.w13.data[0, 0] = float("nan")                           # the shared experts' values too
test_fail(bad.refresh, contains="shared_experts.w13: expected finite values")
for quant in ("unquantized", "nvfp4_w4a16"):       # an edit a counter saw, then a copy or a move before the next call:
    for move in (copy.deepcopy, lambda l: l.to(DEVICE)):                   # taken first, as that call would
        pend = FusedMoE(cfg, seed=1, quant=quant, experts="triton", device=DEVICE)
        pend(x)
        with torch.no_grad(): pend.w13.mul_(-1.5)
        want = FusedMoE(cfg, seed=1, quant=quant, experts="triton", device=DEVICE)
        with torch.no_grad(): want.w13.mul_(-1.5)
        assert torch.equal(move(pend)(x), want(x)) and torch.equal(pend(x), want(x)), quant

# %% [markdown]
# ## Emulated expert parallelism
#
# `run_emulated_ep` runs each rank of a deployment in turn in one process, exactly as the rank would run: its own
# parallel config (from `ParallelConfig.make` with its ranks), placement, weights, dispatch, experts and combine. The
# ranks' outputs are summed — the all-reduce (no all2all) or the combine at the tokens' owners (all2all). Alongside,
# from the weight source itself, it accumulates
#
# - the **single-device** result: the Standard path over all experts with fp32 accumulation, a few experts at a time
#   (as many as torch's CPU threads, `accumulate_into`), so that only those experts' weights are alive at once;
# - the **float64 reference**: the same computation in float64.
#
# Both take each pair's weights by its global id (EPLB: physical `p` is logical `p % num_experts`), from
# `weights.experts([e])` — quantized and dequantized expert by expert for a quantized run, as every scheme's scales
# are per expert or finer — and never from a rank's layer or placement. A rank that loaded the wrong experts, or a
# placement that sends an id to the wrong slot, is a mismatch, not a reference that agrees with its own mistake.
#
# Shared experts are added once — by rank 0 in the emulation, where every rank sees every token — and once to each
# of the two references.
#
# Routing is computed once (every rank has the same router) and shared by the three computations.

# %%
#| export
@dataclass
class EPRun:
    """Result of `run_emulated_ep`: outputs, checks and timings. Raises nothing: a record that `run_emulated_ep` fills,
    not checked at construction. Source: moe-lit's own."""
    config: MoEConfig                 # the deployment as seen by rank 0
    placements: list                  # one Placement per rank
    topk_weights: torch.Tensor        # [T, top_k] fp32
    topk_ids: torch.Tensor            # [T, top_k] global ids
    output: torch.Tensor              # [T, H] config.dtype: the sum over ranks
    single_device: torch.Tensor       # [T, H] config.dtype
    reference: torch.Tensor           # [T, H] float64
    experts: tuple = ("torch", "")    # (implementation, reason) of rank 0's experts
    rank_seconds: list = field(default_factory=list)   # forward time of each rank (s)
    weight_seconds: float = 0.0       # time spent generating weights (s)
    quant: str = "unquantized"        # the experts' weights (references use the dequantized weights)
    reference_unquantized: torch.Tensor | None = None   # [T, H] float64 on the weights before quantization (runs that
                                                        # quantized at load; None for a checkpoint's stored codes)
    reference_kernels: torch.Tensor | None = None  # [T, H] float64: the Triton quantized experts' spec (their runs)
    dispatch_quant: tuple = (None, "")  # (block or None, reason): rank 0's rows quantized before dispatch (10_modular)

# %%
#| export
def rank_config(config: MoEConfig, ep_rank: int,
                tp_size: int | None = None,   # TP size folded into EP; None: the config's, ep_size / (dp_size · pcp_size)
               ) -> MoEConfig:
    """The config of EP rank `ep_rank` of `config`'s deployment (DP·PCP·TP devices, EP on), built with
    `ParallelConfig.make` from the config's own split; ValueError naming `ep_rank`, or `tp_size` when it is not the
    config's (a TP+EP deployment with one DP rank moves no tokens; as DP ranks it would take the all2all), and
    `config` when it is not a MoEConfig. Source: vLLM's `FusedMoEParallelConfig.make` (fused_moe/config.py: TP
    flattened across DP and PCP, then the flat group as EP)."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    p = config.parallel
    check_int("ep_rank", ep_rank, lo=0, hi=p.ep_size)
    own = p.ep_size // (p.dp_size * p.pcp_size) if p.use_ep else 1
    if tp_size is not None and check_int("tp_size", tp_size, lo=1) != own:
        raise ValueError(f"tp_size: expected the config's TP size folded into EP, {own} " + (
            f"(ep_size {p.ep_size} / (dp_size {p.dp_size} × pcp_size {p.pcp_size}))" if p.use_ep else
            "(expert parallelism is off: each rank is built as one device)") + f", or None, got {tp_size}")
    tp, pcp = own, p.pcp_size if p.use_ep else 1
    par = ParallelConfig.make(tp_size=tp, dp_size=p.ep_size // (tp * pcp), pcp_size=pcp, tp_rank=ep_rank % tp,
                              pcp_rank=(ep_rank // tp) % pcp, dp_rank=ep_rank // (tp * pcp),
                              enable_expert_parallel=p.ep_size > 1, all2all_backend=p.all2all_backend,
                              enable_eplb=p.enable_eplb)
    return config.replace(parallel=par)

# %%
#| export
def run_emulated_ep(config: MoEConfig, hidden: torch.Tensor, seed: int = 0, placement: str = "linear",
                    tp_size: int | None = None, on_rank=None, experts: str = "auto", quant: str = "unquantized",
                    backend: str | None = None,
                    weights: WeightSource | Mapping | None = None,  # every rank's source; None: random from `seed`
                   ) -> EPRun:
    """Run every EP rank of `config`'s deployment in turn, in this process, on `hidden [T, H]` (config.dtype, on the
    device the ranks run on), sum their outputs and compute the references: an `EPRun` with the output `[T, H]`
    config.dtype, the single-device output and the float64 reference by global expert id (`reference_by_global_id`),
    the placements, and each rank's forward time (s). `placement` 'linear' or 'round_robin'; `tp_size` the TP folded into
    EP (`rank_config`); `on_rank(r, layer)` is called after rank r's forward; `experts`, `quant`, `backend` as FusedMoE;
    `weights` every rank's source (None: random from `seed`). ValueError naming `config`, `hidden`, `on_rank`,
    `placement`, `tp_size`, `quant`, `backend`, `experts` or `weights`. Source: vLLM's expert-parallel layout
    (`FusedMoEParallelConfig`, `determine_expert_map`), its ranks emulated one after another."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    check_dense("hidden", check_tensor("hidden", hidden, shape=(None, config.hidden_size), dtype=config.dtype))
    if on_rank is not None and not callable(on_rank): raise ValueError(f"on_rank: expected a callable, got {on_rank!r}")
    quant = quant_scheme_name(quant)                                           # the run records the full name
    weights, ep = _weight_source(config, weights, seed), config.parallel.ep_size
    T, H = hidden.shape
    acc = acc_dtype(config.dtype)                                              # as the experts accumulate
    out, single, ref = (torch.zeros(T, H, dtype=d, device=hidden.device) for d in (acc, acc, torch.float64))
    stored = getattr(weights, "quant_scheme", None) == quant and quant != "unquantized"   # a checkpoint's own codes:
    ref_float = None if quant == "unquantized" or stored else \
        torch.zeros(T, H, dtype=torch.float64, device=hidden.device)                    # no weights before quantization
    placements, rank_s, weight_s, topk, shared_ref = [], [], 0.0, None, None
    for r in progress(range(ep), "EP ranks"):
        t0 = time.perf_counter()
        layer = FusedMoE(rank_config(config, r, tp_size), weights, placement, experts=experts,
                         device=hidden.device, quant=quant, backend=backend)     # holds rank r's weights only
        t1 = time.perf_counter(); weight_s += t1 - t0
        topk = layer.route(hidden) if topk is None else topk
        out += layer(hidden, topk, add_shared=r == 0).to(acc)           # shared experts once, not once per rank
        if hidden.is_cuda: torch.cuda.synchronize()
        rank_s.append(time.perf_counter() - t1)
        if r == 0 and layer.shared_experts is not None:
            sh = layer.shared_experts
            single += sh(hidden).to(acc); ref += (shared_ref := sh(hidden.double()))   # fp64 input: in fp64
            if ref_float is not None: ref_float += shared_ref
        placements.append(layer.placement)
        impl, dq = (layer.experts, layer.experts_reason), (layer.dispatch_quant, layer.dispatch_quant_reason)
        if on_rank is not None: on_rank(r, layer)
        del layer
    ref_kernels = None
    if kernels_spec_holds(quant, impl[0]):               # the kernels' own spec, shared experts as in `ref`
        ref_kernels = torch.zeros_like(ref)
        if shared_ref is not None: ref_kernels += shared_ref
    reference_by_global_id(config, weights, hidden, *topk, single, ref, quant, ref_float, ref_kernels)
    return EPRun(rank_config(config, 0, tp_size), placements, topk[0], topk[1], out.to(config.dtype),
                 single.to(config.dtype), ref, impl, rank_s, weight_s, quant, ref_float, dispatch_quant=dq,
                 reference_kernels=ref_kernels)

def kernels_spec_holds(quant: str,            # the experts' scheme
                       implementation: str,   # the experts' implementation ('torch', 'triton', 'triton_quant')
                      ) -> bool:
    """Whether `09d`'s spec of the quantized experts is a run's kernel semantics, so `reference_by_global_id` can give
    it: Triton quantized experts whose activation scales are each row's own (FP8 per group or per token) or that take
    16-bit activations (FP4). A per-tensor FP8 scale depends on which rows share a launch — each rank's, each expert
    slab's in the batched format — so no spec of the whole batch holds for it. ValueError naming `quant` (unknown
    scheme) or `implementation`. Source: moe-lit's own."""
    from moe_lit.quant_weights import ACTIVATION_GRANULARITY
    quant = quant_scheme_name(quant)
    check_choice("implementation", implementation, ("torch", "triton", "triton_quant"))
    return implementation == "triton_quant" and quant != "unquantized" and ACTIVATION_GRANULARITY.get(quant) != "tensor"

def _kernels_spec(config: MoEConfig, hidden, q, topk_weights, pairs, ew: dict) -> torch.Tensor:
    """`[T, H]` float64: `09d`'s spec of the Triton quantized experts on the pairs `pairs` (chunk-local ids, -1 none).
    With the router weight on the input in the batched format, the dispatch weights each pair's row and stores it in
    the model's dtype before the experts quantize it: the spec then runs on those rounded rows, one pair a row."""
    from moe_lit.kernels.quant_experts import quant_experts_reference_standard
    bad = ~hidden.isfinite().all(-1)                  # a NaN or inf row: the kernels' FP8 scales of its groups are NaN,
    if bad.any():                                     # so is its output (its own row only); the spec's quantizer refuses
        y = _kernels_spec(config, hidden.masked_fill(bad[:, None], 0), q, topk_weights, pairs, ew)   # such rows: it
        y[bad & (pairs >= 0).any(-1)] = float("nan")  # runs the others, and the row is NaN where it reaches an expert
        return y
    if not (ew["apply_router_weight_on_input"] and config.activation_format is ActivationFormat.BatchedExperts):
        return quant_experts_reference_standard(hidden, q, topk_weights, pairs, **ew)
    (T, k), acc = pairs.shape, acc_dtype(hidden.dtype)
    rows = (hidden.to(acc)[:, None] * topk_weights.to(acc)[..., None]).to(hidden.dtype).reshape(T * k, -1)
    ones = torch.ones(T * k, 1, dtype=torch.float32, device=hidden.device)
    y = quant_experts_reference_standard(rows, q, ones, pairs.reshape(-1, 1), **dict(ew, apply_router_weight_on_input=False))
    return y.view(T, k, -1).sum(1)

def reference_by_global_id(config: MoEConfig, weights: WeightSource,
                           hidden: torch.Tensor,            # [T, H] config.dtype
                           topk_weights: torch.Tensor,      # [T, top_k] fp32
                           topk_ids: torch.Tensor,          # [T, top_k] global (physical) ids; -1: no expert
                           single: torch.Tensor,            # [T, H] fp32 (16-bit dtypes) or fp64: added to in place
                           ref: torch.Tensor,               # [T, H] float64: added to in place
                           quant: str = "unquantized",      # the experts' scheme: the references use its dequantized weights
                           ref_float: torch.Tensor | None = None,   # [T, H] float64: the weights before quantization
                           ref_kernels: torch.Tensor | None = None, # [T, H] float64: the Triton quantized experts' spec
                           ) -> None:
    """Add every routed pair's expert MLP to `single` (computed in hidden's dtype), `ref` (float64), `ref_float` and
    `ref_kernels` (quantized only: `09d`'s spec of the Triton quantized experts, in float64 with the activations and
    the intermediate rounded as those kernels round them — FP8 groups for w8a8 schemes — so the kernels' output is
    held to the kernel tests' bound, `00_testing.experts_tolerance`, not to the looser one of activation rounding),
    taking each pair's weights from `weights` by its global id (EPLB: physical `p` is logical `p % num_experts`), a few
    experts at a time: independent of any rank's placement and loaded weights — the check that EP emulation
    (`run_emulated_ep`) and the multi-process run (`13b_distributed`) are held to. Shared experts are not added.
    ValueError naming the argument for a config that is not a MoEConfig, weights that are not a WeightSource, or a
    tensor of the wrong shape, dtype or device. Source: moe-lit's own (the per-expert loop of `formats`' Standard
    reference, by global id)."""
    from moe_lit.quant_weights import quantize_expert_weights
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    if not isinstance(weights, WeightSource): raise ValueError(f"weights: expected a WeightSource, got {type(weights).__name__}")
    quant = quant_scheme_name(quant)                         # 'fp8' -> 'fp8_w8a8_block', as the layer takes it
    T, H = check_tensor("hidden", hidden, shape=(None, config.hidden_size), dtype=config.dtype).shape
    check_tensor("topk_weights", topk_weights, shape=(T, config.top_k), dtype=torch.float32)
    check_tensor("topk_ids", topk_ids, shape=(T, config.top_k), dtype=(torch.int32, torch.int64))
    for n, t in (("single", single), ("ref", ref), ("ref_float", ref_float), ("ref_kernels", ref_kernels)):
        if t is not None or n in ("single", "ref"):
            check_tensor(n, t, shape=(T, H), dtype=acc_dtype(config.dtype) if n == "single" else torch.float64)
    if ref_kernels is not None and not kernels_spec_holds(quant, "triton_quant"):
        raise ValueError(f"ref_kernels: expected None for {quant} experts (no spec of the Triton quantized experts holds "
                         f"for the whole batch: see kernels_spec_holds), got a tensor")
    if ref_kernels is not None and config.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ref_kernels: expected a bf16 or fp16 config (the Triton quantized experts' activations), "
                         f"got dtype {config.dtype}")
    given = [(n, t) for n, t in (("single", single), ("ref", ref), ("ref_float", ref_float), ("ref_kernels", ref_kernels))
             if t is not None]
    for i, (n, t) in enumerate(given):                 # each is added to: none may share memory with another
        check_tensor(n, t, writable=True)
        for m, u in given[:i]:
            if t.numel() and u.numel() and t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr():
                raise ValueError(f"{n}: expected a tensor of its own, got one sharing memory with {m}")
    for n, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids), ("single", single), ("ref", ref),
                 ("ref_float", ref_float), ("ref_kernels", ref_kernels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{n}: expected a tensor on hidden's device {hidden.device}, got {t.device}")
    if topk_ids.numel() and not (-1 <= int(topk_ids.min()) and int(topk_ids.max()) < config.num_physical_experts):
        raise ValueError(f"topk_ids: expected ids in [-1, {config.num_physical_experts}) (-1: no expert), got values in "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")
    logical = torch.where(topk_ids >= 0, topk_ids.long() % config.num_experts, -1)
    kw = dict(apply_router_weight_on_input=config.apply_router_weight_on_input, activation=Activation.of(config))
    touched = sorted(set(logical.flatten().tolist()) - {-1})   # the experts the tokens reach (one sync, at set-up)
    step = max(1, torch.get_num_threads())                 # a few experts a load: random weights fill them in parallel
    for i in range(0, len(touched), step):
        chunk = touched[i:i + step]
        w = {k: None if t is None else t.to(config.dtype).to(hidden.device) for k, t in weights.experts(chunk).items()}
        pairs = torch.full_like(logical, -1)                # the chunk's pairs, by their index in the chunk
        for j, e in enumerate(chunk): pairs[logical == e] = j
        ew = dict(kw, w13_bias=w.get("w13_bias"), w2_bias=w.get("w2_bias"))
        if ref_float is not None:
            moe_reference_standard(hidden.double(), w["w13"], w["w2"], topk_weights, pairs, accumulate_into=ref_float, **ew)
        if quant != "unquantized":
            stored = weights.quantized_experts(chunk, quant)  # a checkpoint's codes, else quantized here as the layer does
            q = (stored if stored is not None else quantize_expert_weights(w["w13"], w["w2"], quant)).to(hidden.device)
            w["w13"], w["w2"] = q.dequantize(config.dtype)
            if ref_kernels is not None:                   # the kernels' spec: FP8 activations rounded per group
                ref_kernels += _kernels_spec(config, hidden, q, topk_weights, pairs, ew)
        moe_reference_standard(hidden, w["w13"], w["w2"], topk_weights, pairs, accumulate_into=single, **ew)
        moe_reference_standard(hidden.double(), w["w13"], w["w2"], topk_weights, pairs, accumulate_into=ref, **ew)
        w = None

# %% [markdown]
# Each rank's config keeps the deployment's split: TP 2 folded into EP with one DP rank moves no tokens (the Standard
# format, no all2all kernels, no cap on the batch), so its ranks are not rebuilt as two DP ranks of the all2all.

# %%
#| test rank_config_keeps_the_split
tp2 = ParallelConfig.make(tp_size=2, dp_size=1, enable_expert_parallel=True, all2all_backend="nixl_ep")
c = MoEConfig(4, 2, 9000, 4, dtype=torch.float32, parallel=tp2)        # hidden past NIXL EP's sizes: never sent
for r in (0, 1):
    rc = rank_config(c, r)
    test_eq((rc.parallel.dp_size, rc.parallel.ep_rank, rc.use_all2all_kernels), (1, r, False))
test_eq(rank_config(c, 1, tp_size=2), rank_config(c, 1))
test_fail(lambda: rank_config(c, 0, tp_size=1), contains="tp_size: expected the config's TP size folded into EP, 2 (ep_size 2 / (dp_size 1 × pcp_size 1)), or None, got 1")
test_fail(lambda: rank_config(c.replace(parallel=ParallelConfig.make(2, 1)), 0, tp_size=2), contains="1 (expert parallelism is off")
x9 = torch.randn(3, 9000)
run = run_emulated_ep(c, x9, seed=1)
test_eq((run.config.parallel.dp_size, run.config.use_all2all_kernels), (1, False))
assert_close(run.output, run.reference); assert_close(run.single_device, run.reference)
dp2 = ParallelConfig.make(tp_size=1, dp_size=2, pcp_size=2, enable_expert_parallel=True, all2all_backend="allgather_reducescatter")
test_eq([(p.dp_rank, p.pcp_rank, p.ep_rank) for p in (rank_config(MoEConfig(8, 2, 16, 8, parallel=dp2), r).parallel
                                                     for r in range(4))], [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)])

# %% [markdown]
# The emulated ranks sum to the single-device result for every backend of the descriptor table and both placements,
# and both match the float64 reference. The format each rank ran in is the one the table declares.

# %%
#| test emulated_ep_every_backend
torch.manual_seed(0)
base = MoEConfig(num_experts=8, top_k=3, hidden_size=32, intermediate_size=16, dtype=torch.float32,
                 routing_method="grouped_topk", num_expert_group=4, topk_group=2)
x = torch.randn(11, 32)
for name, d in BACKENDS.items():
    for strategy in ("linear", "round_robin"):
        cfg = base.replace(parallel=ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend=name))
        seen = []
        run = run_emulated_ep(cfg, x, seed=2, placement=strategy, on_rank=lambda r, l: seen.append(l.config.activation_format))
        test_eq(set(seen), {d.activation_format if d.moves_tokens else ActivationFormat.Standard})
        want_rr = strategy == "round_robin" and (not d.moves_tokens or d.needs_round_robin_routing_tables)
        test_eq({p.strategy for p in run.placements}, {"round_robin" if want_rr else "linear"})
        assert_close(run.output, run.reference, name=f"{name}/{strategy}")
        assert_close(run.single_device, run.reference)
        test_eq(run.topk_ids.dtype, cfg.topk_indices_dtype)
src, z = RandomExpertWeights(base, 2), torch.zeros(11, 32, dtype=torch.float64)
w, i = torch.rand(11, 3), torch.randint(0, 8, (11, 3))
for kw, msg in ((dict(weights={}), "weights: expected a WeightSource, got dict"),
                (dict(topk_ids=i[:, :2]), "topk_ids: expected shape [11, 3]"),
                (dict(ref=z.float()), "ref: expected dtype torch.float64"),
                (dict(single=z.float()[:5]), "single: expected shape [11, 32]"),
                (dict(single=z.clone()), "single: expected dtype torch.float32"),
                (dict(topk_ids=torch.full((11, 3), 8)), "topk_ids: expected ids in [-1, 8)"),
                (dict(ref_kernels=z.clone()), "ref_kernels: expected None for unquantized experts"),
                (dict(quant="mxfp4", ref_kernels=z.clone()), "ref_kernels: expected a bf16 or fp16 config"),
                (dict(ref=(zr := z.clone()), ref_float=zr), "ref_float: expected a tensor of its own, got one sharing")):
    args = dict(config=base, weights=src, hidden=x, topk_weights=w, topk_ids=i, single=z.float(), ref=z.clone()) | kw
    test_fail(lambda: reference_by_global_id(**args), contains=msg)
refs = {}
for quant in ("unquantized", "mxfp4"):                       # the scheme's weights, with or without ref_float
    refs[quant] = z.clone()
    reference_by_global_id(base, src, x, w, i, z.float(), refs[quant], quant)
assert not torch.equal(refs["unquantized"], refs["mxfp4"])
test_eq([kernels_spec_holds(q, impl) for q, impl in (("fp8", "triton_quant"), ("fp8_w8a8_channel", "triton_quant"),
         ("mxfp4", "triton_quant"), ("fp8_w8a8_tensor", "triton_quant"), ("fp8", "torch"), ("unquantized", "triton_quant"))],
        [True, True, True, False, False, False])

# %% [markdown]
# Rank count does not change the answer: 1, 2 and 4 ranks of the same model give the same output (to the dtype's
# tolerance), and the placement of every expert on exactly one rank is checked through the ranks' `local_to_global`.

# %%
#| test emulated_ep_rank_counts
torch.manual_seed(1)
base = MoEConfig(num_experts=9, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.bfloat16)
x = torch.randn(13, 32).bfloat16()
outs = []
for ep in (1, 2, 4):
    cfg = base.replace(parallel=ParallelConfig.make(1, ep, enable_expert_parallel=True, all2all_backend="nixl_ep"))
    run = run_emulated_ep(cfg, x, seed=5)
    owned = torch.cat([p.local_to_global for p in run.placements]).sort().values
    test_eq(owned.tolist(), list(range(9)))                                   # each expert on exactly one rank
    assert_close(run.output, run.reference); outs.append(run.output)
assert_close(outs[1], outs[0].double()); assert_close(outs[2], outs[0].double())
test_fail(lambda: run_emulated_ep(cfg, x.float()), contains="hidden: expected dtype torch.bfloat16")
test_fail(lambda: run_emulated_ep("x", x), contains="config: expected a MoEConfig, got str")
test_fail(lambda: FusedMoE(cfg, weights=RandomExpertWeights(cfg.replace(hidden_size=16))), contains="weights: expected weights for")
test_fail(lambda: FusedMoE(cfg, weights="x"), contains="weights: expected a WeightSource")
test_fail(lambda: FusedMoE("x"), contains="config: expected a MoEConfig, got str")
small = cfg.replace(max_num_tokens=2)                    # slabs for 2 tokens a rank: 13 rows over 4 ranks do not fit
for f in (lambda: FusedMoE(small)(x), lambda: run_emulated_ep(small, x)):
    test_fail(f, contains="hidden: expected at most max_num_tokens · ep_size = 2 · 4 = 8 rows (max_num_tokens a rank), got 13")
zero = run_emulated_ep(cfg, x[:0])                                             # zero tokens: an empty output
test_eq(zero.output.shape, (0, 32))
xn = x.clone().to(DEVICE); xn[2] = float("nan")   # a NaN row: NaN in its own row only, in the run and in the references
                                                 # (on the kernels' device: a GPU when there is one)
for quant in ("unquantized", "fp8"):            # (FP8: the kernels' spec quantizes the other rows, not refusing them)
    run = run_emulated_ep(cfg, xn, seed=5, experts="triton", quant=quant)
    for t in (run.output, run.reference) + ((run.reference_kernels,) if quant == "fp8" else ()):
        test_eq((~t.isfinite()).any(-1).nonzero().flatten().tolist(), [2])

# %% [markdown]
# EPLB replicas do not change the model: the same weights with 4 redundant experts on 4 ranks give the single-device
# output, in both formats, and some pairs do go to a replica (physical id ≥ `num_experts`).

# %%
#| test emulated_ep_eplb
torch.manual_seed(9)
base = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.float32)
x = torch.randn(24, 32)
plain = run_emulated_ep(base, x, seed=3)
for backend in ("nixl_ep", "allgather_reducescatter"):
    par = ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend=backend, enable_eplb=True)
    run = run_emulated_ep(base.replace(num_redundant_experts=4, parallel=par), x, seed=3)
    assert_close(run.output, run.reference, name=backend)
    assert_close(run.output, plain.output.double(), name=backend)              # replicas are copies
    assert (run.topk_ids >= 8).any() and run.topk_ids.max() < 12
    test_eq(sorted(torch.cat([p.local_to_global for p in run.placements]).tolist()), list(range(12)))
rank0 = FusedMoE(rank_config(base.replace(num_redundant_experts=4, parallel=par), 0), seed=3)
w2x = torch.full((1, 2), 0.5)
rank0(x[:1], (w2x, torch.tensor([[1, 8]])))                                      # distinct logical experts: fine
test_fail(lambda: rank0(x[:1], (w2x, torch.tensor([[0, 8]]))),                    # 8 is a replica of 0: 0 twice
          contains="topk_ids: expected physical ids of distinct logical experts per token")

# %% [markdown]
# The Triton paths through the layer: deployments with `experts="triton"` (the interpreter on a CPU) give the
# reference's answer — the batched path with both id translations (round robin through `global_to_physical`, linear
# through `expert_map`) and the contiguous path for Standard-format backends.

# %%
#| test emulated_ep_triton_experts
torch.manual_seed(3)
base = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.bfloat16,
                 routing_method="grouped_topk", num_expert_group=2, topk_group=1)
x = torch.randn(7, 32).bfloat16().to(DEVICE)             # the kernels' device: a GPU when there is one
for strategy, backend in (("round_robin", "deepep_low_latency"), ("linear", "deepep_low_latency"),
                          ("linear", "allgather_reducescatter"), ("round_robin", "none")):
    cfg = base.replace(parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend))
    run = run_emulated_ep(cfg, x, seed=4, placement=strategy, experts="triton")
    test_eq(run.experts[0], "triton")
    assert_close(run.output, run.reference, name=strategy)
shared = base.replace(num_shared_experts=1, shared_intermediate_size=24,                  # the shared output added
                      parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
run = run_emulated_ep(shared, x, seed=4, placement="round_robin", experts="triton")       # inside the combine
assert_close(run.output, run.reference, name="shared experts in the combine")

# %% [markdown]
# Every kernel those paths launch, compiled for Hopper as a GPU would compile it (`00_testing.assert_compiles_for_gpu`,
# no GPU needed: the interpreter is green on constructs `ptxas` refuses): both formats, unquantized and every
# quantization scheme on Triton (FP8 block from bf16: a quantizer launch, then the GEMM),
# gpt-oss's experts (clamped SwiGLU, biases, router bias) and a DeepSeek-style layer (grouped routing, correction
# bias, a shared expert added in the combine).

# %%
#| test layer_kernels_compile_for_sm90
torch.manual_seed(5)
x = torch.randn(3, 128).bfloat16().to(DEVICE)
with record_launches() as seen:
    for backend in ("none", "nixl_ep"):
        par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
        for quant in ("unquantized", *QUANT_SCHEMES[1:]):
            cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=128, parallel=par)
            FusedMoE(cfg, seed=1, quant=quant, experts="triton", device=DEVICE)(x)
    for quant in ("unquantized", "fp8_w8a8_block", "mxfp4_w4a16"):                 # decode: the GEMMs read pair blocks
        many = MoEConfig(num_experts=16, top_k=2, hidden_size=128, intermediate_size=128)   # from the ids (PAIR_IDS)
        FusedMoE(many, seed=1, quant=quant, experts="triton", device=DEVICE)(x[:1])
    ag = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="allgather_reducescatter")
    FusedMoE(MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=128, parallel=ag), seed=1,
             experts="triton", device=DEVICE)(x)                                  # Standard EP: the local slots
    oss = MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=64, activation="swigluoai",
                    has_expert_bias=True, has_router_bias=True)
    FusedMoE(oss, seed=2, experts="triton", device=DEVICE)(x)
    ds = MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=64, scoring_func="sigmoid",
                   routing_method="grouped_topk", num_expert_group=2, topk_group=1, has_correction_bias=True,
                   num_shared_experts=1, shared_intermediate_size=64,
                   parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
    FusedMoE(ds, seed=3, experts="triton", device=DEVICE, placement="round_robin")(x)
    for quant in ("unquantized", "fp8_w8a8_block"):                               # Standard with shared experts:
        FusedMoE(ds.replace(parallel=ag), seed=3, experts="triton", device=DEVICE, quant=quant)(x)   # the shared add
res = assert_compiles_for_gpu(seen)
assert check_launch_keys(seen) > 10 * len(seen)          # each launch's key against Triton's own, perturbed copies too
kernels = {r["kernel"] for r in res}
assert {"_router_logits_kernel", "_route_topk_kernel", "_batched_dispatch_kernel", "_batched_combine_kernel",
        "_local_slot_kernel", "_batched_moe_gemm_quant_kernel", "_fused_moe_quant_kernel"} <= kernels, kernels
assert "_quantize_fp8_rows_kernel" in kernels or any(r["spec"]["constexprs"].get("QUANT_A") for r in res)   # FP8
                                                         # block's activations: a quantizer launch (default) or the K loop
assert {r["kernel"] for r in res if r["spec"]["constexprs"].get("PAIR_IDS")} == {"_fused_moe_kernel", "_fused_moe_quant_kernel"}
assert any(r["kernel"] == "_batched_combine_kernel" and r["spec"]["constexprs"].get("RESET") for r in res)   # kept counts
assert any(r["kernel"] == "_batched_combine_kernel" and r["spec"]["constexprs"].get("ADD")
           and r["spec"]["constexprs"].get("PAIRS") for r in res)                 # the Standard shared add
no_pdl = {r["kernel"] for r in res if r["spec"]["constexprs"].get("PDL") is not True or not r["pdl_wait"]}
assert not no_pdl, f"kernels the layer launches without programmatic dependent launch's wait: {no_pdl}"

# %% [markdown]
# A layer given a mapping of all global experts slices out its own; each rank of an expert-parallel deployment holds
# only its experts, and the ranks add up to the whole layer. The test builds gpt-oss-style experts (clamped SwiGLU,
# biases, a router bias) and a gated shared expert, and compares with the definition written out in float64.

# %%
#| test fused_moe_from_mapping
torch.manual_seed(6)
E, H, I, T = 6, 16, 8, 9
cfg = MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=I, dtype=torch.float64, activation="swigluoai",
                swiglu_limit=0.8, has_expert_bias=True, has_router_bias=True, num_shared_experts=1,
                shared_intermediate_size=12, shared_expert_gate=True)
full = {n: torch.randn(*shape, dtype=torch.float64) for n, shape in weight_shapes(cfg).items()}
x = torch.randn(T, H, dtype=torch.float64)
logits = x @ full["gate"].T + full["gate_bias"]
wts, ids = logits.softmax(-1).topk(2, dim=-1); wts = wts / wts.sum(-1, keepdim=True)
act = Activation("swigluoai", limit=0.8)
want = torch.zeros(T, H, dtype=torch.float64)
for t in range(T):
    for j in range(2):
        e = ids[t, j]
        want[t] += wts[t, j] * (full["w2"][e] @ act((full["w13"][e] @ x[t] + full["w13_bias"][e])[None])[0] + full["w2_bias"][e])
g, u = (x @ full["shared_experts.w13"].T).chunk(2, dim=-1)
want += torch.sigmoid(x @ full["shared_experts.gate"].T) * ((torch.nn.functional.silu(g) * u) @ full["shared_experts.w2"].T)
layer = FusedMoE(cfg, weights=full)
assert torch.equal(layer.route(x)[1].sort(-1).values.long(), ids.sort(-1).values)
assert_close(layer(x), want, rtol=1e-6)                                        # router weights are fp32 by contract
for backend in ("allgather_reducescatter", "nixl_ep"):                          # both formats, 3 ranks
    par = ParallelConfig.make(1, 3, enable_expert_parallel=True, all2all_backend=backend)
    run = run_emulated_ep(cfg.replace(parallel=par), x, weights=full)
    assert_close(run.output, want, rtol=1e-6); assert_close(run.reference, want, rtol=1e-6)
    test_eq([tuple(p.local_to_global.tolist()) for p in run.placements], [(0, 1), (2, 3), (4, 5)])
test_fail(lambda: FusedMoE(cfg, weights={**full, "w2_bias": torch.zeros(E, H + 1, dtype=torch.float64)}),
          contains="weights['w2_bias']: expected shape [6, 16], got [6, 17]")
test_fail(lambda: FusedMoE(cfg.replace(has_expert_bias=False), weights=RandomExpertWeights(cfg)),
          contains="weights: expected weights for")
test_fail(lambda: FusedMoE(cfg.replace(swiglu_limit=7.0), weights=TensorWeights(cfg, full)),
          contains="weights: expected weights for")                                # another clamp is another model
test_fail(lambda: FusedMoE(cfg, weights={**full, "gate": full["gate"] * float("nan")}),
          contains="weights['gate']: expected finite values")
test_fail(lambda: FusedMoE(cfg.replace(dtype=torch.float16), weights={**full, "w2": full["w2"] * 1e6}),
          contains="weights['w2'] in torch.float16: expected finite values")          # finite, but not once cast
own = FusedMoE(cfg.replace(dtype=torch.float32), weights={**full, "gate": full["gate"].float()})
assert own.gate.data_ptr() != full["gate"].data_ptr()                          # a copy: the caller's edits do not reach it
test_fail(lambda: FusedMoE(cfg, weights={**full, "gate": full["gate"].double().index_fill(1, torch.tensor([0]), 1e300)}),
          contains="weights['gate'] in torch.float32: expected finite values")        # the router keeps fp32
bad = full["w13"].clone(); bad[3, 5, 1] = float("nan")                                 # global expert 3: rank 1 of 3
test_fail(lambda: FusedMoE(rank_config(cfg.replace(parallel=par), 1), weights={**full, "w13": bad}),
          contains="weights['w13']: expected finite values, got nan at [1, 5, 1] (index 0 is the expert: global expert 3)")
test_fail(lambda: FusedMoE(cfg, weights={**full, "w2": full["w2"].to("meta")}), contains="weights['w2']: expected a dense tensor")
small = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
L = FusedMoE(small, seed=1); sd = L.state_dict()
test_fail(lambda: L.load_state_dict({**sd, "w2": sd["w2"].double()}, assign=True), contains="expected dtype torch.float32 with assign=True")
test_fail(lambda: L.load_state_dict({**sd, "w2": sd["w2"].to_sparse()}), contains="state_dict['w2']: expected a dense tensor")
test_eq(L.w2.dtype, torch.float32); L(torch.randn(3, 16))                         # a refused load changed nothing
L16 = FusedMoE(small.replace(dtype=torch.float16), seed=1)
test_fail(lambda: L16.load_state_dict({**L16.state_dict(), "w2": sd["w2"] * 1e6}), contains="state_dict['w2'] in torch.float16: expected finite")

# %% [markdown]
# Shared experts are added exactly once: the same model with one shared expert gives the same output on 1, 2 and 4
# ranks, in both formats, and it differs from the model without it by exactly the shared MLP.

# %%
#| test shared_experts_once
torch.manual_seed(4)
base = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.float32,
                 num_shared_experts=1, shared_intermediate_size=24)
x = torch.randn(6, 32)
outs = []
for ep, backend in ((1, "none"), (2, "allgather_reducescatter"), (4, "nixl_ep")):
    run = run_emulated_ep(base.replace(parallel=ParallelConfig.make(1, ep, enable_expert_parallel=ep > 1,
                                                                    all2all_backend=backend)), x, seed=1)
    assert_close(run.output, run.reference); outs.append(run.output)
for o in outs[1:]: assert_close(o, outs[0].double())
plain = run_emulated_ep(base.replace(num_shared_experts=0, shared_intermediate_size=None), x, seed=1)
sh = RandomExpertWeights(base, seed=1).shared()
assert_close(outs[0] - plain.output, expert_mlp(x.double(), sh["w13"].double(), sh["w2"].double()))

# %% [markdown]
# `routed_scaling_factor` multiplies the routed experts only: folded into the router weights (as moe-lit's routers
# do) it gives exactly the routed output scaled afterwards, and the shared expert stays unscaled (sglang#28237).

# %%
#| test routed_scaling_factor_routed_only
torch.manual_seed(5)
base = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, dtype=torch.float64,
                 num_shared_experts=1, routing_method="grouped_topk", num_expert_group=4, topk_group=2)
x = torch.randn(5, 32, dtype=torch.float64)
one = run_emulated_ep(base, x, seed=2)
scaled = run_emulated_ep(base.replace(routed_scaling_factor=2.5), x, seed=2)
sh = RandomExpertWeights(base, seed=2).shared()
shared = expert_mlp(x, sh["w13"], sh["w2"])
assert_close(scaled.output - shared, 2.5 * (one.output - shared), rtol=1e-6)   # router weights are fp32 by contract
