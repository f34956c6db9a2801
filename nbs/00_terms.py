# %%
#| default_exp terms

# %% [markdown]
# # Terms
# > The vocabulary of moe-lit, the dimension legend, the mapping to vLLM and Hugging Face names, and the argument checks every public function uses.

# %%
#| export
from __future__ import annotations
import json, math, os
from dataclasses import dataclass
from pathlib import Path
import torch

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# In this notebook: the vocabulary table `TERMS` (with `vllm_name` / `hf_names` look-ups), the dimension legend
# `DIMENSIONS`, and the argument checks `check_int`, `check_bool`, `check_positive_real`, `check_choice` and
# `check_tensor`. It is a **reference** page
# (Diátaxis): read it once, come back to it when a name is unclear.
#
# ## The vocabulary
#
# A Mixture-of-Experts (MoE) layer sends each of `num_tokens` tokens to `top_k` of `num_experts` expert MLPs and sums
# their outputs, weighted by the router. The same quantity has different names in vLLM, in Hugging Face
# `config.json` files and in papers; moe-lit uses exactly one, listed here with its counterparts.

# %%
#| export
@dataclass(frozen=True)
class Term:
    """One moe-lit name with its meaning and its spelling in vLLM and in Hugging Face configs. Raises nothing: the
    fields are not checked (the `terms_lookup` test keeps `TERMS` one-to-one). Source: moe-lit's own table; the vLLM
    spellings are those of vLLM's fused_moe package (shared/reference/vllm_fused_moe.md)."""
    name: str            # the moe-lit spelling, used everywhere in code and docs
    meaning: str         # one line, with shape and dtype for tensors
    vllm: str            # vLLM's spelling ("" when vLLM has none)
    hf: tuple = ()       # Hugging Face config.json keys that carry it (all known variants)

TERMS = (
    Term("num_experts", "routed experts in the model (global, logical)", "global_num_experts / num_experts",
         ("num_experts", "num_local_experts", "n_routed_experts")),
    Term("num_local_experts", "experts held by one EP rank", "local_num_experts", ()),
    Term("top_k", "experts each token is routed to", "top_k / experts_per_token / topk", ("num_experts_per_tok",)),
    Term("hidden_size", "model width H; rows of the MoE input are [hidden_size]", "hidden_dim / hidden_size",
         ("hidden_size",)),
    Term("intermediate_size", "width I of one expert MLP (per expert, before TP sharding)", "intermediate_size",
         ("moe_intermediate_size", "intermediate_size")),
    Term("num_shared_experts", "always-on experts added to every token", "n_shared_experts", ("n_shared_experts",)),
    Term("num_tokens", "tokens T in the batch handed to the layer", "M (in kernels)", ()),
    Term("topk_ids", "[num_tokens, top_k] int32, the expert id chosen for each slot", "topk_ids", ()),
    Term("topk_weights", "[num_tokens, top_k] float32, router weight of each slot", "topk_weights", ()),
    Term("expert_map", "[num_experts] int32, global expert id -> local index on this rank, -1 = not local",
         "expert_map", ()),
    Term("expert_num_tokens", "[num_local_experts] int32, valid leading rows in each expert's slab (batched format)",
         "expert_num_tokens", ()),
    Term("max_num_tokens_per_expert", "rows of each expert's slab in the batched format (capacity)",
         "max_num_tokens * num_dispatchers", ()),
    Term("global_to_physical", "[num_experts] int64, global id -> physical id (round-robin tables)",
         "expert_global_to_physical", ()),
    Term("physical_to_global", "[num_experts] int64, inverse permutation of global_to_physical",
         "expert_physical_to_global", ()),
    Term("local_to_global", "[num_local_experts] int64, local index -> global id on one rank",
         "expert_local_to_global", ()),
    Term("routed_scaling_factor", "multiplier of routed weights after renormalisation", "routed_scaling_factor",
         ("routed_scaling_factor",)),
    Term("num_expert_group", "expert groups for grouped top-k routing", "num_expert_group", ("n_group",)),
    Term("topk_group", "groups kept per token in grouped top-k routing", "topk_group", ("topk_group",)),
    Term("scoring_func", "'softmax' or 'sigmoid' over the router logits", "scoring_func", ("scoring_func",)),
    Term("renormalize", "divide the top_k weights by their sum", "renormalize", ("norm_topk_prob",)),
)

# %% [markdown]
# Two look-ups turn the table into answers, and its test checks that the table stays one-to-one.

# %%
#| export
def vllm_name(name: str) -> str:
    "vLLM's spelling of the moe-lit term `name`; raises ValueError for an unknown term."
    for t in TERMS:
        if t.name == name: return t.vllm
    raise ValueError(f"name: expected one of {[t.name for t in TERMS]}, got {name!r}")

def hf_names(name: str) -> tuple:
    """The Hugging Face config.json keys that carry the moe-lit term `name` (empty when none does). ValueError from
    `vllm_name` naming `name` for an unknown term."""
    vllm_name(name)  # validates
    return next(t.hf for t in TERMS if t.name == name)

# %%
#| test terms_lookup
test_eq(vllm_name("top_k"), "top_k / experts_per_token / topk")
test_eq(hf_names("num_experts"), ("num_experts", "num_local_experts", "n_routed_experts"))
test_eq(len({t.name for t in TERMS}), len(TERMS))  # one entry per name
test_fail(lambda: vllm_name("topk"), contains="expected one of")

# %% [markdown]
# ## Dimension legend
#
# Kernel-local letters are declared once. Inside GEMM kernels **M, N, K mean GEMM dimensions only**: `K` is never
# top-k (which is always spelled `top_k`, or `TOP_K` as a Triton constexpr).

# %%
#| export
DIMENSIONS = {
    "T": "num_tokens: tokens entering the layer",
    "E": "num_experts (global) or num_local_experts (per rank), as the shape comment says",
    "H": "hidden_size",
    "I": "intermediate_size (per expert)",
    "M": "GEMM rows (tokens of one expert in the batched format)",
    "N": "GEMM output columns (2*I for the fused gate/up weight w13, H for w2)",
    "K": "GEMM reduction length (H for w13, I for w2); never top_k",
}

# %%
#| test dimension_legend
assert set(DIMENSIONS) == set("TEHIMNK") and "never top_k" in DIMENSIONS["K"]

# %% [markdown]
# ## Argument checks
#
# Bad input gets a `ValueError` that names the argument, the expected value and the actual value — never a silent
# wrong result. Every public function of moe-lit validates through these three helpers, so the messages read the same
# everywhere: `<argument>: expected <what>, got <what>`.

# %%
#| export
def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """Check that `value` is an int (not a bool) with `lo <= value` and `value < hi` when given; returns it. ValueError
    naming `name` (not an int, or out of range). Source: moe-lit's own (`<argument>: expected <x>, got <y>`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if lo is not None and value < lo: raise ValueError(f"{name}: expected >= {lo}, got {value}")
    if hi is not None and value >= hi: raise ValueError(f"{name}: expected <= {hi - 1}, got {value}")
    return value

# %%
#| test check_int
test_eq(check_int("top_k", 2, lo=1), 2)
test_fail(lambda: check_int("top_k", 0, lo=1), contains="top_k: expected >= 1, got 0")
test_fail(lambda: check_int("ep_rank", 4, lo=0, hi=4), contains="ep_rank: expected <= 3, got 4")
test_fail(lambda: check_int("top_k", 2.0), contains="top_k: expected an int, got float")
test_fail(lambda: check_int("top_k", True), contains="expected an int, got bool")

# %%
#| export
def check_choice(name: str, value, choices) -> object:
    """Check that `value` is one of `choices` (a bool matches only a bool: `1` is not `True`); returns it. ValueError
    naming `name` and listing `choices` (a tensor is refused: its `==` is elementwise). Membership is `==`, so `1.0`
    passes for `1`. Source: moe-lit's own."""
    choices = tuple(choices)
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected one of {list(choices)}, got a tensor of shape {tuple(value.shape)}")
    ok = value in choices
    if ok and (type(value) is bool or any(type(c) is bool for c in choices)):   # `in` compares with ==: 1 == True
        ok = any(type(c) is type(value) and c == value for c in choices)
    if not ok: raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value

# %%
#| test check_choice
test_eq(check_choice("scoring_func", "sigmoid", ("softmax", "sigmoid")), "sigmoid")
test_fail(lambda: check_choice("scoring_func", "relu", ("softmax", "sigmoid")),
          contains="scoring_func: expected one of ['softmax', 'sigmoid'], got 'relu'")
test_eq(check_choice("tune", True, (False, True, "all")), True)
for bad, choices in ((1, (False, True, "all")), (0, (False, True)), (True, (1, 2))):     # == alone would let them in
    test_fail(lambda: check_choice("tune", bad, choices), contains=f"tune: expected one of {list(choices)}, got {bad!r}")
for bad in (torch.tensor(1), torch.tensor([1, 2])):    # `in` would pass the first and fail the second with a RuntimeError
    test_fail(lambda: check_choice("ep_size", bad, (1, 2)), contains="ep_size: expected one of [1, 2], got a tensor")

# %%
#| export
def check_bool(name: str, value) -> bool:
    """Check that `value` is a Python bool (not 1, not a numpy or torch bool); returns it. ValueError naming `name`.
    Source: moe-lit's own."""
    if not isinstance(value, bool): raise ValueError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value

FP32_NORMAL_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)   # float32's smallest normal and largest value

def check_positive_real(name: str, value,
                        fp32: bool = False,   # the value also multiplies float32 tensors: it must be a normal float32
                       ) -> float:
    """Check that `value` is a finite int or float > 0 (not a bool, not a str); returns it as a float. With `fp32`,
    also that it rounds to a normal float32 (`FP32_NORMAL_RANGE`): a factor the kernels apply in float32 (a routed
    scaling, a SwiGLU limit) would otherwise be inf or 0 there, turning every output NaN or 0 without an error. (A
    factor near float32's largest can still overflow the products it scales, as any float32 arithmetic does.)
    ValueError naming `name` (not a finite number > 0, or with `fp32` not a normal float32). Source: moe-lit's own."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try: ok = ok and math.isfinite(float(value)) and value > 0
    except OverflowError: ok = False                    # an int too large for a float
    if not ok: raise ValueError(f"{name}: expected a finite number > 0, got {type(value).__name__} {value!r}")
    if fp32:
        as32 = float(torch.tensor(float(value), dtype=torch.float32))     # float32's rounding: its printed limits pass
        if not (math.isfinite(as32) and as32 >= FP32_NORMAL_RANGE[0]):
            raise ValueError(f"{name}: expected a number float32 holds as a normal value ({FP32_NORMAL_RANGE[0]!r} to "
                             f"{FP32_NORMAL_RANGE[1]!r}; it is applied in float32), got {value!r}")
    return float(value)

def env_choice(name: str, default: str, choices: tuple) -> str:
    """The environment variable `name` as read now (unset or empty: `default`), one of `choices`; ValueError naming it
    otherwise. Source: moe-lit's own."""
    value = os.environ.get(name, "") or default
    if value not in choices: raise ValueError(f"{name}: expected {' or '.join(map(repr, choices))}, got {value!r} (an "
                                              f"environment setting of moe-lit's kernels, read when their module is "
                                              f"imported; unset it for the default, {default!r})")
    return value

def gradient_wanted(named) -> str | None:
    """The name of the first `(name, tensor)` pair whose tensor wants a gradient under autograd, else None (also when
    autograd is off). Raises nothing of its own (non-tensors are skipped; a non-iterable `named` gives Python's
    TypeError). Source: moe-lit's own (torch's `is_grad_enabled` and `requires_grad`)."""
    if not torch.is_grad_enabled(): return None
    return next((n for n, t in named if isinstance(t, torch.Tensor) and t.requires_grad), None)

def check_device(device, name: str = "device",
                 allow_meta: bool = False) -> torch.device:   # meta too (a layer built without values)
    """`device` as a torch.device, refusing unknown names, types other than cpu and cuda (and meta with
    `allow_meta`), and CUDA on a machine without a GPU. ValueError naming `name` (default `device`) in each case."""
    try: d = torch.device(device)
    except (RuntimeError, TypeError): raise ValueError(f"{name}: expected 'cpu', 'cuda' or a torch.device, got {device!r}") from None
    kinds = ("cpu", "cuda", "meta") if allow_meta else ("cpu", "cuda")
    if d.type not in kinds: raise ValueError(f"{name}: expected a {', '.join(kinds[:-1])} or {kinds[-1]} device, got {d}")
    if d.type == "cuda" and not torch.cuda.is_available(): raise ValueError(f"{name}: expected a CUDA GPU for {d}, got none")
    return d

# %%
#| test check_bool_and_real
test_eq(check_bool("renormalize", True), True)
test_fail(lambda: check_bool("renormalize", 1), contains="renormalize: expected a bool, got int 1")
test_eq(check_positive_real("routed_scaling_factor", 2), 2.0)
for bad in (0, -1.0, float("nan"), float("inf"), "2", True, 10**400):
    test_fail(lambda: check_positive_real("routed_scaling_factor", bad), contains="routed_scaling_factor: expected a finite number > 0")
for bad in (1e39, 1e-39, 10**39):                  # finite in Python, inf or subnormal in float32
    test_eq(check_positive_real("routed_scaling_factor", bad), float(bad))
    test_fail(lambda: check_positive_real("routed_scaling_factor", bad, fp32=True),
              contains="routed_scaling_factor: expected a number float32 holds as a normal value")
test_eq(check_positive_real("swiglu_limit", 3.4e38, fp32=True), 3.4e38)
for edge in (3.4028235e38, 1.1754943e-38, *FP32_NORMAL_RANGE):   # float32's limits as numpy prints them: accepted
    test_eq(check_positive_real("routed_scaling_factor", edge, fp32=True), edge)
for out in (3.41e38, 1.17e-38):
    test_fail(lambda: check_positive_real("routed_scaling_factor", out, fp32=True), contains="(1.1754943508222875e-38 to")
test_eq(check_device("cpu"), torch.device("cpu"))
trainable = torch.zeros(2, requires_grad=True)
test_eq(gradient_wanted([("a", torch.zeros(2)), ("b", None), ("c", trainable)]), "c")
with torch.no_grad(): test_eq(gradient_wanted([("c", trainable)]), None)
saved = os.environ.pop("MOE_LIT_TEST_SWITCH", None)
try:
    test_eq(env_choice("MOE_LIT_TEST_SWITCH", "0", ("0", "1")), "0")                  # unset: the default
    for v, want in (("", "0"), ("1", "1")):
        os.environ["MOE_LIT_TEST_SWITCH"] = v; test_eq(env_choice("MOE_LIT_TEST_SWITCH", "0", ("0", "1")), want)
    for v in ("2", "on", " 1"):
        os.environ["MOE_LIT_TEST_SWITCH"] = v
        test_fail(lambda: env_choice("MOE_LIT_TEST_SWITCH", "0", ("0", "1")), contains=f"MOE_LIT_TEST_SWITCH: expected '0' or '1', got {v!r} (an environment setting of moe-lit's kernels, read when their module is imported; unset it for the default, '0')")
finally:
    os.environ.pop("MOE_LIT_TEST_SWITCH", None)
    if saved is not None: os.environ["MOE_LIT_TEST_SWITCH"] = saved
for bad, msg in (("bogus", "expected 'cpu', 'cuda' or a torch.device, got 'bogus'"), (None, "expected 'cpu', 'cuda'"),
                 ("meta", "expected a cpu or cuda device, got meta")):
    test_fail(lambda: check_device(bad, "out_device"), contains=f"out_device: {msg}")
if not torch.cuda.is_available(): test_fail(lambda: check_device("cuda"), contains="device: expected a CUDA GPU for cuda, got none")

# %% [markdown]
# `check_tensor` enforces the shape comments: `shape` may hold `None` for "any size" and `dtype` may be one dtype or a
# tuple of allowed ones. Shape comments in moe-lit docstrings are enforced this way, not just written.

# %%
#| export
def check_tensor(name: str, t, shape: tuple | None = None, dtype=None, ndim: int | None = None,
                 contiguous: bool = False,
                 writable: bool = False,   # an output buffer: no two elements may share memory (no stride-0 expand)
                ) -> torch.Tensor:
    """Check that `t` is a tensor with the given rank, shape (None = any size), dtype(s) and, if asked, contiguous or
    writable; returns it. ValueError naming `name`: not a tensor, not strided, wrong rank, shape or dtype, not
    contiguous, or (with `writable`) overlapping elements. Metadata only, no sync. Source: moe-lit's own."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:                # sparse: no strides, no kernel reads it
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if shape is not None: ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and any(s is not None and s != a for s, a in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise ValueError(f"{name}: expected dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if contiguous and not t.is_contiguous():     # a kernel reads it as a flat array
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {list(t.shape)}")
    if writable and not t.is_contiguous():       # metadata only: dims by stride, each must step past the ones below
        reach = 0
        for st, sz in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
            if st <= reach:
                raise ValueError(f"{name}: expected an output buffer whose elements do not overlap, got strides "
                                 f"{t.stride()} for shape {list(t.shape)}")
            reach += (sz - 1) * st
    return t

# %%
#| test check_tensor
x = torch.zeros(4, 8, dtype=torch.int32)
test_eq(check_tensor("topk_ids", x, shape=(4, None), dtype=(torch.int32, torch.int64)).shape, (4, 8))
test_fail(lambda: check_tensor("topk_ids", x, shape=(5, None)), contains="topk_ids: expected shape [5, *], got [4, 8]")
test_fail(lambda: check_tensor("topk_ids", x, ndim=3), contains="expected a 3-D tensor, got shape (4, 8)")
test_fail(lambda: check_tensor("logits", torch.eye(3).to_sparse()), contains="logits: expected a dense (strided) tensor, got layout torch.sparse_coo")
for ok in (x, x[:, ::2], x.t(), torch.zeros(3, 1, 5)[:, :, 1:], torch.zeros(2, 1).expand(2, 1)):   # views that do not alias
    check_tensor("out", ok, writable=True)
for bad in (torch.zeros(1, 8).expand(4, 8), torch.zeros(8).as_strided((4, 4), (1, 1))):    # stride 0, overlapping rows
    test_fail(lambda: check_tensor("out", bad, writable=True), contains="out: expected an output buffer whose elements do not overlap")
test_fail(lambda: check_tensor("topk_ids", x, dtype=torch.int64), contains="expected dtype torch.int64, got torch.int32")
test_fail(lambda: check_tensor("topk_ids", [1, 2]), contains="expected a torch.Tensor, got list")
test_fail(lambda: check_tensor("expert_num_tokens", x[0, ::2], contiguous=True), contains="expert_num_tokens: expected a contiguous tensor, got strides (2,)")

# %%
#| export
def check_dense(name: str, t: torch.Tensor) -> torch.Tensor:
    """Check that tensor `t` holds values one can read: strided (not sparse), not on the meta device; returns it.
    ValueError naming `name`; a non-tensor `t` is not checked (AttributeError). Source: moe-lit's own."""
    if t.layout != torch.strided or t.is_meta:
        raise ValueError(f"{name}: expected a dense tensor with values, got "
                         f"{'a meta tensor' if t.is_meta else f'layout {t.layout}'}")
    return t

def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    "`[first, last)` bytes `t` can touch (metadata only)."
    start = t.data_ptr()
    if t.numel() == 0: return start, start
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))         # torch strides are >= 0
    return start, start + (last + 1) * t.element_size()

def check_disjoint(name: str, out: torch.Tensor, **inputs) -> torch.Tensor:
    """Check that output buffer `out` shares no memory with any of `inputs` (None skipped): a kernel would read what
    it already overwrote. Metadata only (byte ranges, so interleaved views that touch no common element are refused
    too). ValueError naming `name` and the overlapping input; `out` must be a tensor (else AttributeError). Source:
    moe-lit's own."""
    lo, hi = _byte_span(out)
    for n, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.device == out.device and lo < hi:
            a, b = _byte_span(t)
            if a < hi and lo < b:
                raise ValueError(f"{name}: expected a buffer that does not overlap {n} (the kernel reads {n} while it "
                                 f"writes {name}), got one sharing its memory")
    return out

# %%
#| test check_dense
check_dense("w", torch.zeros(2))
test_fail(lambda: check_dense("w", torch.zeros(2, device="meta")), contains="w: expected a dense tensor with values, got a meta tensor")
test_fail(lambda: check_dense("w", torch.eye(2).to_sparse()), contains="got layout torch.sparse_coo")
big = torch.zeros(4, 8)
check_disjoint("out", big[:, 4:].contiguous(), a=big[:, :4], w=None)           # separate memory
check_disjoint("out", big[2:], a=big[:2])                                        # the same storage, disjoint rows
test_fail(lambda: check_disjoint("out", big, a=big[:, :4]), contains="out: expected a buffer that does not overlap a")
test_fail(lambda: check_disjoint("out", big[1:3], a=big[2:]), contains="does not overlap a")             # one shared row

# %%
#| export
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)   # the float dtypes moe-lit computes in

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a computation in `dtype`: float64 for float64 inputs, float32 for everything else.
    Raises nothing: any other value, an integer dtype or a non-dtype included, gives float32. Source: moe-lit's own
    (float32 accumulation as in vLLM's Triton MoE kernels; float64 for the float64 references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32

# %%
#| test acc_dtype
test_eq([acc_dtype(d) for d in FLOAT_DTYPES], [torch.float64, torch.float32, torch.float32, torch.float32])

# %%
#| export
def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Check that every value of `t` is finite (a value check: it synchronizes, so it runs at construction or on
    request). ValueError naming `name` with the first bad value and its index, or for a non-empty meta tensor.
    Source: moe-lit's own."""
    if not t.numel(): return t
    if t.is_meta: raise ValueError(f"{name}: expected a tensor with values to check, got a meta tensor")
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):   # one reduction, no mask: min and
        ok = all(bool(torch.isfinite(v)) for v in torch.aminmax(t))                # max carry a NaN or an inf
    else: ok = bool(torch.isfinite(t).all())
    if not ok:
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected finite values, got {t[tuple(bad)].item()} at {bad}")
    return t

# %%
#| export
def use_triton_interpreter_without_gpu() -> bool:
    """For entry points only (the CLI, the test set-up): without a CUDA GPU, run Triton kernels in its CPU interpreter.
    Returns whether it chose the interpreter; raises nothing (an existing `TRITON_INTERPRET` is kept). Source:
    moe-lit's own, on Triton's `TRITON_INTERPRET` switch."""
    if torch.cuda.is_available(): return False
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when moe_lit.kernels is first imported: call this before
    return True

def read_json_object(path,                # a JSON file (str or Path)
                     name: str,           # what to call it in an error: the argument or the file's role
                     same_key=None,       # key -> the key it counts as (a tile table's "08" is "8"); default itself
                     ) -> dict:
    """The JSON object in the file at `path`, every object in it holding each key once: Python's json keeps the last of
    a repeated key, so a config.json giving `hidden_size` twice would be read silently as its second value. ValueError
    naming `name` and the file for unreadable text, invalid JSON, a repeated key, or a top level that is not an object.
    Source: moe-lit's own (Python's `json` with an `object_pairs_hook`)."""
    def unique(pairs):
        seen = {}
        for k, _ in pairs: seen.setdefault(same_key(k) if same_key else k, []).append(k)
        repeated = [spellings for spellings in seen.values() if len(spellings) > 1]
        if repeated: raise ValueError(f"duplicate keys {repeated[0]}")
        return dict(pairs)
    p = Path(path)
    if p.exists() and not (p.is_file() or p.is_dir()):         # a FIFO or device would block or never end: refused
        raise ValueError(f"{name}: expected a regular file at {path}, got something else (a pipe, socket or device)")
    try: obj = json.loads(p.read_text(), object_pairs_hook=unique)
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as e:   # JSONDecodeError is a ValueError;
        raise ValueError(f"{name}: expected valid JSON in {path}, got {type(e).__name__}: {e}") from None   # OSError: a directory
    if not isinstance(obj, dict): raise ValueError(f"{name}: expected a JSON object in {path}, got {type(obj).__name__}")
    return obj

def triton_interpreting() -> bool:
    """Whether Triton runs its CPU interpreter, read as Triton reads `TRITON_INTERPRET` now ('1', 'true', 'yes', 'on' in
    any case: `triton.knobs.runtime.interpret`), so that moe-lit and Triton never disagree about it. Asking does not
    import Triton: its own `@jit` helpers take the setting when it is imported, so the answer must not fix it early.
    Raises nothing: an unrecognised value means False, as it does for Triton."""
    import sys
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is None: return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")
    return bool(knobs.runtime.interpret)

def triton_imported_interpreting() -> bool | None:
    """Whether Triton's own `@jit` helpers were built for the interpreter (the setting when Triton was imported); None
    before. Raises nothing. Source: moe-lit's own (reads whether `triton.language.standard.sum` is Triton's
    `InterpretedFunction`)."""
    import sys
    std = sys.modules.get("triton.language.standard")
    return None if std is None else type(getattr(std, "sum", None)).__name__ == "InterpretedFunction"

def default_device() -> str:
    """Where kernel tensors live by default: `'cuda'` with a GPU and without Triton's interpreter
    (`TRITON_INTERPRET=1`), else `'cpu'`. Raises nothing. Source: moe-lit's own."""
    return "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"

# %%
#| hide
import tempfile

# %%
#| test read_json_object_and_interpreter
with tempfile.TemporaryDirectory() as d:                # a key given twice: refused, nested objects too
    p = Path(d) / "config.json"
    for text, msg in (('{"hidden_size": 64, "top_k": 2, "hidden_size": 128}', "duplicate keys ['hidden_size', 'hidden_size']"),
                      ('{"text_config": {"a": 1, "a": 2}}', "duplicate keys ['a', 'a']"), ("[1]", "expected a JSON object"),
                      ("{oops", "expected valid JSON"), (b"\xff", "UnicodeDecodeError")):
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        test_fail(lambda: read_json_object(p, "checkpoint_dir"), contains=f"checkpoint_dir: expected")
        test_fail(lambda: read_json_object(p, "checkpoint_dir"), contains=msg)
    p.write_text('{"8": 1, "08": 2}')
    test_eq(read_json_object(p, "t"), {"8": 1, "08": 2})
    test_fail(lambda: read_json_object(p, "t", same_key=lambda k: k.lstrip("0")), contains="duplicate keys ['8', '08']")
    test_fail(lambda: read_json_object(d, "t"), contains="t: expected valid JSON in")           # a directory
    p.write_text("[" * 100_000 + "]" * 100_000)                                                 # nested past the stack
    test_fail(lambda: read_json_object(p, "t"), contains="t: expected valid JSON in")
    os.mkfifo(Path(d) / "pipe")                                                                 # would block forever
    test_fail(lambda: read_json_object(Path(d) / "pipe", "t"), contains="t: expected a regular file at")
saved = os.environ.get("TRITON_INTERPRET")
try:                                                    # as Triton reads it: 'true' runs the interpreter as '1' does
    for v, on in (("1", True), ("true", True), ("On", True), ("0", False), ("", False)):
        os.environ["TRITON_INTERPRET"] = v; test_eq(triton_interpreting(), on)
finally:
    if saved is None: os.environ.pop("TRITON_INTERPRET", None)
    else: os.environ["TRITON_INTERPRET"] = saved

# %%
#| test check_finite
test_eq(check_finite("w", torch.ones(2)).shape, (2,))
test_fail(lambda: check_finite("w13", torch.tensor([[1.0, float("nan")]])), contains="w13: expected finite values, got nan at [0, 1]")
for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):        # the one-reduction path, each sign
    for v in (float("inf"), -float("inf"), float("nan")):
        test_fail(lambda: check_finite("w", torch.tensor([0.5, v, -2.0]).to(dt)), contains=f"w: expected finite values, got {v}")
test_eq(check_finite("ids", torch.tensor([3, -1])).tolist(), [3, -1])            # integers are finite
test_fail(lambda: check_finite("bias", torch.zeros(3, device="meta")), contains="bias: expected a tensor with values to check, got a meta tensor")

# %% [markdown]
# ## Progress
#
# Long work — the ranks of an emulated deployment, benchmark scenarios, tuning candidates — shows a progress bar from
# `tqdm` (the `progress` extra) on a terminal; without `tqdm`, or when `MOE_LIT_PROGRESS=0`, it runs silently.

# %%
#| export
def progress(iterable, desc: str = "", total: int | None = None):
    """`iterable` wrapped in a tqdm progress bar on stderr when tqdm is installed and progress is on; else as is.
    Raises nothing of its own (`MOE_LIT_PROGRESS=0` or no tqdm: `iterable` is returned unchecked). Source: moe-lit's
    own wrapper of `tqdm.auto.tqdm`."""
    import os, sys
    if os.environ.get("MOE_LIT_PROGRESS", "1") == "0": return iterable
    try: from tqdm.auto import tqdm
    except ImportError: return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, disable=not sys.stderr.isatty())

# %%
#| test progress_passthrough
test_eq(list(progress(range(3), "ranks")), [0, 1, 2])
