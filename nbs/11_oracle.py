# %%
#| default_exp oracle

# %% [markdown]
# # The oracle
# > Which experts backend runs a layer: a pure function of frozen inputs that scans one priority list, takes the activation format from the prepare/finalize, and gives a reason for every candidate.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
import torch
from moe_lit.terms import check_choice
from moe_lit.config import ActivationFormat, MoEConfig
from moe_lit.quant import QUANT_SCHEME_TABLE, quant_scheme_name   # the records only: the oracle imports no Triton

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.config import BACKENDS, ParallelConfig
from moe_lit.modular import make_prepare_finalize

# %% [markdown]
# In this notebook: `DeviceCaps` (with `DEVICES`), `QUANT_SCHEMES`, `ExpertsBackend` and the priority lists,
# `select_experts_backend` (plus `select_unquantized_moe_backend`, `select_fp8_moe_backend`,
# `select_mxfp4_moe_backend`, `select_nvfp4_moe_backend`) and the `Decision` it returns. An **explanation** page.
#
# ## Why the format is an input
#
# vLLM's FP4 oracles asked "is this DeepEP low-latency?" to decide whether batched experts were needed, and picked a
# Standard-format kernel for NIXL EP (vLLM PR #40412). Here the oracle never looks at backend names: the activation
# format is an input, read from the prepare/finalize built for the deployment (`10_modular`), and every candidate
# declares the format it consumes. A candidate of the wrong format is rejected *with that reason* — it cannot be
# chosen by accident.
#
# ## Inputs

# %%
#| export
@dataclass(frozen=True)
class DeviceCaps:
    """What the oracle needs to know about the device: kind, compute capability and the libraries installed. ValueError
    at construction naming `kind` (not a str), `capability` (not None or an int pair; None exactly for 'cpu'),
    `libraries` (not a frozenset of str) or `interpreter` (not a bool; True only for 'cpu'). Source: moe-lit's own, in
    the place of the `current_platform` capability queries of vLLM's oracles."""
    kind: str                                  # 'cpu', 'a100', 'h100', 'h200', 'b200'
    capability: tuple | None                   # CUDA compute capability, None on the CPU
    libraries: frozenset = frozenset()         # optional kernel libraries installed (e.g. 'flashinfer', 'deep_gemm')
    interpreter: bool = False                  # the CPU running Triton kernels in Triton's interpreter (TRITON_INTERPRET=1)

    def __post_init__(self):
        if not isinstance(self.kind, str): raise ValueError(f"kind: expected a str, got {self.kind!r}")
        cap = self.capability
        if cap is not None and not (isinstance(cap, tuple) and len(cap) == 2 and all(type(c) is int and c >= 0 for c in cap)):
            raise ValueError(f"capability: expected None or a pair of ints >= 0 (major, minor), got {cap!r}")
        if (self.kind == "cpu") != (cap is None):
            raise ValueError(f"capability: expected None exactly for kind 'cpu', got {cap!r} for {self.kind!r}")
        if not (isinstance(self.libraries, frozenset) and all(isinstance(l, str) for l in self.libraries)):
            raise ValueError(f"libraries: expected a frozenset of names, got {self.libraries!r}")
        if not isinstance(self.interpreter, bool) or (self.interpreter and cap is not None):
            raise ValueError(f"interpreter: expected False, or True for kind 'cpu' (Triton's CPU interpreter), got "
                             f"{self.interpreter!r} for {self.kind!r}")

    @property
    def is_gpu(self) -> bool:
        "Whether this is a CUDA device (it has a compute capability). Raises nothing. Source: moe-lit's own."
        return self.capability is not None

DEVICES = {"cpu": DeviceCaps("cpu", None), "a100": DeviceCaps("a100", (8, 0)), "h100": DeviceCaps("h100", (9, 0)),
           "h200": DeviceCaps("h200", (9, 0)), "b200": DeviceCaps("b200", (10, 0))}
CPU_INTERPRETER = DeviceCaps("cpu", None, interpreter=True)   # Triton's kernels on the CPU: slow, for checking them

QUANT_SCHEMES = ("unquantized", *QUANT_SCHEME_TABLE)     # the schemes of `09_quant` (run by `09c_kernels.quant` and `09d_kernels.quant_experts`)

def detect_device() -> DeviceCaps:
    """The current machine's `DeviceCaps` (the first CUDA device, else the CPU), with the libraries importable here.
    Raises nothing of its own (a GPU of no known kind is 'gpu'; torch's RuntimeError if the CUDA driver fails). Source:
    moe-lit's own (`torch.cuda` queries, `importlib.util.find_spec`)."""
    import importlib.util
    libs = frozenset(l for l in ("flashinfer", "deep_gemm") if importlib.util.find_spec(l) is not None)
    if not torch.cuda.is_available(): return DeviceCaps("cpu", None, libs)
    name = torch.cuda.get_device_name().lower()
    kind = next((k for k in ("h200", "h100", "b200", "a100") if k in name), "gpu")
    return DeviceCaps(kind, torch.cuda.get_device_capability(), libs)

# %% [markdown]
# ## Candidates
#
# Each candidate declares the activation format it consumes, the quant schemes it runs, the gated activations and
# biases its GEMMs compute, the layer dtypes it runs (`KERNEL_DTYPES` for the Triton kernels, `HALF_DTYPES` for the
# quantized ones, float64 too for the torch references: `resolve_experts` reads the same record), and a predicate
# over the device that returns `(ok, reason)`. moe-lit's Triton kernels run unquantized weights (`06`, `08`), FP8 w8a8 on the
# hardware FP8 path of Ada/Hopper and later (`09c`), and FP4 weights with 16-bit activations by dequantizing in the
# K loop (`09c`) — an **emulation** on Hopper, which has no FP4 tensor cores, and said so in the reason. Where none of
# those fits (FP8 on an A100), the **dequant** candidates dequantize the weights once and run the unquantized experts
# of the same format; on a CPU the torch references do the same. Library backends that moe-lit cannot run are listed
# so their rejection is visible.

# %%
#| export
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)   # the layer dtypes moe-lit's Triton kernels run
HALF_DTYPES = (torch.bfloat16, torch.float16)                   # ... and its quantized ones (16-bit activations)

@dataclass(frozen=True)
class ExpertsBackend:
    """One experts implementation the oracle can choose. Raises nothing: a frozen record, its fields not checked at
    construction (the entries of `CANDIDATES` are fixed). Source: moe-lit's own; the backends vLLM's oracles choose
    between (fused_moe/oracle/*.py)."""
    name: str
    activation_format: ActivationFormat
    quant_schemes: tuple
    implementation: str                       # 'triton', 'triton_quant', 'torch' (moe_lit.modular.make_experts), or 'external'
    emulated: bool = False                    # quantized weights are dequantized (once, or in the K loop)
    needs_gpu: bool = False
    min_capability: tuple | None = None
    library: str | None = None
    note: str = ""                            # how it runs a quantized scheme (appended to an accepting reason)
    activations: tuple = ("silu", "swigluoai")  # the gated activations its GEMM1 epilogue computes
    expert_bias: bool = True                  # adds w13_bias / w2_bias in its GEMMs
    dtypes: tuple = KERNEL_DTYPES             # the layer dtypes (activations and weights) it runs

    def check(self, device: DeviceCaps) -> tuple[bool, str]:
        """Device and library predicates: `(ok, reason)` (the reason installing nothing can change comes first). Raises
        nothing for a `DeviceCaps` (AttributeError for anything else). Source: moe-lit's own; vLLM's
        `_supports_current_device` and capability checks (`is_supported_config`, modular_kernel.py)."""
        if self.implementation == "external":
            lib = f" (the '{self.library}' library's)" if self.library else ""
            return False, f"external backend{lib}: moe-lit has no adapter for it yet"
        if self.library is not None and self.library not in device.libraries:
            return False, f"needs the '{self.library}' library, not installed"
        if device.interpreter and self.implementation != "torch":    # Triton's interpreter emulates any GPU's features
            return True, "runs in Triton's CPU interpreter (slow: for checking the kernels)"
        if self.needs_gpu and not device.is_gpu:
            return False, (f"needs a CUDA GPU, device is {device.kind} (or the CPU with Triton's interpreter: "
                           f"experts='triton' with TRITON_INTERPRET=1; on the command line --experts triton, and "
                           f"explain --device cpu-interpreter)")
        if self.min_capability and (device.capability or (0, 0)) < self.min_capability:
            return False, f"needs compute capability >= {self.min_capability}, {device.kind} has {device.capability}"
        return True, "device and libraries fit"

# %%
#| export
_S, _B = ActivationFormat.Standard, ActivationFormat.BatchedExperts
_ALL = QUANT_SCHEMES
_Q = QUANT_SCHEMES[1:]
_FP8 = tuple(q for q in _Q if QUANT_SCHEME_TABLE[q].is_fp8)
_FP4 = tuple(q for q in _Q if q.endswith("w4a16"))
_DEQUANT = "weights dequantized to the activation dtype once, then the unquantized experts (an emulation)"
_SILU_ONLY = dict(activations=("silu",), expert_bias=False)   # SiLU-gated, bias-free experts only
_HW_FP8 = "hardware FP8: e4m3 x e4m3 tensor-core dots, fp32 accumulation, scales applied in fp32"
_W4A16 = ("FP4 codes dequantized to bf16/fp16 inside the K loop (an emulation on every device: the FP4 tensor-core "
          "dots of Blackwell are not used; Hopper and older have none)")
CANDIDATES = (   # one priority list; per scheme the oracle scans it in this order
    ExpertsBackend("flashinfer_cutlass_fp4", _S, ("nvfp4_w4a16",), "external", min_capability=(10, 0), library="flashinfer",
                   **_SILU_ONLY),
    ExpertsBackend("deep_gemm_fp8", _S, ("fp8_w8a8_block",), "external", min_capability=(9, 0), library="deep_gemm",
                   **_SILU_ONLY),
    ExpertsBackend("triton_contiguous", _S, ("unquantized",), "triton", needs_gpu=True),
    ExpertsBackend("triton_batched", _B, ("unquantized",), "triton", needs_gpu=True),
    ExpertsBackend("triton_contiguous_fp8", _S, _FP8, "triton_quant", needs_gpu=True, min_capability=(8, 9), note=_HW_FP8,
                   dtypes=HALF_DTYPES),
    ExpertsBackend("triton_batched_fp8", _B, _FP8, "triton_quant", needs_gpu=True, min_capability=(8, 9), note=_HW_FP8,
                   dtypes=HALF_DTYPES),
    ExpertsBackend("triton_contiguous_w4a16", _S, _FP4, "triton_quant", emulated=True, needs_gpu=True,
                   min_capability=(8, 0), note=_W4A16, dtypes=HALF_DTYPES),
    ExpertsBackend("triton_batched_w4a16", _B, _FP4, "triton_quant", emulated=True, needs_gpu=True,
                   min_capability=(8, 0), note=_W4A16, dtypes=HALF_DTYPES),
    ExpertsBackend("triton_contiguous_dequant", _S, _Q, "triton", emulated=True, needs_gpu=True, note=_DEQUANT),
    ExpertsBackend("triton_batched_dequant", _B, _Q, "triton", emulated=True, needs_gpu=True, note=_DEQUANT),
    ExpertsBackend("torch_standard", _S, _ALL, "torch", note=_DEQUANT, dtypes=(*KERNEL_DTYPES, torch.float64)),
    ExpertsBackend("torch_batched", _B, _ALL, "torch", note=_DEQUANT, dtypes=(*KERNEL_DTYPES, torch.float64)),
)

# %% [markdown]
# ## The decision

# %%
#| export
def verdict(ok: bool, chosen: bool) -> str:
    """One candidate's verdict, in the words the decision table and `moe-lit explain` both print: 'chosen', 'accepted'
    (fits, but a candidate before it was chosen) or 'rejected'. Raises nothing. Source: moe-lit's own."""
    return "chosen" if chosen else "accepted" if ok else "rejected"

@dataclass(frozen=True)
class Decision:
    """The chosen backend and, for every candidate in priority order, `(name, accepted, reason)`. Raises nothing: a
    frozen record made by `select_experts_backend`, not checked at construction. Source: moe-lit's own (vLLM's oracles
    return the backend alone and log their reasons)."""
    chosen: ExpertsBackend
    activation_format: ActivationFormat
    quant_scheme: str
    device: DeviceCaps
    trace: tuple

    def table(self) -> str:
        """The decision as a markdown table (the CLI and the notebook show it). Raises nothing for a Decision of
        `select_experts_backend`. Source: moe-lit's own."""
        bold = lambda v: f"**{v}**" if v == "chosen" else v            # the one chosen stands out
        rows = [f"| {n} | {bold(verdict(ok, n == self.chosen.name))} | {r} |" for n, ok, r in self.trace]
        return "\n".join([f"format {self.activation_format.value}, quant {self.quant_scheme}, device {self.device.kind}"
                          + (" in Triton interpreter" if self.device.interpreter else ""),
                          "", "| candidate | verdict | reason |", "|---|---|---|", *rows])

    def _repr_markdown_(self): return self.table()

# %%
#| export
def select_experts_backend(moe_config: MoEConfig,                 # the layer (activation, biases, dtype)
                           quant_scheme: str,                      # a QUANT_SCHEMES name (or its short name, 'fp8')
                           activation_format: ActivationFormat,    # what the prepare/finalize produces
                           device: DeviceCaps,                     # DEVICES[...] or detect_device()
                           backend: str | None = None,             # force one candidate by name; None: the first that fits
                          ) -> Decision:
    """Scan the priority list `CANDIDATES` once; the first candidate that fits format, scheme, device and `backend` is
    chosen, and the `Decision` keeps every candidate's reason. ValueError naming the argument: `moe_config` not a
    MoEConfig, an unknown `quant_scheme`, `activation_format` not an ActivationFormat, `device` not a DeviceCaps,
    `backend` not a candidate's name or one that does not fit (with its reason), and `quant_scheme` when no candidate
    runs it. Source: vLLM's oracles, `vllm/model_executor/layers/fused_moe/oracle/{unquantized,fp8,mxfp4,nvfp4}.py`,
    and the format check of https://github.com/vllm-project/vllm/pull/40412."""
    if not isinstance(moe_config, MoEConfig): raise ValueError(f"moe_config: expected a MoEConfig, got {type(moe_config).__name__}")
    quant_scheme = quant_scheme_name(quant_scheme, "quant_scheme")                     # a short name too
    if not isinstance(activation_format, ActivationFormat):
        raise ValueError(f"activation_format: expected an ActivationFormat, got {activation_format!r}")
    if not isinstance(device, DeviceCaps): raise ValueError(f"device: expected a DeviceCaps, got {type(device).__name__}")
    if backend is not None: check_choice("backend", backend, [c.name for c in CANDIDATES])
    trace, chosen = [], None
    for c in CANDIDATES:
        if c.activation_format is not activation_format:
            ok, why = False, f"consumes {c.activation_format.value}, the prepare/finalize produces {activation_format.value}"
        elif quant_scheme not in c.quant_schemes: ok, why = False, f"does not run {quant_scheme}"
        elif moe_config.activation not in c.activations:
            ok, why = False, f"runs {'/'.join(c.activations)} experts, the layer's activation is {moe_config.activation}"
        elif moe_config.has_expert_bias and not c.expert_bias:
            ok, why = False, "runs bias-free experts, the layer's experts have biases (w13_bias, w2_bias)"
        elif moe_config.dtype not in c.dtypes:
            ok, why = False, (f"runs {'/'.join(str(d)[6:] for d in c.dtypes)} layers, the layer's dtype is "
                              f"{str(moe_config.dtype)[6:]}")
        else: ok, why = c.check(device)
        if ok and quant_scheme != "unquantized" and c.note:      # on the interpreter: what it emulates
            why += f"; {'on a GPU, ' if device.interpreter and c.implementation != 'torch' else ''}{c.note}"
        if ok and backend is not None and c.name != backend: ok, why = False, f"not the backend asked for, '{backend}'"
        if ok and chosen is not None: why = f"fits, but '{chosen.name}' comes first"
        trace.append((c.name, ok, why))
        if ok and chosen is None: chosen = c
    if chosen is None:
        reason = dict((n, r) for n, _, r in trace)[backend] if backend else "no candidate fits"
        fits = [n for n, _, r in trace if r.startswith("not the backend asked for")]   # what would have been taken
        raise ValueError(f"backend: expected a backend that fits this layer, got {backend!r}: {reason}; "
                         f"{'these fit: ' + ', '.join(fits) if fits else 'none fits'} (`moe-lit explain` lists why)" if backend
                         else f"quant_scheme: no experts backend runs {quant_scheme} in {activation_format.value} on {device.kind}")
    return Decision(chosen, activation_format, quant_scheme, device, tuple(trace))

# %% [markdown]
# The thin entry points of vLLM's oracles. The layer (`12_layer.resolve_experts`) is the one place that asks the
# oracle for a deployment: it takes the format from the deployment's backend record — the prepare/finalize's format —
# and builds the experts the decision names.

# %%
#| export
def select_unquantized_moe_backend(moe_config: MoEConfig, activation_format: ActivationFormat, device: DeviceCaps,
                                   backend: str | None = None) -> Decision:
    "`select_experts_backend` for unquantized weights (vLLM's `oracle/unquantized.py`); raises as it does."
    return select_experts_backend(moe_config, "unquantized", activation_format, device, backend)

def select_fp8_moe_backend(moe_config: MoEConfig, activation_format: ActivationFormat, device: DeviceCaps,
                           backend: str | None = None, granularity: str = "block") -> Decision:
    """`select_experts_backend` for FP8 w8a8 with weight scales per 'tensor', 'channel' or 128×128 'block' (vLLM's
    `oracle/fp8.py`); raises as it does, and ValueError naming `granularity` for another value."""
    check_choice("granularity", granularity, ("tensor", "channel", "block"))
    return select_experts_backend(moe_config, f"fp8_w8a8_{granularity}", activation_format, device, backend)

def select_mxfp4_moe_backend(moe_config: MoEConfig, activation_format: ActivationFormat, device: DeviceCaps,
                             backend: str | None = None) -> Decision:
    "`select_experts_backend` for MXFP4 weights with 16-bit activations (vLLM's `oracle/mxfp4.py`); raises as it does."
    return select_experts_backend(moe_config, "mxfp4_w4a16", activation_format, device, backend)

def select_nvfp4_moe_backend(moe_config: MoEConfig, activation_format: ActivationFormat, device: DeviceCaps,
                             backend: str | None = None) -> Decision:
    "`select_experts_backend` for NVFP4 weights with 16-bit activations (vLLM's `oracle/nvfp4.py`); raises as it does."
    return select_experts_backend(moe_config, "nvfp4_w4a16", activation_format, device, backend)

# %% [markdown]
# ## Tests
#
# The exhaustive walk: every backend of the descriptor table × every quant scheme × every device kind. The chosen
# experts' format equals the prepare/finalize's, every reason is non-empty, and the choice is deterministic.

# %%
#| test oracle_exhaustive_walk
for name in BACKENDS:
    cfg = MoEConfig(16, 2, 2048, 64, parallel=ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend=name))
    fmt = make_prepare_finalize(cfg, 8).activation_format
    for scheme in QUANT_SCHEMES:
        for dev in DEVICES.values():
            d = select_experts_backend(cfg, scheme, fmt, dev)
            test_eq(d.chosen.activation_format, fmt)
            assert all(r for _, _, r in d.trace) and len(d.trace) == len(CANDIDATES)
            test_eq(select_experts_backend(cfg, scheme, fmt, dev), d)           # deterministic
            if not dev.is_gpu: test_eq(d.chosen.implementation, "torch")        # no GPU: a torch backend, said so

# %% [markdown]
# The seed's scenario, named: NIXL EP with NVFP4 and with MXFP4 weights on a Hopper GPU. The prepare/finalize is
# batched, so only batched experts can be chosen; the Standard candidates are rejected for their format.

# %%
#| test nixl_ep_fp4_picks_batched_experts
cfg = MoEConfig(128, 4, 3072, 2880, parallel=ParallelConfig.make(1, 8, enable_expert_parallel=True, all2all_backend="nixl_ep"))
fmt = make_prepare_finalize(cfg, 64).activation_format
test_eq(fmt, ActivationFormat.BatchedExperts)
for select in (select_nvfp4_moe_backend, select_mxfp4_moe_backend):
    d = select(cfg, fmt, DEVICES["h200"])
    test_eq((d.chosen.name, d.chosen.activation_format), ("triton_batched_w4a16", ActivationFormat.BatchedExperts))
    reasons = dict((n, r) for n, _, r in d.trace)
    for standard in ("triton_contiguous_w4a16", "triton_contiguous_dequant", "torch_standard"):
        assert "consumes standard, the prepare/finalize produces batched_experts" in reasons[standard]
    assert "an emulation" in dict((n, r) for n, ok, r in d.trace if ok)["triton_batched_w4a16"]

# %% [markdown]
# FP8 takes the hardware path where the device has FP8 tensor cores (compute capability 8.9 and up) and falls back
# to the declared dequant emulation where it has not (an A100); FP4 on a B200 without FlashInfer stays on the K-loop
# emulation, and says why the library backend was passed over.

# %%
#| test oracle_fp8_and_fp4_by_device
cfg = MoEConfig(16, 2, 2048, 64)
S = ActivationFormat.Standard
for scheme in ("fp8_w8a8_tensor", "fp8_w8a8_channel", "fp8_w8a8_block"):
    d = select_experts_backend(cfg, scheme, S, DEVICES["h200"])
    test_eq(d.chosen.name, "triton_contiguous_fp8"); assert "hardware FP8" in dict((n, r) for n, _, r in d.trace)[d.chosen.name]
    d = select_experts_backend(cfg, scheme, S, DEVICES["a100"])
    test_eq(d.chosen.name, "triton_contiguous_dequant")
    assert "needs compute capability >= (8, 9)" in dict((n, r) for n, _, r in d.trace)["triton_contiguous_fp8"]
    why = dict((n, r) for n, _, r in select_experts_backend(cfg, scheme, S, CPU_INTERPRETER).trace)["triton_contiguous_fp8"]
    assert "interpreter" in why and "on a GPU, hardware FP8" in why, why      # emulated here: no tensor cores
d = select_nvfp4_moe_backend(cfg, S, DEVICES["b200"])
test_eq(d.chosen.name, "triton_contiguous_w4a16")
why = dict((n, r) for n, _, r in d.trace)["flashinfer_cutlass_fp4"]   # not installed, and no adapter: the adapter
assert why == "external backend (the 'flashinfer' library's): moe-lit has no adapter for it yet", why   # is named

# %% [markdown]
# The experts' function is part of the match too. gpt-oss's clamped SwiGLU with biases runs in moe-lit's Triton
# kernels of both formats, quantized or not (their GEMM1 epilogue computes either activation, both GEMMs add a bias),
# and in the torch references; the library backends declared here run SiLU-gated, bias-free experts only, so for
# gpt-oss the oracle passes over them and says why.

# %%
#| test oracle_knows_activations
oss = MoEConfig(32, 4, 2880, 2880, activation="swigluoai", has_expert_bias=True, has_router_bias=True)
S, B = ActivationFormat.Standard, ActivationFormat.BatchedExperts
test_eq(select_experts_backend(oss, "unquantized", B, DEVICES["h200"]).chosen.name, "triton_batched")
test_eq(select_mxfp4_moe_backend(oss, B, DEVICES["h200"]).chosen.name, "triton_batched_w4a16")
b200 = DeviceCaps("b200", (10, 0), frozenset({"flashinfer"}))
d = select_nvfp4_moe_backend(oss, S, b200)
test_eq(d.chosen.name, "triton_contiguous_w4a16")
assert "the layer's activation is swigluoai" in dict((n, r) for n, _, r in d.trace)["flashinfer_cutlass_fp4"]
d = select_nvfp4_moe_backend(oss.replace(activation="silu"), S, b200)      # biases alone also rule it out
assert "bias-free experts" in dict((n, r) for n, _, r in d.trace)["flashinfer_cutlass_fp4"]
d = select_nvfp4_moe_backend(oss.replace(activation="silu", has_expert_bias=False), S, b200)
assert "no adapter" in dict((n, r) for n, _, r in d.trace)["flashinfer_cutlass_fp4"]   # passes the function check

# %%
#| test oracle_override_and_bad_input
cfg = MoEConfig(8, 2, 64, 32)
S = ActivationFormat.Standard
test_eq(select_experts_backend(cfg, "unquantized", S, DEVICES["h200"], backend="torch_standard").chosen.name, "torch_standard")
test_fail(lambda: select_experts_backend(cfg, "unquantized", S, DEVICES["h200"], backend="triton_batched"),
          contains="consumes batched_experts")                                  # an incompatible override raises
test_fail(lambda: select_experts_backend(cfg, "unquantized", S, DEVICES["h200"], backend="triton_batched"),
          contains="these fit: triton_contiguous, torch_standard (`moe-lit explain` lists why)")   # and names the ones that fit
test_fail(lambda: select_experts_backend(cfg, "unquantized", S, DEVICES["cpu"], backend="triton_contiguous"),
          contains="needs a CUDA GPU")
test_fail(lambda: select_experts_backend(cfg, "int4", S, DEVICES["cpu"]), contains="quant_scheme: expected one of")
test_fail(lambda: select_experts_backend(cfg, "unquantized", "standard", DEVICES["cpu"]), contains="activation_format: expected an ActivationFormat")
test_fail(lambda: select_experts_backend(cfg, "unquantized", S, DEVICES["cpu"], backend="cutlass"), contains="backend: expected one of")
for cap in ("9.0", (True, False), (-1, 0), (9.0, 0)):
    test_fail(lambda: DeviceCaps("h100", cap), contains="capability: expected None or a pair of ints >= 0 (major, minor)")
f64 = MoEConfig(8, 2, 64, 32, dtype=torch.float64)             # the kernels' dtypes are the candidates' own record:
for dev in (DEVICES["h200"], CPU_INTERPRETER):                 # float64 goes to torch, on a GPU and in the interpreter
    d = select_experts_backend(f64, "unquantized", S, dev)
    test_eq(d.chosen.name, "torch_standard")
    test_eq(dict((n, r) for n, _, r in d.trace)["triton_contiguous"], "runs bfloat16/float16/float32 layers, the layer's dtype is float64")
d = select_experts_backend(cfg.replace(dtype=torch.float32), "fp8_w8a8_block", S, DEVICES["h200"])
test_eq(dict((n, r) for n, _, r in d.trace)["triton_contiguous_fp8"], "runs bfloat16/float16 layers, the layer's dtype is float32")
test_fail(lambda: DeviceCaps("cpu", (9, 0)), contains="capability: expected None exactly for kind 'cpu'")
test_fail(lambda: DeviceCaps("h100", (9, 0), "flashinfer_x"), contains="libraries: expected a frozenset")
test_fail(lambda: select_fp8_moe_backend(cfg, S, DEVICES["cpu"], granularity="row"), contains="granularity: expected one of")
d = select_experts_backend(cfg, "nvfp4_w4a16", S, DeviceCaps("b200", (10, 0), frozenset({"flashinfer"})))
assert "no adapter" in dict((n, r) for n, _, r in d.trace)["flashinfer_cutlass_fp4"]

# %%
select_experts_backend(MoEConfig(128, 4, 3072, 2880, parallel=ParallelConfig.make(1, 8, enable_expert_parallel=True, all2all_backend="nixl_ep")),
                       "nvfp4_w4a16", ActivationFormat.BatchedExperts, DEVICES["h200"])

# %% [markdown]
# ## The whole decision table
#
# Every format × device × scheme at once: each cell is the backend chosen, coloured by how it runs (Triton kernel on
# the quantized codes, Triton on dequantized weights, torch reference). The batched rows — DeepEP low-latency and NIXL
# EP — never show a Standard-format backend, whatever the scheme or device.

# %%
#| export
def plot_decisions(moe_config: MoEConfig | None = None, devices=("cpu", "a100", "h200", "b200")):
    """Table figure: the chosen backend per (activation format, device) row and quant-scheme column. Returns the Figure.
    ValueError from `select_experts_backend` (a `moe_config` that is not a MoEConfig, or a cell no candidate runs);
    KeyError for a device name not in `DEVICES`; ImportError without matplotlib. Source: moe-lit's own."""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = moe_config or MoEConfig(128, 4, 3072, 2880)
    rows, cells, colours = [], [], []
    shade = {"triton": "#cfe8cf", "triton_quant": "#9fd49f", "torch": "#e8e0cf"}
    for fmt in ActivationFormat:
        for dev in devices:
            rows.append(f"{fmt.value} / {dev}")
            ds = [select_experts_backend(cfg, q, fmt, DEVICES[dev]).chosen for q in QUANT_SCHEMES]
            cells.append([c.name for c in ds])
            colours.append([("#f4d6c6" if c.emulated and c.implementation == "triton" else shade[c.implementation]) for c in ds])
    fig, ax = plt.subplots(figsize=(13, 0.42 * len(rows) + 0.9))
    ax.axis("off")
    t = ax.table(cellText=cells, cellColours=colours, rowLabels=rows, colLabels=list(QUANT_SCHEMES), loc="center")
    t.auto_set_font_size(False); t.set_fontsize(7.5); t.scale(1, 1.3)
    ax.set_title("chosen experts backend (green: Triton on the codes or unquantized; orange: Triton on weights "
                 "dequantized once; beige: torch reference)", fontsize=8)
    fig.tight_layout(); plt.close(fig)
    return fig

# %%
plot_decisions()
