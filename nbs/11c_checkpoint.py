# %%
#| default_exp checkpoint

# %% [markdown]
# # Checkpoint weights
# > One MoE layer of a Hugging Face checkpoint directory as a weight source: each family's key layout as data, converted to moe-lit's layout, a rank reading only its own experts' bytes, pre-quantized codes loaded as stored.

# %%
#| export
from __future__ import annotations
import json, threading
from collections import Counter
from pathlib import Path
import torch
from fastcore.basics import patch
from safetensors import safe_open, SafetensorError
from moe_lit.terms import check_int, read_json_object
from moe_lit.config import ParallelConfig
from moe_lit.models import moe_config_from_hf
from moe_lit.layouts import checkpoint_layout, moe_layer_indices, moe_layer_rule, quant_scheme_from_hf
from moe_lit.weights import WeightSource, check_expert_ids
from moe_lit.quant import dequantize_fp8, dequantize_mxfp4, fp8_nan_codes, quant_scheme_name
from moe_lit.formats import gate_up_from_interleaved

# %%
#| hide
import pickle, tempfile
from concurrent.futures import ThreadPoolExecutor
from unittest import mock
from fastcore.test import test_eq, test_fail
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Llama4Config, Llama4ForConditionalGeneration
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
import moe_lit.checkpoint as checkpoint_module
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.testing import write_fp8_block_checkpoint, write_mxfp4_checkpoint, tiny_hf_model

# %% [markdown]
# In this notebook: `CheckpointWeights`, the `WeightSource` of `11a_weights` for one MoE layer of a checkpoint
# directory. Where each family keeps that layer's tensors (`LAYOUTS`), which decoder layers are MoE
# (`moe_layer_indices`) and which scheme a quantized checkpoint names (`quant_scheme_from_hf`) are the tables of
# `11b_layouts`. A **reference** page; *Using it*, after the class, shows the calls a user makes, and
# `FusedMoE.from_pretrained(checkpoint_dir, layer_index)` (`12_layer`) builds a layer from this source in one call.
# The families read are `11b_layouts`' `LAYOUTS`: Mixtral, MiniMax-M2, Qwen2-MoE, Qwen3-MoE, Qwen3-Next,
# DeepSeek-V2 and V3, GLM-4-MoE, gpt-oss and Llama-4.
#
# `CheckpointWeights(checkpoint_dir, layer_index, parallel=None, dtype=None)` reads `config.json` (through
# `moe_config_from_hf`) and the safetensors files of `checkpoint_dir`: one `model.safetensors`, or several shards
# listed by `model.safetensors.index.json` (its `weight_map`). Where a directory holds both (`save_pretrained` into a
# directory that held the other kind leaves the old file there) the single file is read, as transformers'
# `from_pretrained` does, so the two load the same weights. Every tensor of the layer is
# checked — present, of the shape and dtype the config implies — at construction, from the files' headers alone;
# no weight is read until asked for, and what only the values can show (NaN FP8 codes, scales not > 0, the FP8 block
# rule for a per-expert checkpoint's rows) is checked when they are read. `dtype` is the layer's (`config.dtype`;
# None: config.json's `torch_dtype`): float tensors come back as stored, the layer built from the source casts them,
# and dequantized experts (`experts` of a quantized checkpoint) come in it. It then answers the protocol in moe-lit's layout (`[out, in]` matrices, `w13` = gate rows
# then up rows), whatever layout the checkpoint uses:
#
# - `router()`, `shared()`: the router (+ its bias, the correction bias) and the shared expert (+ its gate);
# - `experts(ids)`: the experts `ids` only — per-expert keys of other experts are never opened, fused `[E, …]`
#   tensors are sliced to the rows of `ids`;
# - `quantized_experts(ids, scheme)`: for a pre-quantized checkpoint (`quant_scheme` = `'fp8_w8a8_block'` or
#   `'mxfp4_w4a16'`), the stored codes and scales of `ids`, bit for bit; `experts(ids)` gives their dequantized
#   floats instead, in the config's dtype. Float checkpoints return tensors in the dtype they are stored in.
#
# > Files are opened per call: each method opens the shards it needs with `safe_open(..., framework="pt")`, reads
# > through `get_slice` and drops the handles when it returns (handles are kept per thread, so threads may call one
# > source at once). A source therefore holds no file handle between calls (it can be pickled and sent to another
# > process), and opening a file costs one header parse, small next to the
# > megabytes of weights a call reads. `get_slice(key)[a:b]` reads only rows `a:b` of a tensor — the safetensors
# > documentation's "loading only part of the tensors" ([huggingface.co/docs/safetensors](https://huggingface.co/docs/safetensors/index)).

# %% [markdown]
# ## Reading shards lazily

# %%
#| export
def _weight_map(root: Path) -> dict[str, str]:
    "key -> shard file name: every key of model.safetensors when the directory has one (transformers' order), else the index's `weight_map`."
    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    if single.is_file():
        with _safe_open(single) as f: return dict.fromkeys(f.keys(), single.name)
    if index.is_file():
        wm = read_json_object(index, "checkpoint_dir").get("weight_map")      # a key twice: refused, not the last kept
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"checkpoint_dir: expected a 'weight_map' object of key -> file in {index}, got {wm!r:.80}")
        for key, file in wm.items():                     # shards sit beside the index (as transformers writes them)
            if not file or Path(file).name != file or file in (".", ".."):
                raise ValueError(f"checkpoint_dir: expected weight_map file names in the checkpoint directory, got "
                                 f"{file!r} for {key!r} in {index}")
        return wm
    raise ValueError(f"checkpoint_dir: expected model.safetensors or model.safetensors.index.json in '{root}', got neither")

# %%
#| export
def _unreadable(file: Path, error: Exception) -> ValueError:
    return ValueError(f"checkpoint: expected a readable safetensors file {file}, got {type(error).__name__}: {error}")

def _safe_open(file: Path):
    "`safe_open(file)`; a file that is no safetensors file (garbage, truncated, zeroed, JSON...) is a ValueError."
    try: return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e: raise _unreadable(file, e) from None

# %%
#| export
class _Shards:
    "A checkpoint's key -> shard file map; inside `with`, tensors (or row ranges of them) are read through safe_open."
    def __init__(self, root: Path): self.root, self.weight_map, self._open = root, _weight_map(root), {}

    def __contains__(self, key: str) -> bool: return key in self.weight_map
    def __enter__(self): self._open[threading.get_ident()] = {}; return self     # one call's handles, per thread
    def __exit__(self, *exc): self._open.pop(threading.get_ident(), None)        # dropping them closes the files

    def _slice(self, key: str):
        if key not in self.weight_map: raise ValueError(f"checkpoint: expected key {key!r} in {self.root}, got none")
        file, handles = self.weight_map[key], self._open[threading.get_ident()]
        if file not in handles:
            if not (self.root / file).is_file():
                raise ValueError(f"checkpoint: expected the shard file '{file}' (holding {key!r}) in {self.root}, got none")
            handles[file] = _safe_open(self.root / file)
        h = handles[file]
        try: return h.get_slice(key)
        except (SafetensorError, OSError) as e:
            if key not in h.keys():
                raise ValueError(f"checkpoint: expected key {key!r} in the shard file '{file}' (where the index's "
                                 f"weight_map puts it), got none") from None
            raise _unreadable(self.root / file, e) from None

    def meta(self, key: str) -> tuple[list, str]: sl = self._slice(key); return list(sl.get_shape()), sl.get_dtype()

    def read(self, key: str, rows: tuple | None = None) -> torch.Tensor:
        "The tensor `key`, or only its rows `rows[0]:rows[1]` along dim 0 (only those bytes are read)."
        sl = self._slice(key)
        try: return sl[rows[0]:rows[1]] if rows is not None else sl[:]
        except (SafetensorError, OSError) as e: raise _unreadable(self.root / self.weight_map[key], e) from None

# %%
#| export
def _runs(ids: list[int]) -> list[tuple[int, int]]:
    "`ids` as (start, stop) runs of consecutive ids, in order: [3, 4, 7, 2] -> [(3, 5), (7, 8), (2, 3)]."
    runs = []
    for g in ids:
        if runs and runs[-1][1] == g: runs[-1] = (runs[-1][0], g + 1)
        else: runs.append((g, g + 1))
    return runs

# %%
#| test runs
runs = checkpoint_module._runs
test_eq(runs([3, 4, 7, 2]), [(3, 5), (7, 8), (2, 3)])
test_eq(runs([]), [])

# %% [markdown]
# ## CheckpointWeights
#
# Construction resolves everything that can be wrong before any weight is read: the directory and its
# `config.json`, the MoE config (`moe_config_from_hf`, so a dense model is refused there), the family's layout, the
# layer (one of `moe_layer_indices`), the quantization scheme and which expert layout the files use — fused when
# `P + "experts.gate_up_proj"` (or its `_blocks`) is a key, per-expert when `P + "experts.0.<gate>.weight"` is —
# and then every key the layer needs, with its shape, from the shard headers (and no expert past the config's: a
# per-expert key for an expert at or past `num_experts` means the config does not describe the weights). A float weight stored
# beside FP8 block scales (`weight_scale_inv`) is refused: it would be read unscaled.

# %%
#| export
class CheckpointWeights(WeightSource):
    """One MoE layer of a Hugging Face checkpoint directory (config.json + safetensors), served in moe-lit's layout.
    Construction reads config.json and the safetensors headers only. ValueError naming `checkpoint_dir` (not a path,
    no directory, no config.json or safetensors), `layer_index` (not an int, not an MoE layer), `dtype` or `parallel`
    (MoEConfig's checks), a config.json key (`config.json ...`: model_type, sizes, quantization_config), or
    `checkpoint` (a key missing, of the wrong shape or dtype, an unreadable shard). Source: Hugging Face's safetensors checkpoints as transformers saves them
    (`11b_layouts`), served in vLLM's FusedMoE layout (`w13` gate rows then up rows)."""
    def __init__(self, checkpoint_dir: str | Path,                # a directory holding config.json and safetensors
                 layer_index: int,                               # the decoder layer, one of moe_layer_indices
                 parallel: ParallelConfig | None = None,         # deployment; None = single device
                 dtype: torch.dtype | None = None):              # the layer's dtype (config.dtype); None = torch_dtype
        root, raw = _read_checkpoint_dir(checkpoint_dir)
        self.config = moe_config_from_hf(root, parallel, dtype)
        self.model_type, self.layout = checkpoint_layout(raw)
        check_int("layer_index", layer_index)           # 1.0 == 1 and True == 1: refused before the membership test
        layers = moe_layer_indices(raw)
        if layer_index not in layers:
            raise ValueError(f"layer_index: expected one of the MoE layers {layers} ({moe_layer_rule(raw)}), "
                             f"got {layer_index!r}")
        self.checkpoint_dir, self.layer_index = root, layer_index
        self._scheme, self.block_shape = quant_scheme_from_hf(raw)
        self._shards = _Shards(root)
        self.prefix = self._find_prefix()
        self.fused, self.quant_scheme = self._detect_experts()
        with self._shards: self._check_keys()

    @property
    def description(self) -> str:
        "One line for reports: where the weights come from. Raises nothing. Source: moe-lit's own."
        return (f"checkpoint {self.checkpoint_dir}, layer {self.layer_index} ({self.model_type}, "
                f"{'fused' if self.fused else 'per-expert'} experts, {self.quant_scheme or 'float'} weights)")

    def __repr__(self): return f"CheckpointWeights({self.description})"

# %%
#| export
def _read_checkpoint_dir(checkpoint_dir) -> tuple[Path, dict]:
    "(`checkpoint_dir` as a Path, its config.json as a dict), or ValueError naming `checkpoint_dir`."
    if not isinstance(checkpoint_dir, (str, Path)):
        raise ValueError(f"checkpoint_dir: expected a directory path, got {type(checkpoint_dir).__name__}")
    root = Path(checkpoint_dir)
    if not root.is_dir(): raise ValueError(f"checkpoint_dir: expected a directory, got '{checkpoint_dir}'")
    if not (root / "config.json").is_file():
        raise ValueError(f"checkpoint_dir: expected a config.json in '{checkpoint_dir}', got none")
    return root, read_json_object(root / "config.json", "checkpoint_dir")

# %% [markdown]
# #### Key names and expected shapes
#
# One function names every key of a tensor in the layout the files use (`_expert_key`, with the fused layout's names in
# `_FUSED` and the layer's prefix from `_find_prefix`), another gives the shape each must have (`_key_shapes`): the construction check and the readers share them, so a key cannot be read under one name
# and checked under another.

# %%
#| export
_FUSED = {"w13": "experts.gate_up_proj", "w2": "experts.down_proj",
          "w13_bias": "experts.gate_up_proj_bias", "w2_bias": "experts.down_proj_bias"}

@patch
def _expert_key(self: CheckpointWeights, which: str, expert: int | None = None, part: str = "weight") -> str:
    "Key of `which` in ('gate', 'up', 'down') of one expert (per-expert layout); part 'weight' or 'bias'."
    names = dict(zip(("gate", "up", "down"), self.layout.per_expert or ("gate_proj", "up_proj", "down_proj")))
    return f"{self.prefix}experts.{expert}.{names[which]}.{part}"

@patch
def _find_prefix(self: CheckpointWeights) -> str:
    "The first of the layout's prefixes (for this layer) under which the router key is present."
    cands = [p.format(N=self.layer_index) for p in self.layout.prefixes]
    for p in cands:
        if p + self.layout.router in self._shards: return p
    raise ValueError(f"checkpoint: expected key {cands[0] + self.layout.router!r} in {self._shards.root}, got none"
                     + (f" (nor under {cands[1:]})" if len(cands) > 1 else ""))


# %%
#| export
@patch
def _detect_experts(self: CheckpointWeights) -> tuple[bool, str | None]:
    "(fused?, quant_scheme) from the keys present: fused / per-expert, and whether the experts are stored quantized."
    s, fused_key = self._shards, self.prefix + _FUSED["w13"]
    if fused_key + "_blocks" in s:
        if self._scheme != "mxfp4_w4a16":
            raise ValueError(f"config.json quantization_config.quant_method: expected 'mxfp4' for the key "
                             f"{fused_key + '_blocks'!r}, got {self._scheme!r}")
        return True, self._scheme
    if fused_key in s: fused, key = True, fused_key
    elif self._expert_key("gate", 0) in s: fused, key = False, self._expert_key("gate", 0)
    else:
        raise ValueError(f"checkpoint: expected key {fused_key!r} or {self._expert_key('gate', 0)!r} in "
                         f"{self._shards.root}, got none")
    with s: stored = s.meta(key)[1]
    if stored != "F8_E4M3": return fused, None
    if self._scheme != "fp8_w8a8_block":
        raise ValueError(f"config.json quantization_config.quant_method: expected 'fp8' for the float8 key {key!r}, "
                         f"got {self._scheme!r}")
    if fused and self.layout.fused_transposed:
        raise ValueError(f"checkpoint: expected FP8 experts [out, in] oriented, got the transposed fused layout of "
                         f"{self.model_type!r} ({key!r})")
    return fused, self._scheme


# %%
#| export
@patch
def _key_shapes(self: CheckpointWeights) -> dict[str, tuple]:
    "Every key of this layer -> the shape it must have (floats; FP8 weights share their float shape)."
    c, p, L = self.config, self.prefix, self.layout
    E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
    out = {p + L.router: (E, H)}
    if c.has_router_bias: out[p + self._need(L.router_bias, "router bias")] = (E,)
    if c.has_correction_bias: out[p + self._need(L.correction_bias, "correction bias")] = (E,)
    if self.quant_scheme == "mxfp4_w4a16":
        for w, (N, K) in (("w13", (2 * I, H)), ("w2", (H, I))):
            out[p + _FUSED[w] + "_blocks"], out[p + _FUSED[w] + "_scales"] = (E, N, -(-K // 32), 16), (E, N, -(-K // 32))
    elif self.fused:
        t = self.layout.fused_transposed
        out[p + _FUSED["w13"]], out[p + _FUSED["w2"]] = ((E, H, 2 * I), (E, I, H)) if t else ((E, 2 * I, H), (E, H, I))
    else:
        for e in range(E):
            out.update({self._expert_key("gate", e): (I, H), self._expert_key("up", e): (I, H),
                        self._expert_key("down", e): (H, I)})
    if c.has_expert_bias:
        if self.fused: out.update({p + _FUSED["w13_bias"]: (E, 2 * I), p + _FUSED["w2_bias"]: (E, H)})
        else:
            for e in range(E):
                out.update({self._expert_key(w, e, "bias"): (I if w != "down" else H,) for w in ("gate", "up", "down")})
    return {**out, **self._shared_key_shapes()}

# %%
#| export
@patch
def _shared_key_shapes(self: CheckpointWeights) -> dict[str, tuple]:
    "Keys and shapes of the shared expert (and its gate); empty without shared experts."
    c, L = self.config, self.layout
    if not c.num_shared_experts: return {}
    H, i_s = c.hidden_size, c.shared_intermediate_size or c.num_shared_experts * c.intermediate_size
    s = self.prefix + self._need(L.shared, "shared expert")
    out = {s + "gate_proj.weight": (i_s, H), s + "up_proj.weight": (i_s, H), s + "down_proj.weight": (H, i_s)}
    if c.shared_expert_gate: out[self.prefix + self._need(L.shared_gate, "shared expert gate")] = (1, H)
    return out

@patch
def _need(self: CheckpointWeights, name: str | None, what: str) -> str:
    "`name`, or ValueError when the config asks for a tensor the family's layout has no key for."
    if name is None:
        raise ValueError(f"config.json: the config has a {what}, but the {self.model_type!r} key layout has none")
    return name


# %%
#| export
def _scale_shape(shape: tuple, block: tuple) -> tuple:
    "Shape of the FP8 block scales of a weight `[..., N, K]` (ceil-div: partial blocks have a scale too)."
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")    # safetensors dtype names of the float tensors moe-lit reads

@patch
def _weight_groups(self: CheckpointWeights) -> list[list[str]]:
    "The weight-matrix keys read and stacked together (the routed experts', the shared expert's): one dtype each."
    p, routed = self.prefix, []
    if self.quant_scheme != "mxfp4_w4a16":
        if self.fused: routed = [p + _FUSED["w13"], p + _FUSED["w2"]]
        else: routed = [self._expert_key(w, e) for e in range(self.config.num_experts) for w in ("gate", "up", "down")]
    shared = [k for k in self._shared_key_shapes() if k.endswith("_proj.weight")]
    return [g for g in (routed, shared) if g]

def _check_dtype(key: str, dtype: str, want: tuple, what: str):
    if dtype not in want:
        raise ValueError(f"checkpoint: expected key {key!r} of dtype {' or '.join(want)} ({what}), got {dtype}")

@patch
def _check_keys(self: CheckpointWeights):
    "Every key of the layer is present with its shape and dtype (and, when float8, its weight_scale_inv), from the headers."
    router, c = self.prefix + self.layout.router, self.config      # first, alone: it sizes the per-expert key list
    got = self._shards.meta(router)[0]
    if tuple(got) != (c.num_experts, c.hidden_size):
        raise ValueError(f"checkpoint: expected key {router!r} of shape {[c.num_experts, c.hidden_size]} (config.json's "
                         f"experts × hidden size), got {got}")
    if not self.fused and self.quant_scheme != "mxfp4_w4a16":   # any expert past the config's, not only the next
        head = f"{self.prefix}experts."
        past = sorted({int(e) for k in self._shards.weight_map if k.startswith(head)
                       and (e := k[len(head):].split(".", 1)[0]).isdigit() and int(e) >= c.num_experts})
        if past:
            raise ValueError(f"checkpoint: expected experts 0..{c.num_experts - 1} (config.json's {c.num_experts} "
                             f"experts), got keys of expert{'s' * (len(past) > 1)} {past[:8]}"
                             f"{' ...' * (len(past) > 8)} under {head!r} too: the config does not describe these weights")
    shapes, dtypes = self._key_shapes(), {}
    for key, want in shapes.items():
        got, dtypes[key] = self._shards.meta(key)
        if tuple(got) != tuple(want):
            raise ValueError(f"checkpoint: expected key {key!r} of shape {list(want)}, got {got}")
    for group in self._weight_groups():                # one dtype a group: a stack never mixes FP8 codes and floats
        common = Counter(dtypes[k] for k in group).most_common(1)[0][0]   # the odd key out is named, not its sibling
        ref = next(k for k in group if dtypes[k] == common)               # (ties: the first key's dtype)
        _check_dtype(ref, common, ("F8_E4M3", *_FLOAT_DTYPES), "FP8 e4m3 codes or floats")
        for key in group:
            if dtypes[key] != common:
                raise ValueError(f"checkpoint: expected key {key!r} of dtype {common} (as {ref!r}, like most keys "
                                 f"of its stack), got {dtypes[key]}")
    for key, dtype in dtypes.items():
        if key.endswith(("_blocks", "_scales")) and self.quant_scheme == "mxfp4_w4a16":
            _check_dtype(key, dtype, ("U8",), "MXFP4 codes and e8m0 scales")
        elif dtype != "F8_E4M3":
            _check_dtype(key, dtype, _FLOAT_DTYPES, "floats")
            if key + "_scale_inv" in self._shards:      # floats beside block scales would be read unscaled: refused
                raise ValueError(f"checkpoint: expected key {key!r} of dtype F8_E4M3 beside its scales "
                                 f"{key + '_scale_inv'!r} (FP8 block codes), got {dtype}")
        else:
            if self.block_shape is None or self._scheme != "fp8_w8a8_block":
                raise ValueError(f"config.json quantization_config: expected quant_method 'fp8' for the float8 key "
                                 f"{key!r}, got {self._scheme!r}")
            sgot, sdtype = self._shards.meta(key + "_scale_inv")
            want = _scale_shape(shapes[key], self.block_shape)
            if tuple(sgot) != want:
                raise ValueError(f"checkpoint: expected key {key + '_scale_inv'!r} of shape {list(want)}, got {sgot}")
            _check_dtype(key + "_scale_inv", sdtype, ("F32",), "FP8 block scales")
            shapes = {**shapes, key + "_scale_inv": want}
    self._shapes = {k: tuple(v) for k, v in shapes.items()}   # what every later read is held to (files can change)


# %% [markdown]
# #### Reading and converting
#
# `_read` returns a float tensor whatever the storage: an FP8 weight is dequantized with its `weight_scale_inv`
# (`code · scale` per block, DeepSeek-V3's definition) into the config's dtype. Fused tensors are read run by run of
# consecutive expert ids, so `[3, 4, 7]` reads rows `3:5` and `7:8` and nothing else.

# %%
#| export
@patch
def _read(self: CheckpointWeights, key: str, rows: tuple | None = None) -> torch.Tensor:
    "Tensor `key` (rows `rows` of dim 0 when given) as floats: FP8 weights dequantized with their block scales."
    t = self._read_raw(key, rows)
    if t.dtype != torch.float8_e4m3fn: return t
    s = self._read_raw(key + "_scale_inv", rows)
    return dequantize_fp8(t, s, "block", self.block_shape, dtype=self.config.dtype)

@patch
def _read_raw(self: CheckpointWeights, key: str, rows: tuple | None = None) -> torch.Tensor:
    "Tensor `key` (rows `rows`) as stored; quantization scales and FP8 codes are checked (a bad one would give NaN or wrong weights)."
    t = self._shards.read(key, rows)
    want = self._shapes.get(key)                       # as checked at construction: a file rewritten since is named
    if want is not None and tuple(t.shape) != (want if rows is None else (rows[1] - rows[0], *want[1:])):
        raise ValueError(f"checkpoint: expected key {key!r} of shape {list(want)} (as when this source was made), got "
                         f"{list(self._shards.meta(key)[0])}: the file changed")
    if key.endswith("_scale_inv"): bad, want = ~(torch.isfinite(t) & (t > 0)), "finite FP8 block scales > 0"
    elif key.endswith("_scales"): bad, want = t == 255, "e8m0 scale bytes other than 255 (NaN)"
    elif t.dtype == torch.float8_e4m3fn: bad, want = fp8_nan_codes(t), "FP8 e4m3 codes, none NaN (0x7F/0xFF)"
    else: return t
    if bool(bad.any()):
        at = [int(i) for i in bad.nonzero()[0]]
        if rows is not None: at[0] += rows[0]          # the index in the stored tensor
        raise ValueError(f"checkpoint: expected key {key!r} to hold {want}, got {t[bad][0].item()} at index {at}")
    return t

@patch
def _read_experts(self: CheckpointWeights, key: str, ids: list[int], raw: bool = False) -> torch.Tensor:
    "Rows `ids` of a fused `[E, ...]` tensor, read run by run; `raw` keeps stored codes (no dequantization)."
    get = self._read_raw if raw else self._read
    parts = [get(key, run) for run in _runs(ids)]
    return torch.cat(parts) if parts else get(key, (0, 0))

# %%
#| export
@patch
def router(self: CheckpointWeights) -> dict[str, torch.Tensor]:
    """`gate [E, H]`, and `gate_bias [E]` / `e_score_correction_bias [E]` when the config has them, as stored (FP8 keys
    dequantized). ValueError naming `checkpoint` when a shard has become unreadable or a key is gone since
    construction. Source: the family's router keys (`11b_layouts`), e.g. transformers' `gate.weight`."""
    c, p, L = self.config, self.prefix, self.layout
    with self._shards:
        out = {"gate": self._read(p + L.router)}
        if c.has_router_bias: out["gate_bias"] = self._read(p + L.router_bias)
        if c.has_correction_bias: out["e_score_correction_bias"] = self._read(p + L.correction_bias)
    return out

@patch
def shared(self: CheckpointWeights) -> dict[str, torch.Tensor] | None:
    """The shared expert: `w13 [2·I_s, H]` (gate rows then up rows), `w2 [H, I_s]` (+ `gate [1, H]`); None without one.
    ValueError naming `checkpoint` for an unreadable shard, or FP8 codes or scales that are NaN or not > 0. Source:
    the family's `shared_experts.` / `shared_expert.` keys (`11b_layouts`), stacked as vLLM's `w13`."""
    c = self.config
    if not c.num_shared_experts: return None
    s = self.prefix + self.layout.shared
    with self._shards:
        out = {"w13": torch.cat([self._read(s + "gate_proj.weight"), self._read(s + "up_proj.weight")]),
               "w2": self._read(s + "down_proj.weight")}
        if c.shared_expert_gate: out["gate"] = self._read(self.prefix + self.layout.shared_gate)
    return out


# %%
#| export
@patch
def _fused_experts(self: CheckpointWeights, ids: list[int]) -> dict[str, torch.Tensor]:
    "w13 / w2 (+ biases) of `ids` from the fused tensors, converted to [n, 2·I, H] gate-then-up and [n, H, I]."
    c, p, L = self.config, self.prefix, self.layout
    if self.quant_scheme == "mxfp4_w4a16":                  # [out, in]: dequantize, crop K padding
        w13, w2 = (self._dequantized_mxfp4(w, ids) for w in ("w13", "w2"))
    else:
        w13, w2 = self._read_experts(p + _FUSED["w13"], ids), self._read_experts(p + _FUSED["w2"], ids)
        if L.fused_transposed: w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    out = {"w13": gate_up_from_interleaved(w13) if L.interleaved else w13, "w2": w2}
    if c.has_expert_bias:
        b13 = self._read_experts(p + _FUSED["w13_bias"], ids)
        out.update(w13_bias=gate_up_from_interleaved(b13) if L.interleaved else b13,
                   w2_bias=self._read_experts(p + _FUSED["w2_bias"], ids))
    return {k: v.contiguous() for k, v in out.items()}


# %%
#| export
@patch
def _mxfp4_parts(self: CheckpointWeights, which: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    "(packed codes [n, N, K/2] uint8, scales [n, N, K/32] uint8) of `ids`, rows as stored (gpt-oss: interleaved)."
    key = self.prefix + _FUSED[which]
    blocks, scales = self._read_experts(key + "_blocks", ids, raw=True), self._read_experts(key + "_scales", ids, raw=True)
    return blocks.flatten(2), scales                       # [n, N, K/32, 16] -> [n, N, K/2]

@patch
def _dequantized_mxfp4(self: CheckpointWeights, which: str, ids: list[int]) -> torch.Tensor:
    "`[n, N, K]` floats (config dtype) of the MXFP4 weight `which` of `ids`, rows as stored."
    K = self.config.hidden_size if which == "w13" else self.config.intermediate_size
    codes, scales = self._mxfp4_parts(which, ids)
    return dequantize_mxfp4(codes, scales, self.config.dtype)[..., :K]


# %%
#| export
@patch
def _per_expert(self: CheckpointWeights, ids: list[int]) -> dict[str, torch.Tensor]:
    "w13 / w2 (+ biases) of `ids` from per-expert keys: only the keys of experts `ids` are opened."
    c, I, H, k = self.config, self.config.intermediate_size, self.config.hidden_size, self._expert_key
    if not ids:                                      # no experts: empty tensors, of the dtype a read would give
        dt = self._read(k("gate", 0), (0, 0)).dtype   # zero rows: no weight bytes read
        out = {"w13": torch.empty(0, 2 * I, H, dtype=dt), "w2": torch.empty(0, H, I, dtype=dt)}
        if c.has_expert_bias: out.update(w13_bias=torch.empty(0, 2 * I, dtype=dt), w2_bias=torch.empty(0, H, dtype=dt))
        return out
    gate_up = lambda g, part: torch.cat([self._read(k("gate", g, part)), self._read(k("up", g, part))])
    out = {"w13": torch.stack([gate_up(g, "weight") for g in ids]),
           "w2": torch.stack([self._read(k("down", g)) for g in ids])}
    if c.has_expert_bias:
        out.update(w13_bias=torch.stack([gate_up(g, "bias") for g in ids]),
                   w2_bias=torch.stack([self._read(k("down", g, "bias")) for g in ids]))
    return out

@patch
def experts(self: CheckpointWeights, expert_ids) -> dict[str, torch.Tensor]:
    """Floats of the global experts `expert_ids`: `w13 [n, 2·I, H]` (gate rows then up rows), `w2 [n, H, I]` (+ biases
    `w13_bias [n, 2·I]`, `w2_bias [n, H]`), in the dtype they are stored in (a quantized checkpoint's dequantized
    experts: `config.dtype`; its biases as stored).
    ValueError naming `expert_ids` / `expert_ids[k]` (`check_expert_ids`), or `checkpoint` for an unreadable shard or
    bad stored values (NaN FP8 codes, scales not > 0, e8m0 byte 255). Source: the checkpoint layouts of `11b_layouts`
    (gpt-oss's interleaved, Llama-4's transposed fused tensors) turned into vLLM's `w13` / `w2` layout."""
    ids = check_expert_ids(expert_ids, self.config.num_experts)
    with self._shards: return self._fused_experts(ids) if self.fused else self._per_expert(ids)


# %% [markdown]
# #### Pre-quantized experts
#
# moe-lit's `QuantizedExpertWeights` (`09a_quant_weights`) keeps `w13` as `[E, 2·I, …]` codes, gate rows then up
# rows, `[out, in]` — the checkpoints' own orientation for both schemes, so only rows move and no code is touched:
#
# - **FP8 block** (per-expert keys): `w13` stacks the gate and up codes, `w13_scale` their scales. The stacked
#   scales are the scales of the stacked weight only when the gate's rows end on a block boundary, so
#   `intermediate_size` must be a multiple of the block's rows (DeepSeek-V3: 2048 = 16 × 128).
# - **MXFP4**: `_blocks [E, N, K/32, 16]` is `[E, N, K/2]` packed bytes, element `2j` in the low nibble — moe-lit's
#   packing (`pack_fp4`) and transformers' `convert_moe_packed_tensors` agree — with the scales `[E, N, K/32]`
#   as they are; gpt-oss's interleaved gate/up rows are permuted into gate rows then up rows.
#
# > `quantized_experts` imports `QuantizedExpertWeights` (`09a_quant_weights`, plain torch) where it makes one; a
# > reader of float checkpoints never imports it.

# %%
#| export
@patch
def quantized_experts(self: CheckpointWeights, expert_ids, scheme: str):
    """The stored codes and scales of `expert_ids` as a `QuantizedExpertWeights` when the checkpoint stores them in
    `scheme` (a QUANT_SCHEMES name or a short name, 'fp8'); None when it stores them otherwise, or `scheme` is None.
    FP8 block: `w13 [n, 2·I, H]` float8_e4m3fn with `w13_scale [n, ⌈2·I/bn⌉, ⌈H/bk⌉]` fp32 (`w2` likewise); MXFP4:
    `w13 [n, 2·I, H/2]` uint8 (two codes a byte) with `w13_scale [n, 2·I, H/32]` uint8 (e8m0). ValueError naming
    `scheme` for an unknown name, `expert_ids[k]` for an id outside [0, num_experts), or `checkpoint` for bad stored
    values (NaN codes, scales not > 0, e8m0 byte 255) or, for FP8 per-expert keys, an `intermediate_size` that is
    not a multiple of the block's rows. Source: the
    FP8 block (DeepSeek-V3 `weight_scale_inv`) and MXFP4 (gpt-oss `_blocks` / `_scales`, transformers'
    `convert_moe_packed_tensors`) checkpoint formats."""
    ids = check_expert_ids(expert_ids, self.config.num_experts)
    if scheme is not None: scheme = quant_scheme_name(scheme, "scheme")
    if scheme is None or scheme != self.quant_scheme: return None
    from moe_lit.quant_weights import QuantizedExpertWeights
    c, I = self.config, self.config.intermediate_size
    with self._shards:
        if scheme == "mxfp4_w4a16":
            (w13, s13), (w2, s2) = self._mxfp4_parts("w13", ids), self._mxfp4_parts("w2", ids)
            if self.layout.interleaved: w13, s13 = gate_up_from_interleaved(w13), gate_up_from_interleaved(s13)
        else:
            w13, s13, w2, s2 = self._fp8_parts(ids)
    return QuantizedExpertWeights(scheme, w13=w13.contiguous(), w13_scale=s13.contiguous(), w2=w2, w2_scale=s2,
                                  hidden_size=c.hidden_size, intermediate_size=I, block_shape=self.block_shape)


# %%
#| export
@patch
def _fp8_parts(self: CheckpointWeights, ids: list[int]) -> tuple:
    "(w13 codes, w13 scales, w2 codes, w2 scales) of `ids` as stored: FP8 codes, fp32 block scales."
    I, bn = self.config.intermediate_size, self.block_shape[0]
    if self.fused:
        key13, key2 = self.prefix + _FUSED["w13"], self.prefix + _FUSED["w2"]
        return tuple(self._read_experts(k, ids, raw=True) for k in (key13, key13 + "_scale_inv", key2, key2 + "_scale_inv"))
    if I % bn:
        raise ValueError(f"checkpoint: expected intermediate_size {I} to be a multiple of the FP8 block rows {bn} "
                         f"(gate and up scales are stacked), got {I % bn} rows left over")
    k, r = self._expert_key, self._read_raw
    parts = [[torch.cat([r(k("gate", g) + s), r(k("up", g) + s)]) for g in ids] for s in ("", "_scale_inv")]
    parts += [[r(k("down", g) + s) for g in ids] for s in ("", "_scale_inv")]
    parts = [torch.stack(p) for p in parts] if ids else [self._fp8_empty(w) for w in ("w13", "w13_scale", "w2", "w2_scale")]
    return parts[0], parts[1], parts[2], parts[3]

@patch
def _fp8_empty(self: CheckpointWeights, which: str) -> torch.Tensor:
    "An empty `[0, ...]` codes or scale tensor of `which` (no experts asked for)."
    H, I = self.config.hidden_size, self.config.intermediate_size
    shape = {"w13": (2 * I, H), "w2": (H, I)}[which.split("_")[0]]
    if which.endswith("scale"): return torch.empty(0, *_scale_shape(shape, self.block_shape))
    return torch.empty(0, *shape, dtype=torch.float8_e4m3fn)


# %% [markdown]
# ## Using it
#
# The calls a user makes on a checkpoint directory: which decoder layers are MoE, the source and what it found, and
# one rank's experts. The directory here is a tiny Qwen3-MoE that transformers itself builds and saves, standing in
# for a downloaded one; any directory `save_pretrained` wrote reads the same way.

# %%
# outside this notebook: from moe_lit.checkpoint import CheckpointWeights; from moe_lit.layouts import moe_layer_indices
#                        from moe_lit.testing import tiny_hf_model
ckpt_dir = tempfile.mkdtemp()
tiny_hf_model("qwen3_moe").save_pretrained(ckpt_dir)
layers = moe_layer_indices(ckpt_dir)                    # the decoder layers that are MoE: [0, 1]
src = CheckpointWeights(ckpt_dir, layers[0])            # config.json and the headers only
print(layers, src)
print({k: (tuple(v.shape), v.dtype) for k, v in src.experts([0, 1]).items()}, tuple(src.router()["gate"].shape))

# %% [markdown]
# ## Tests against transformers
#
# Each family's tiny model is built by transformers itself (seeded, every float tensor drawn at random so no tensor
# is the zero it was initialised to), saved with `save_pretrained` in shards of 100 KB, and read back; what
# `CheckpointWeights` returns must equal the model's own parameters, converted by the rule each modeling file
# states. In memory, transformers 5 keeps every per-expert family fused as `experts.gate_up_proj [E, 2I, H]` (gate
# rows then up rows) under `mlp.` — moe-lit's layout already — so reading the Hub's per-expert keys must give exactly
# those tensors back.

# %%
#| test per_expert_families_match_transformers
base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
            vocab_size=64, intermediate_size=48, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1)
mla = dict(n_routed_experts=6, moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16,
           q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)    # MLA: kv heads == q heads
qwen = dict(num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=24)
families = {   # model_type -> (config, in-memory correction-bias name, in-memory shared expert module)
    "mixtral":     (dict(num_local_experts=6), None, None),
    "minimax_m2":  (dict(num_local_experts=6), "e_score_correction_bias", None),
    "qwen2_moe":   (qwen, None, "shared_expert."),
    "qwen3_next":  (dict(qwen, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                         linear_value_head_dim=8), None, "shared_expert."),
    "qwen3_moe":   (dict(num_experts=6, moe_intermediate_size=16), None, None),
    "deepseek_v2": (mla, None, "shared_experts."),
    "deepseek_v3": (dict(mla, n_group=2, topk_group=1), "gate.e_score_correction_bias", "shared_experts."),
    "glm4_moe":    (dict(mla, n_shared_experts=1, n_group=1, topk_group=1), "gate.e_score_correction_bias", "shared_experts."),
}
for model_type, (kw, corr, shared) in families.items():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **kw}), dtype=torch.float32)
    sd, m, ids = model.state_dict(), "model.layers.1.mlp.", [4, 1, 2]
    with torch.no_grad(): [t.normal_() for t in sd.values() if t.is_floating_point()]
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="100KB")
        src = CheckpointWeights(d, 1)
        ex, r, sh = src.experts(ids), src.router(), src.shared()
    assert len(set(src._shards.weight_map.values())) > 1 and not src.fused and src.quant_scheme is None, model_type
    assert torch.equal(ex["w13"], sd[m + "experts.gate_up_proj"][ids]) and torch.equal(ex["w2"], sd[m + "experts.down_proj"][ids])
    test_eq(sorted(r), sorted(["gate"] + ["e_score_correction_bias"] * (corr is not None)))
    assert torch.equal(r["gate"], sd[m + "gate.weight"]) and (corr is None or torch.equal(r["e_score_correction_bias"], sd[m + corr]))
    test_eq(sh is None, shared is None)
    if shared:
        w = {p: sd[f"{m}{shared}{p}_proj.weight"] for p in ("gate", "up", "down")}
        assert torch.equal(sh["w13"], torch.cat([w["gate"], w["up"]])) and torch.equal(sh["w2"], w["down"])
        test_eq("gate" in sh, m + "shared_expert_gate.weight" in sd)
        if "gate" in sh: assert torch.equal(sh["gate"], sd[m + "shared_expert_gate.weight"])

# %% [markdown]
# The fused families keep their in-memory layout on disk: gpt-oss's `gate_up_proj [E, H, 2I]` holds gate at even
# and up at odd columns (`GptOssExperts._apply_gate`), with interleaved biases and a biased router; Llama-4's
# holds gate columns then up columns (`Llama4TextExperts.forward`). Transformers 5 can also save any family in its
# in-memory fused layout (`save_original_format=False`), under `mlp.` even for Mixtral; one directory here is one
# unsharded `model.safetensors`.

# %%
#| test fused_families_match_transformers
base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=64,
            intermediate_size=16, num_experts_per_tok=2, num_local_experts=6, bos_token_id=0, eos_token_id=1)
families = {   # model_type -> (config, save_pretrained options, in-memory prefix, router, w13 and w2 in moe-lit's layout)
    "gpt_oss": ({}, dict(max_shard_size="100KB"), "mlp.", "router.",                     # gate even / up odd columns
                lambda gu: torch.cat([gu[..., ::2], gu[..., 1::2]], -1).transpose(1, 2), lambda w: w.transpose(1, 2)),
    "llama4_text": (dict(intermediate_size_mlp=64, num_experts_per_tok=1), dict(max_shard_size="100KB"), "feed_forward.",
                    "router.", lambda gu: gu.transpose(1, 2), lambda w: w.transpose(1, 2)),  # gate columns then up
    "minimax_m2": ({}, dict(save_original_format=False), "mlp.", "gate.", lambda gu: gu, lambda w: w),   # one file
}
ids = [5, 0, 3]
for model_type, (kw, save, block, router, to_w13, to_w2) in families.items():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **kw}), dtype=torch.float32)
    sd, m = model.state_dict(), "model.layers.1." + block
    with torch.no_grad(): [t.normal_() for t in sd.values() if t.is_floating_point()]
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, **save)
        src = CheckpointWeights(d, 1)
        ex, r, sh = src.experts(ids), src.router(), src.shared()
    assert src.fused, model_type
    assert torch.equal(ex["w13"], to_w13(sd[m + "experts.gate_up_proj"][ids]))
    assert torch.equal(ex["w2"], to_w2(sd[m + "experts.down_proj"][ids])) and torch.equal(r["gate"], sd[m + router + "weight"])
    if model_type == "gpt_oss":                                         # biases: interleaved like the columns
        b = sd[m + "experts.gate_up_proj_bias"][ids]
        assert torch.equal(ex["w13_bias"], torch.cat([b[:, ::2], b[:, 1::2]], -1))
        assert torch.equal(ex["w2_bias"], sd[m + "experts.down_proj_bias"][ids]) and torch.equal(r["gate_bias"], sd[m + "router.bias"])
    if model_type == "llama4_text":
        w = {p: sd[f"{m}shared_expert.{p}_proj.weight"] for p in ("gate", "up", "down")}
        assert torch.equal(sh["w13"], torch.cat([w["gate"], w["up"]])) and torch.equal(sh["w2"], w["down"])
    if model_type == "minimax_m2": assert torch.equal(r["e_score_correction_bias"], sd[m + "e_score_correction_bias"])

# %% [markdown]
# Llama-4 with its vision tower (`model_type` `llama4`) keeps the language model under `language_model.`, and
# Maverick-style interleaving (`interleave_moe_layer_step: 2`) makes every other layer dense.

# %%
#| test llama4_multimodal_and_dense_layers
text = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=64,
            intermediate_size=16, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2)
vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32, image_size=28,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
torch.manual_seed(0)
model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision))
sd, m = model.state_dict(), "language_model.model.layers.3.feed_forward."
with torch.no_grad(): [t.normal_() for t in sd.values() if t.is_floating_point()]
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d, max_shard_size="100KB")
    test_eq(moe_layer_indices(json.load(open(f"{d}/config.json"))), [1, 3])
    src = CheckpointWeights(d, 3)
    ex, sh, r = src.experts([2, 3]), src.shared(), src.router()
    test_fail(lambda: CheckpointWeights(d, 0), contains="layer_index: expected one of the MoE layers [1, 3] (the "
              "moe_layers rule of llama4: num_hidden_layers=4, moe_layers=[1, 3], interleave_moe_layer_step=2), got 0")
    test_fail(lambda: CheckpointWeights(d, 4), contains="layer_index: expected one of the MoE layers [1, 3] (")
assert torch.equal(ex["w13"], sd[m + "experts.gate_up_proj"][[2, 3]].transpose(1, 2))
assert torch.equal(ex["w2"], sd[m + "experts.down_proj"][[2, 3]].transpose(1, 2))
assert torch.equal(sh["w2"], sd[m + "shared_expert.down_proj.weight"]) and torch.equal(r["gate"], sd[m + "router.weight"])
test_eq((src.model_type, src.config.routing_method, src.config.top_k), ("llama4", "llama4", 1))

# %% [markdown]
# ## A rank reads only its experts
#
# Every read goes through `safe_open(...).get_slice(key)[rows]`; wrapping `safe_open` records which keys and rows a
# call touches. Asking for experts `[3, 4, 1]` opens no other expert's key (per-expert layout) and reads rows
# `3:5` and `1:2` of each fused tensor — and `get_tensor`, which reads a whole tensor, is never called.

# %%
#| test reads_only_the_experts_asked_for
touched = []
class Recording:                                            # wraps a safe_open handle, logging every read
    def __init__(self, h): self.h = h
    def keys(self): return self.h.keys()
    def get_tensor(self, key): touched.append((key, "all")); return self.h.get_tensor(key)
    def get_slice(self, key):
        sl, log = self.h.get_slice(key), touched
        class Slice:
            get_shape, get_dtype = sl.get_shape, sl.get_dtype
            def __getitem__(self, idx): log.append((key, (idx.start, idx.stop))); return sl[idx]
        return Slice()
real_open = checkpoint_module.safe_open
base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=64,
            intermediate_size=16, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1)
for model_type, kw in (("qwen3_moe", dict(num_experts=8, moe_intermediate_size=16)), ("gpt_oss", dict(num_local_experts=8))):
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **base, **kw)).save_pretrained(d, max_shard_size="100KB")
        src, touched[:] = checkpoint_module.CheckpointWeights(d, 0), []   # the module's class reads the patched name
        with mock.patch.object(checkpoint_module, "safe_open", lambda *a, **k: Recording(real_open(*a, **k))):
            src.experts([3, 4, 1])
        again = pickle.loads(pickle.dumps(src))              # no open file between calls; threads may share a source
        with ThreadPoolExecutor(4) as pool: w2 = list(pool.map(lambda g: again.experts([g])["w2"], range(8)))
        assert torch.equal(torch.cat(w2), src.experts(range(8))["w2"])
    keys = {k for k, _ in touched}
    if model_type == "qwen3_moe":
        test_eq({k.split(".")[5] for k in keys}, {"3", "4", "1"})   # model.layers.0.mlp.experts.<e>.…
        test_eq(len(keys), 9); assert all(rows == (None, None) for _, rows in touched)
    else:
        test_eq({rows for _, rows in touched}, {(3, 5), (1, 2)})
        test_eq(keys, {f"model.layers.0.mlp.experts.{w}" for w in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")})

# %% [markdown]
# ## Bad input
#
# Everything the config and the files' headers can show is checked at construction (values, when read), and each
# error names what was wrong: the directory, the config, the layer, or the checkpoint's key with the shapes expected
# and found.

# %%
#| test bad_checkpoint_dirs_and_layers
cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2, "hidden_size": 32,
       "moe_intermediate_size": 16, "intermediate_size": 64, "torch_dtype": "float32", "mlp_only_layers": [0]}
P = "model.layers.1.mlp."
good = {P + "gate.weight": torch.randn(4, 32), **{f"{P}experts.{e}.{w}_proj.weight": torch.randn(32, 16) if w == "down"
                                                  else torch.randn(16, 32) for e in range(4) for w in ("gate", "up", "down")}}
def checkpoint(d, tensors=good, config=cfg, layer_index=1):   # write config.json + model.safetensors, open a layer
    json.dump(config, open(f"{d}/config.json", "w")); save_file(tensors, f"{d}/model.safetensors")
    return CheckpointWeights(d, layer_index)
with tempfile.TemporaryDirectory() as d:
    test_fail(lambda: CheckpointWeights(f"{d}/nope", 1), contains="checkpoint_dir: expected a directory, got")
    test_fail(lambda: CheckpointWeights(d, 1), contains="checkpoint_dir: expected a config.json in")
    test_fail(lambda: CheckpointWeights(3, 1), contains="checkpoint_dir: expected a directory path, got int")
    test_eq(checkpoint(d).experts([3])["w13"].shape, (1, 32, 32)); test_eq(checkpoint(d).experts([])["w2"].shape, (0, 32, 16))
    test_fail(lambda: checkpoint(d, layer_index=0), contains="layer_index: expected one of the MoE layers [1] (the")
    extra = {**good, **{k.replace("experts.3.", "experts.4."): v.clone() for k, v in good.items() if "experts.3." in k}}
    test_fail(lambda: checkpoint(d, extra), contains="checkpoint: expected experts 0..3 (config.json's 4 experts), got "
              "keys of expert [4] under 'model.layers.1.mlp.experts.' too")
    far = {**good, **{k.replace("experts.3.", "experts.9."): v.clone() for k, v in good.items() if "experts.3.down" in k}}
    test_fail(lambda: checkpoint(d, far), contains="got keys of expert [9] under")          # not only the next id
    for e in (12, 10): far.update({k.replace("experts.3.", f"experts.{e}."): v.clone() for k, v in good.items() if "experts.3.up" in k})
    test_fail(lambda: checkpoint(d, far), contains="got keys of experts [9, 10, 12] under")
    test_fail(lambda: checkpoint(d, layer_index="1"), contains="layer_index: expected an int, got str '1'")
    test_fail(lambda: checkpoint(d, layer_index=1.0), contains="layer_index: expected an int, got float 1.0")
    test_fail(lambda: checkpoint(d, layer_index=True), contains="layer_index: expected an int, got bool True")
    dense = {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    test_fail(lambda: checkpoint(d, config=dense), contains="config.json model_type: expected one of")   # named
    test_fail(lambda: checkpoint(d, config=dense), contains="got 'qwen3'")
    test_fail(lambda: checkpoint(d, config={**cfg, "model_type": "olmoe"}), contains="config.json model_type: expected one of")
    test_fail(lambda: checkpoint(d, config={**cfg, "quantization_config": {"quant_method": "awq"}}),
              contains="quantization_config.quant_method: expected one of ['fp8', 'mxfp4'], got 'awq'")
    test_fail(lambda: checkpoint(d, config={**cfg, "quantization_config": {"quant_method": ["fp8"]}}),
              contains="quantization_config.quant_method: expected one of ['fp8', 'mxfp4'], got ['fp8']")
    test_fail(lambda: checkpoint(d, config={**cfg, "quantization_config": {"quant_method": "fp8", "weight_block_size": [True, 128]}}),
              contains="quantization_config.weight_block_size: expected two positive ints (at most 65536), got [True, 128]")
    test_fail(lambda: checkpoint(d).experts([4]), contains="expert_ids[0]: expected <= 3, got 4")

# %%
#| test bad_checkpoint_keys
cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2, "hidden_size": 32,
       "moe_intermediate_size": 16, "intermediate_size": 64, "torch_dtype": "float32", "mlp_only_layers": [0]}
P = "model.layers.1.mlp."
good = {P + "gate.weight": torch.randn(4, 32), **{f"{P}experts.{e}.{w}_proj.weight": torch.randn(32, 16) if w == "down"
                                                  else torch.randn(16, 32) for e in range(4) for w in ("gate", "up", "down")}}
def checkpoint(d, tensors):
    json.dump(cfg, open(f"{d}/config.json", "w")); save_file(tensors, f"{d}/model.safetensors")
    return CheckpointWeights(d, 1)
with tempfile.TemporaryDirectory() as d:
    missing = {k: v for k, v in good.items() if k != P + "experts.2.up_proj.weight"}
    test_fail(lambda: checkpoint(d, missing), contains=f"checkpoint: expected key '{P}experts.2.up_proj.weight' in {d}, got none")
    test_fail(lambda: checkpoint(d, {k: v for k, v in good.items() if "experts" not in k}),
              contains=f"checkpoint: expected key '{P}experts.gate_up_proj' or '{P}experts.0.gate_proj.weight'")
    bad = {**good, P + "experts.1.down_proj.weight": torch.randn(16, 32)}
    test_fail(lambda: checkpoint(d, bad), contains=f"expected key '{P}experts.1.down_proj.weight' of shape [32, 16], got [16, 32]")
    test_fail(lambda: checkpoint(d, {k.replace("layers.1", "layers.0"): v for k, v in good.items()}),
              contains=f"checkpoint: expected key '{P}gate.weight' in")
    Path(f"{d}/model.safetensors").unlink()
    test_fail(lambda: CheckpointWeights(d, 1), contains="expected model.safetensors or model.safetensors.index.json")
    json.dump({"weight_map": {k: "model-00001-of-00002.safetensors" for k in good}}, open(f"{d}/model.safetensors.index.json", "w"))
    test_fail(lambda: CheckpointWeights(d, 1), contains="expected the shard file 'model-00001-of-00002.safetensors'")

# %% [markdown]
# Dtypes are checked from the headers too: float weights must be floats, FP8 codes `F8_E4M3` with `F32` scales,
# MXFP4 blocks and scales bytes, and the weights stacked together (the routed experts', the shared expert's) of one
# dtype. The scales themselves can only be checked once read: `experts` and `quantized_experts` check those of the
# experts they read (an FP8 scale must be finite and > 0, an e8m0 byte not 255, which the OCP MX format defines as NaN).
# A file that is not a safetensors file, or lacks a key its index promises, is a `ValueError` naming it.

# %%
#| helper
QWEN_CFG = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2,
            "hidden_size": 32, "moe_intermediate_size": 16, "intermediate_size": 64, "torch_dtype": "float32",
            "mlp_only_layers": [0]}                            # layer 1 is the MoE layer

def qwen_float_tensors(P: str = "model.layers.1.mlp.") -> dict:
    "Fresh random fp32 tensors of `QWEN_CFG`'s MoE layer under prefix `P`: router and four per-expert experts."
    return {P + "gate.weight": torch.randn(4, 32), **{f"{P}experts.{e}.{w}_proj.weight": torch.randn(32, 16) if w == "down"
                                                      else torch.randn(16, 32) for e in range(4) for w in ("gate", "up", "down")}}

def rewrite(d, tensors, config=None, layer_index=1):   # one model.safetensors (+ config.json) replacing what d held
    "Replace the checkpoint in `d` by one `model.safetensors` of `tensors` (and `config`), and open its layer."
    for f in Path(d).glob("model*.safetensors*"): f.unlink()
    if config is not None: json.dump(config, open(f"{d}/config.json", "w"))
    save_file(tensors, f"{d}/model.safetensors")
    return CheckpointWeights(d, layer_index)

# %%
#| test bad_checkpoint_float_dtypes
P, good = "model.layers.1.mlp.", qwen_float_tensors()
k1 = P + "experts.1.gate_proj.weight"
with tempfile.TemporaryDirectory() as d:
    for dt, name in ((torch.int32, "I32"), (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.float8_e5m2, "F8_E5M2")):
        test_fail(lambda: rewrite(d, {**good, k1: good[k1].to(dt)}, QWEN_CFG),
                  contains=f"checkpoint: expected key '{k1}' of dtype F32 (as '{P}experts.0.gate_proj.weight', like most keys of its stack), got {name}")
    k0 = P + "experts.0.gate_proj.weight"                  # the first key odd: it is named, not the sibling after it
    for dt, name in ((torch.int32, "I32"), (torch.float64, "F64")):
        test_fail(lambda: rewrite(d, {**good, k0: good[k0].to(dt)}),
                  contains=f"expected key '{k0}' of dtype F32 (as '{P}experts.0.up_proj.weight', like most keys of its stack), got {name}")
    test_fail(lambda: rewrite(d, {k: v.int() if "experts." in k else v for k, v in good.items()}),   # all of them odd
              contains=f"expected key '{k0}' of dtype F8_E4M3 or F16 or BF16 or F32 or F64 (FP8 e4m3 codes or floats), got I32")
    test_fail(lambda: rewrite(d, {**good, P + "gate.weight": good[P + "gate.weight"].int()}),
              contains=f"expected key '{P}gate.weight' of dtype F16 or BF16 or F32 or F64 (floats), got I32")

# %%
#| test bad_checkpoint_fp8_dtypes_and_scales
with tempfile.TemporaryDirectory() as d:                   # FP8 block (DeepSeek-V3 style): codes, scales
    stored = write_fp8_block_checkpoint(d, 4, 320, 128); t = stored["tensors"]
    P = "model.layers.1.mlp."
    w, sc = P + "experts.1.up_proj.weight", P + "experts.2.down_proj.weight_scale_inv"
    test_fail(lambda: rewrite(d, {**t, w: t[w].float().to(torch.float8_e5m2)}),
              contains=f"expected key '{w}' of dtype F8_E4M3 (as '{P}experts.0.gate_proj.weight', like most keys of its stack), got F8_E5M2")
    test_fail(lambda: rewrite(d, {**t, w: t[w].bfloat16()}), contains=f"expected key '{w}' of dtype F8_E4M3 (as")
    test_fail(lambda: rewrite(d, {**t, sc: t[sc].bfloat16()}), contains=f"expected key '{sc}' of dtype F32 (FP8 block scales), got BF16")
    floats = {k: v.bfloat16() if v.dtype == torch.float8_e4m3fn else v for k, v in t.items()}   # scales left beside
    test_fail(lambda: rewrite(d, floats), contains=f"checkpoint: expected key '{P}experts.0.gate_proj.weight' of dtype "
              f"F8_E4M3 beside its scales '{P}experts.0.gate_proj.weight_scale_inv' (FP8 block codes), got BF16")
    shared = {k: v.bfloat16() if "shared_experts" in k and v.dtype == torch.float8_e4m3fn else v for k, v in t.items()}
    test_fail(lambda: rewrite(d, shared), contains=f"expected key '{P}shared_experts.gate_proj.weight' of dtype F8_E4M3 beside")
    for v in (float("nan"), float("inf"), -1.0, 0.0):
        bad = t[sc].clone(); bad[0, 0] = v
        src = rewrite(d, {**t, sc: bad})
        src.experts([0]); src.quantized_experts([1, 3], "fp8_w8a8_block")          # other experts read fine
        for read in (lambda: src.experts([1, 2]), lambda: src.quantized_experts([2], "fp8_w8a8_block")):
            test_fail(read, contains=f"checkpoint: expected key '{sc}' to hold finite FP8 block scales > 0, got {v} at index [0, 0]")
    sh = P + "shared_experts.up_proj.weight_scale_inv"
    test_fail(lambda: rewrite(d, {**t, sh: -t[sh]}).shared(), contains=f"expected key '{sh}' to hold finite FP8 block scales > 0")
    nan = t[w].clone(); nan.view(torch.uint8)[5, 7] = 0xFF                # e4m3fn has one NaN pattern per sign
    src = rewrite(d, {**t, w: nan})
    src.experts([0, 2]); src.quantized_experts([3], "fp8_w8a8_block")          # other experts read fine
    for read in (lambda: src.experts([1]), lambda: src.quantized_experts([1, 2], "fp8_w8a8_block")):
        test_fail(read, contains=f"checkpoint: expected key '{w}' to hold FP8 e4m3 codes, none NaN (0x7F/0xFF), got nan at index [5, 7]")

# %%
#| test bad_checkpoint_mxfp4_scales
with tempfile.TemporaryDirectory() as d:                   # MXFP4 (gpt-oss style): e8m0 byte 255 is NaN
    t, P = write_mxfp4_checkpoint(d)["tensors"], "model.layers.0.mlp."
    s13 = P + "experts.gate_up_proj_scales"
    nan = t[s13].clone(); nan[3, 5, 1] = 255
    src = rewrite(d, {**t, s13: nan}, layer_index=0)
    src.experts([0, 1]); src.quantized_experts([2], "mxfp4_w4a16")
    for read in (lambda: src.experts([1, 3]), lambda: src.quantized_experts([3], "mxfp4_w4a16")):
        test_fail(read, contains=f"checkpoint: expected key '{s13}' to hold e8m0 scale bytes other than 255 (NaN), got 255 at index [3, 5, 1]")
    test_fail(lambda: rewrite(d, {**t, s13: t[s13].to(torch.int8)}, layer_index=0),
              contains=f"expected key '{s13}' of dtype U8 (MXFP4 codes and e8m0 scales), got I8")

# %%
#| test unreadable_checkpoint_files
P, good = "model.layers.1.mlp.", qwen_float_tensors()
with tempfile.TemporaryDirectory() as d:
    rewrite(d, good, QWEN_CFG); f = Path(f"{d}/model.safetensors"); data = f.read_bytes()
    for bad in (b"garbage" * 9, data[:-7], bytes(len(data)), b""):
        f.write_bytes(bad)
        test_fail(lambda: CheckpointWeights(d, 1), contains=f"checkpoint: expected a readable safetensors file {f}, got SafetensorError")
    f.unlink(); half = {k: v for k, v in good.items() if "experts.3" not in k}
    save_file(half, f"{d}/a.safetensors"); save_file({k: v for k, v in good.items() if k not in half}, f"{d}/b.safetensors")
    index = lambda wm: json.dump({"weight_map": wm}, open(f"{d}/model.safetensors.index.json", "w"))
    f.write_bytes(data); index({k: "a.safetensors" for k in good})   # model.safetensors and an index: the single file
    test_eq(CheckpointWeights(d, 1).router()["gate"], good[P + "gate.weight"])   # is read (transformers' order), and
    save_file({k: v + 1 for k, v in good.items()}, f"{d}/a.safetensors")         # the index's differing shard is not
    test_eq(CheckpointWeights(d, 1).router()["gate"], good[P + "gate.weight"])
    f.unlink(); save_file(half, f"{d}/a.safetensors")
    index({k: "a.safetensors" for k in good})              # the index promises keys the shard lacks
    test_fail(lambda: CheckpointWeights(d, 1), contains=f"checkpoint: expected key '{P}experts.3.gate_proj.weight' in the shard file 'a.safetensors'")
    for outside in ("../a.safetensors", "/etc/passwd", "", "sub/a.safetensors"):   # beside the index only
        index({k: outside for k in good})
        test_fail(lambda: CheckpointWeights(d, 1), contains="checkpoint_dir: expected weight_map file names in the checkpoint directory")
    index({k: "config.json" for k in good})
    test_fail(lambda: CheckpointWeights(d, 1), contains=f"checkpoint: expected a readable safetensors file {d}/config.json, got")
    index({k: "a.safetensors" if k in half else "b.safetensors" for k in good}); src = CheckpointWeights(d, 1)
    Path(f"{d}/b.safetensors").write_bytes(bytes(100))     # zeroed after construction: the read names the file
    src.experts([0, 1]); test_fail(lambda: src.experts([3]), contains=f"expected a readable safetensors file {d}/b.safetensors")
    down = f"{P}experts.3.down_proj.weight"                   # rewritten since with another shape: named, not returned
    save_file({**{k: v for k, v in good.items() if k not in half}, down: good[down][:, :8].contiguous()}, f"{d}/b.safetensors")
    test_fail(lambda: src.experts([3]), contains=f"checkpoint: expected key '{down}' of shape [32, 16] (as when this source "
                                                 f"was made), got [32, 8]: the file changed")

# %% [markdown]
# ## Pre-quantized checkpoints
#
# The two checkpoints below are written in each format's layout by `00_testing`'s `write_fp8_block_checkpoint` and
# `write_mxfp4_checkpoint`, from codes made by moe-lit's own quantizer
# (`quantize_expert_weights`); the codes read back must be those codes, bit for bit, and the floats `experts()`
# returns their dequantization. A DeepSeek-V3-style FP8 checkpoint (two shards and an index; the shared expert is
# FP8 too, the router is not):

# %%
#| test fp8_block_checkpoint
E, H, I = 4, 320, 128                                     # H = 2.5 blocks: the last block column is partial
with tempfile.TemporaryDirectory() as d:
    stored = write_fp8_block_checkpoint(d, E, H, I)
    qw, shared, gate, bias = stored["experts"], stored["shared"], stored["gate"], stored["bias"]
    src = CheckpointWeights(d, 1)
    q, ex, sh, rt = src.quantized_experts([2, 0], "fp8_w8a8_block"), src.experts([2, 0]), src.shared(), src.router()
    test_eq((src.quant_scheme, src.quantized_experts([2, 0], "mxfp4_w4a16"), src.block_shape), ("fp8_w8a8_block", None, (128, 128)))
    test_eq(src.quantized_experts([2, 0], "fp8").w13.dtype, torch.float8_e4m3fn)           # a short name is the scheme
    test_fail(lambda: src.quantized_experts([2, 0], "int3"), contains="scheme: expected one of")   # not a silent None
    test_eq((src.quantized_experts([], "fp8_w8a8_block").num_experts, src.experts([])["w13"].shape), (0, (0, 2 * I, H)))
for f in ("w13", "w2"):                                   # the stored bytes, untouched
    assert torch.equal(getattr(q, f).view(torch.uint8), getattr(qw, f)[[2, 0]].view(torch.uint8))
    assert torch.equal(getattr(q, f + "_scale"), getattr(qw, f + "_scale")[[2, 0]])
w13, w2 = qw.select([2, 0]).dequantize(torch.bfloat16)
assert torch.equal(ex["w13"], w13) and torch.equal(ex["w2"], w2) and ex["w13"].dtype == torch.bfloat16
expand = lambda s: s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :H]    # DeepSeek-V3: code · scale per block
assert torch.equal(ex["w13"][1], (qw.w13[0].float() * expand(qw.w13_scale[0])).bfloat16())
assert all(torch.equal(sh[w], v[0]) for w, v in zip(("w13", "w2"), shared.dequantize(torch.bfloat16)))
assert torch.equal(rt["gate"], gate) and torch.equal(rt["e_score_correction_bias"], bias)

# %% [markdown]
# A gpt-oss-style MXFP4 checkpoint: blocks and scales `[out, in]`, gate and up rows interleaved, biases in bf16.
# Besides moe-lit's own dequantization, the floats are checked against transformers' `convert_moe_packed_tensors`,
# which turns the same stored bytes into gpt-oss's `[E, H, 2I]` layout.

# %%
#| test mxfp4_checkpoint
E, H, I, P = 4, 96, 64, "model.layers.0.mlp."
with tempfile.TemporaryDirectory() as d:
    stored = write_mxfp4_checkpoint(d, E, H, I)
    qw, b13, b2, tensors = stored["experts"], stored["w13_bias"], stored["w2_bias"], stored["tensors"]
    src = CheckpointWeights(d, 0, dtype=torch.float32)
    q, ex = src.quantized_experts([3, 1], "mxfp4_w4a16"), src.experts([3, 1])
    test_eq((src.quant_scheme, src.quantized_experts([3, 1], "fp8_w8a8_block"), src.config.activation), ("mxfp4_w4a16", None, "swigluoai"))
    test_eq((src.quantized_experts([], "mxfp4_w4a16").num_experts, src.experts([])["w13"].shape), (0, (0, 2 * I, H)))
for f in ("w13", "w13_scale", "w2", "w2_scale"): assert torch.equal(getattr(q, f), getattr(qw, f)[[3, 1]]), f
w13, w2 = qw.select([3, 1]).dequantize(torch.float32)
assert torch.equal(ex["w13"], w13) and torch.equal(ex["w2"], w2)
assert torch.equal(ex["w13_bias"], b13[[3, 1]]) and torch.equal(ex["w2_bias"], b2[[3, 1]])
hf = convert_moe_packed_tensors(tensors[P + "experts.gate_up_proj_blocks"][[3, 1]],   # [n, H, 2I], gate at even columns
                                tensors[P + "experts.gate_up_proj_scales"][[3, 1]], dtype=torch.float32)
assert torch.equal(ex["w13"], torch.cat([hf[..., ::2], hf[..., 1::2]], -1).transpose(1, 2))
hf2 = convert_moe_packed_tensors(tensors[P + "experts.down_proj_blocks"][[3, 1]], tensors[P + "experts.down_proj_scales"][[3, 1]],
                                 dtype=torch.float32)
assert torch.equal(ex["w2"], hf2.transpose(1, 2))
