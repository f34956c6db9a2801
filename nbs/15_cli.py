# %%
#| default_exp cli

# %% [markdown]
# # Command line
# > moe-lit run builds a real model's MoE layer on a deployment and reports every decision, the load, the check against float64 and the time; moe-lit tables prints the placement tables.

# %%
#| export
from __future__ import annotations
import argparse, enum, json, math, os, re, sys, time
from pathlib import Path
from dataclasses import asdict
import torch
from moe_lit.entry import command_parser
from moe_lit.terms import check_int, check_choice, check_device, use_triton_interpreter_without_gpu, triton_interpreting
from moe_lit.config import BACKENDS, ActivationFormat, MoEConfig, ParallelConfig
from moe_lit.models import PRESETS, DEFAULT_PRESET, preset, moe_config_from_hf, preset_caveats, describe_experts
from moe_lit.oracle import DEVICES, CPU_INTERPRETER, QUANT_SCHEMES, detect_device, select_experts_backend, verdict
from moe_lit.quant import QUANT_ALIASES, quant_scheme_name
from moe_lit.routing import expert_load
from moe_lit.placement import Placement, PLACEMENT_STRATEGIES
from moe_lit.layer import run_emulated_ep, rank_config
from moe_lit.testing import check_output, check_spec_output, quantization_error
from moe_lit.report import format_report, format_sections, placement_head, placement_record

# %%
#| hide
from moe_lit import __version__
from fastcore.test import test_eq, test_fail, test_close
import io, contextlib, json, subprocess, tempfile
from unittest import mock
import moe_lit.distributed as dist_module
from pathlib import Path
from moe_lit.testing import tiny_hf_model, write_fp8_block_checkpoint
import moe_lit.cli as _cli

# %% [markdown]
# In this notebook: `build_config` (model + deployment from the command line), `all2all_note` and
# `dispatch_hidden_size` (what the backend does on that deployment), `run_report` (the main job, as full data;
# `15b_report` writes it as text), `tables_report` and `format_tables`, and `main`, the `moe-lit` entry
# point. A **how-to** page.
#
# ## From arguments to a config
#
# `--ep N` is the number of expert-parallel ranks (devices). They are deployed as vLLM deploys wide EP: `N / tp`
# data-parallel ranks of `tp` devices each with expert parallelism on, so `ParallelConfig.make` flattens them into an
# EP group of `N`. With `--tp N --ep N` (one DP rank) there is no all2all at all — TP+EP masks with `expert_map` and the
# backend's format does not apply, which the report explains.
#
# The model is a preset (`DEFAULT_PRESET` when neither is named) or a Hugging Face `config.json`, never both. Its dtype
# is the model's own — the file's `torch_dtype`, bfloat16 for every preset — unless `dtype` names another.

# %%
#| export
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def build_config(model: str | None = None,        # a preset name; None: DEFAULT_PRESET, or config_path's model
                 config_path: str | None = None,  # a Hugging Face config.json (file or directory) instead of a preset
                 ep: int = 1, tp: int = 1,        # EP ranks in all; TP size inside each DP rank
                 all2all: str | None = None,      # all2all backend; None: 'allgather_reducescatter' (vLLM's default)
                                                  # when there is more than one DP rank, else 'none'
                 dtype: str | None = None,        # 'bf16', 'fp16' or 'fp32'; None: the model's own dtype
                ) -> MoEConfig:
    """The MoE config of a preset `model` (or an HF `config_path`) deployed on `ep` EP ranks of `tp`-way TP groups.
    ValueError naming `model` (given with `config_path`), `ep` or `tp` (not an int >= 1, or `tp` not dividing `ep`),
    `dtype`, `all2all_backend` (`ParallelConfig.make`), `name` (an unknown preset), or `path_or_dict` or the file's
    key for a bad config.json (`moe_config_from_hf`). Source: vLLM's wide-EP deployment
    (`FusedMoEParallelConfig.make` flattens DP×TP into one EP group) and its default all2all backend."""
    if model is not None and config_path is not None:
        raise ValueError(f"model: expected None when config_path is given (a preset or a config.json, not both), "
                         f"got {model!r}")
    check_int("ep", ep, lo=1, hi=2**31); check_int("tp", tp, lo=1, hi=2**31)   # ranks are int32 in every table
    if ep % tp: raise ValueError(f"tp: expected a divisor of ep={ep}, got {tp} (ep counts every device, so it holds "
                                 f"whole TP groups: ep={math.lcm(ep, tp)} for tp={tp}, or another multiple of {tp})")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ValueError(f"dtype: expected one of {list(DTYPES)} or None (the model's own), got {dtype!r}")
    if all2all is None: all2all = "allgather_reducescatter" if ep // tp > 1 else "none"
    par = ParallelConfig.make(tp_size=tp, dp_size=ep // tp, enable_expert_parallel=ep > 1, all2all_backend=all2all)
    if config_path is not None: cfg = moe_config_from_hf(config_path, parallel=par)
    else: cfg = preset(DEFAULT_PRESET if model is None else model, parallel=par)
    return cfg if dtype is None else cfg.replace(dtype=DTYPES[dtype])

# %%
#| test build_config
cfg = build_config("deepseek-v3", ep=8, all2all="nixl_ep")
test_eq((cfg.num_experts, cfg.ep_size, cfg.use_batched_activation_format), (256, 8, True))
test_eq(build_config("deepseek-v3", ep=8, tp=8, all2all="nixl_ep").use_batched_activation_format, False)  # TP+EP
test_fail(lambda: build_config("nope"), contains="expected one of")
test_fail(lambda: build_config(ep=6, tp=4), contains="tp: expected a divisor of ep=6, got 4 (ep counts every device, so it holds whole TP groups: ep=12 for tp=4")
test_fail(lambda: build_config(dtype="fp8"), contains="dtype: expected one of ['bf16', 'fp16', 'fp32'] or None")
test_fail(lambda: build_config(dtype=["bf16"]), contains="dtype: expected one of ['bf16', 'fp16', 'fp32'] or None "
          "(the model's own), got ['bf16']")
test_fail(lambda: build_config(all2all="pplx", ep=2), contains="all2all_backend: expected one of")
test_fail(lambda: build_config(all2all=["none"], ep=2), contains="all2all_backend: expected one of")
test_eq(build_config().name, PRESETS[DEFAULT_PRESET].name)                       # no model named: the default preset
test_eq((build_config().dtype, build_config(dtype="fp32").dtype), (torch.bfloat16, torch.float32))
with tempfile.TemporaryDirectory() as d:                                         # the file's torch_dtype is kept ...
    f = Path(d, "config.json")
    f.write_text(json.dumps({"num_experts": 4, "num_experts_per_tok": 2, "hidden_size": 32, "intermediate_size": 16,
                             "torch_dtype": "float32"}))
    test_eq(build_config(config_path=str(f)).dtype, torch.float32)
    test_eq(build_config(config_path=str(f), dtype="fp16").dtype, torch.float16)   # ... unless dtype is given
    test_fail(lambda: build_config("deepseek-v3", config_path=str(f)),
              contains="model: expected None when config_path is given (a preset or a config.json, not both), "
                       "got 'deepseek-v3'")

# %% [markdown]
# ## What the backend does on this deployment
#
# A user names an all2all backend, but the deployment decides whether any all2all happens: one EP rank has nothing to
# dispatch, and TP+EP with one DP rank gives every rank every token and masks with `expert_map`. The report must not
# let a requested backend look as if it were used. `all2all_note` says which case holds; it reads only
# `ParallelConfig` properties and the backend's record (`moves_tokens`), never the backend's name.

# %%
#| export
def all2all_note(parallel: ParallelConfig,   # the deployment; only its properties and backend record are read
                ) -> str:                    # one sentence for reports
    """Does `parallel`'s all2all backend dispatch tokens, and if not, why not (a requested backend left unused is
    named). ValueError naming `parallel` when it is not a ParallelConfig. Source: moe-lit's own sentence over vLLM's
    `FusedMoEParallelConfig.use_all2all_kernels` and the backend record's `moves_tokens`."""
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel: expected a ParallelConfig, got {type(parallel).__name__}")
    d = parallel.backend
    if parallel.use_all2all_kernels:
        return (f"backend {d.name!r} dispatches tokens between {parallel.ep_size} EP ranks "
                f"({parallel.activation_format.value} format)")
    if not parallel.use_ep: why = "expert parallelism is off, so every rank holds every expert"
    elif parallel.dp_size == 1 and parallel.pcp_size == 1: why = "TP+EP with one DP rank masks with expert_map"
    else: why = f"{d.name!r} declares moves_tokens=False: every rank sees every token and masks with expert_map"
    lead = f"backend {d.name!r} requested but not used: " if d.moves_tokens else ""
    return f"{lead}no all2all ({why})"

# %%
#| test all2all_note
make = lambda tp, dp, name: ParallelConfig.make(tp, dp, enable_expert_parallel=tp * dp > 1, all2all_backend=name)
test_eq(all2all_note(make(2, 1, "deepep_low_latency")),
        "backend 'deepep_low_latency' requested but not used: no all2all (TP+EP with one DP rank masks with expert_map)")
test_eq(all2all_note(make(1, 1, "nixl_ep")), "backend 'nixl_ep' requested but not used: no all2all "
        "(expert parallelism is off, so every rank holds every expert)")
test_eq(all2all_note(make(1, 4, "nixl_ep")),
        "backend 'nixl_ep' dispatches tokens between 4 EP ranks (batched_experts format)")
for name, d in BACKENDS.items():                       # the note follows the record, whatever the backend is called
    for tp, dp in ((1, 1), (4, 1), (1, 4)):
        par = make(tp, dp, name)
        assert ("requested but not used" in all2all_note(par)) == (d.moves_tokens and not par.use_all2all_kernels)
test_fail(lambda: all2all_note("ep8"), contains="parallel: expected a ParallelConfig, got str")

# %% [markdown]
# DeepEP low-latency and NIXL EP dispatch only the hidden sizes their kernels were built for; a layer whose
# `hidden_size` is not one of them is dispatched padded to the next one (vLLM rounds up in the prepare step), and one
# above the largest cannot run on that backend. `dispatch_hidden_size` states which, from the record's
# `supported_hidden_sizes`.
#
# > The layer really pads (`10_modular`): zero columns in the dispatched activations and the expert weights, and
# > the combined output is sliced back, so the report's shapes and checks are the unpadded model's.

# %%
#| export
def dispatch_hidden_size(config: MoEConfig,   # the layer on its deployment (rank 0's config)
                        ) -> tuple[int, str | None]:   # (elements per token the dispatch sends, note or None)
    """The hidden size the all2all dispatch sends, rounded up to a size the backend supports; ValueError above its
    largest (naming `hidden_size`), or naming `config` when it is not a MoEConfig. Source: vLLM's
    `maybe_roundup_layer_hidden_size` (DeepEP low-latency and NIXL EP take eight sizes, 2048 to 8192)."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    d, h = config.backend, config.hidden_size
    if not config.use_all2all_kernels or d.supported_hidden_sizes is None: return h, None
    padded, sizes = d.round_up_hidden_size(h), ", ".join(map(str, d.supported_hidden_sizes))
    if padded == h: return h, f"hidden_size {h} is dispatched as is by {d.name!r} (supported sizes {sizes})"
    return padded, (f"hidden_size {h} is dispatched padded to {padded} by {d.name!r} (supported sizes {sizes}); "
                    "weights and activations get zero columns, the output is sliced back to {h}".replace("{h}", str(h)))

# %%
#| test dispatch_hidden_size
ll = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="deepep_low_latency")
gpt_oss = MoEConfig(num_experts=8, top_k=2, hidden_size=2880, intermediate_size=16, parallel=ll)
h, note = dispatch_hidden_size(gpt_oss)
test_eq(h, 3072); assert note.startswith("hidden_size 2880 is dispatched padded to 3072 by 'deepep_low_latency'")
test_eq(dispatch_hidden_size(gpt_oss.replace(hidden_size=4096))[0], 4096)
test_eq(dispatch_hidden_size(gpt_oss.replace(parallel=ParallelConfig())), (2880, None))   # no all2all: no limit
test_fail(lambda: dispatch_hidden_size(gpt_oss.replace(hidden_size=9000)), contains="hidden_size: expected <= 8192")
test_fail(lambda: dispatch_hidden_size(ll), contains="config: expected a MoEConfig")

# %% [markdown]
# ## The main job
#
# `run_report` runs the deployment with `run_emulated_ep` and collects the report as plain data (JSON-ready): the
# model, the resolved parallel config with the reason for every property, the backend's record and what it does here,
# the placement and routing tables, the per-expert load, the checks and the time. The data is complete — every table
# has all its entries, so `--json` can be processed further; only the text (`format_report`) abridges long tables.

# %%
#| export
def _plain(v):
    "A JSON-ready value: a dtype as its name ('bfloat16'), an enum as its value, anything else unchanged."
    if isinstance(v, torch.dtype): return str(v).replace("torch.", "")
    return v.value if isinstance(v, enum.Enum) else v


# %%
#| export
def _placement_rows(run) -> dict:
    "Every rank's placement, in full: strategy, reason, local_to_global, rank 0's expert_map, routing tables."
    p0 = run.placements[0]
    tables = None if p0.global_to_physical is None else {
        "global_to_physical": p0.global_to_physical.tolist(), "physical_to_global": p0.physical_to_global.tolist()}
    return {"strategy": p0.strategy, "reason": p0.reason,
            "ranks": [{"rank": r, "num_local_experts": p.num_local_experts, "local_to_global": p.local_to_global.tolist()}
                      for r, p in enumerate(run.placements)],
            "expert_map_rank0": None if p0.expert_map is None else p0.expert_map.tolist(), "routing_tables": tables}

def _load_rows(run, num_experts: int) -> dict:
    "Token-slots per expert (all of them) and per rank, with the summary numbers."
    load = expert_load(run.topk_ids.cpu(), num_experts)
    return {"per_expert": load.tolist(), "min": int(load.min()), "max": int(load.max()),
            "mean": float(load.float().mean()), "empty_experts": int((load == 0).sum()),
            "hottest": [[int(e), int(load[e])] for e in load.argsort(descending=True, stable=True)[:5]],
            "per_rank": [int(load[p.local_to_global.cpu()].sum()) for p in run.placements]}

# %% [markdown]
# The time of each part is reported so the parts add up to the total. `run_emulated_ep` times the weights and each
# rank's forward; the rest of the run — the single-device and float64 reference computations and the checks — is
# measured as what remains of the total. Tokens per second is `num_tokens / forward time` of this emulation on this
# machine, with the ranks run one after another in one process: a way to compare runs, not a serving throughput.
# Beside the time, the report gives the process's peak resident memory so far (`getrusage`'s `ru_maxrss`, which
# `/usr/bin/time -v` also reads) and, when CUDA was used, the peak of the GPU memory torch allocated.

# %%
#| export
def _peak_resident_gb() -> float | None:
    "This process's peak resident memory so far, GiB (2^30 bytes; `getrusage`; None where the platform has no `resource`)."
    try: import resource
    except ImportError: return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20

def _timing(run, num_tokens: int, total_s: float) -> dict:
    "Seconds per part (weights + forward + reference_and_checks = total), the emulation's tokens/s, and peak memory."
    fwd, w = sum(run.rank_seconds), run.weight_seconds
    return {"weights_s": w, "forward_s": fwd, "reference_and_checks_s": total_s - w - fwd, "total_s": total_s,
            "peak_resident_gb": _peak_resident_gb(),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None,
            "per_rank_forward_s": list(run.rank_seconds),
            "tokens_per_s": num_tokens / fwd if fwd else None,
            "tokens_per_s_is": "num_tokens / forward_s of this emulation on this machine (ranks run in turn in "
                               "one process), not a serving throughput"}

def _checks(run, config: MoEConfig) -> dict:
    q = (run.quant, run.experts[0])        # w8a8 kernels round activations; the references do not
    return {"vs_float64": check_output(run.output, run.reference, config.dtype, *q),
            "single_device_vs_float64": check_output(run.single_device, run.reference, config.dtype),
            "ep_vs_single_device": None if run.config.ep_size == 1 else
                check_output(run.output, run.single_device.double(), config.dtype, *q, between_runs=True),
            "vs_kernel_spec": None if run.reference_kernels is None else    # activations rounded as the kernels do:
                check_spec_output(run.output, run.reference_kernels, run.quant)}   # the kernel tests' bound

# %%
#| export
def run_report(config: MoEConfig, num_tokens: int = 64, placement: str | None = None, seed: int = 0,   # None: linear
               tp_size: int | None = None,   # TP size folded into EP; None: the config's (`12_layer.rank_config`)
               experts: str = "auto", device: str = "cpu", quant: str = "unquantized",
               backend: str | None = None,
               weights=None,   # a WeightSource (e.g. moe_lit.checkpoint.CheckpointWeights); None: random from `seed`
              ) -> dict:
    """Run the main job on `num_tokens` random tokens and return the full report (nothing abridged) as JSON-ready data:
    `model` (the MoEConfig's fields), `deployment` (EP, TP, DP sizes, all2all and hidden-size notes, the wire's
    quantization), `backend` (its descriptor), `properties` (value and reason of each), `experts` (implementation,
    reason, device, quant), `experts_function`, `caveats`, `weights`, `placement` (each rank's tables), `load` (pairs
    per physical expert), `check` (each check's error, tolerance and `ok`), `quantization_error`, and `timing`
    (seconds: `weights_s`, `forward_s`, `reference_and_checks_s`, `total_s`; `peak_resident_gb` and `peak_gpu_gb` in
    GiB; `tokens_per_s` of the emulation). `experts`: 'auto', 'triton' or 'torch'; `quant`: a QUANT_SCHEMES name or
    short name; `device`: 'cpu', 'cuda' or a torch.device (the command's `auto` is resolved before the call).
    ValueError naming `num_tokens` (not an int in [1, 65536], or more than a batched format's slabs hold:
    max_num_tokens · ep_size), `seed` (not an int in [0, 2**40)), `hidden_size` (too
    wide for the backend), and `config`, `placement`, `tp_size`, `experts`, `quant`, `backend` or `weights` as
    `run_emulated_ep` refuses them, and `device` (not cpu or cuda, or cuda without a GPU). Source: moe-lit's own job; the properties, placement and tables
    follow vLLM's `FusedMoEParallelConfig` and `determine_expert_map` (fused_moe/config.py, layer.py)."""
    check_int("num_tokens", num_tokens, lo=1, hi=65537); check_int("seed", seed, lo=0, hi=2**40)   # a batch, not a dataset
    check_device(device)
    rc = rank_config(config, 0, tp_size)
    dispatch_h, h_note = dispatch_hidden_size(rc)                 # H the backend cannot send: fail now
    if rc.activation_format is ActivationFormat.BatchedExperts and num_tokens > rc.max_num_tokens * rc.ep_size:
        raise ValueError(f"num_tokens: expected at most max_num_tokens · ep_size = {rc.max_num_tokens} · {rc.ep_size} = "
                         f"{rc.max_num_tokens * rc.ep_size} with {rc.parallel.all2all_backend}'s batched format (its "
                         f"slabs hold max_num_tokens a rank), got {num_tokens}")
    t0 = time.perf_counter()
    hidden = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 7))
    hidden = hidden.to(device=device, dtype=config.dtype)
    run = run_emulated_ep(config, hidden, seed=seed, placement="linear" if placement is None else placement, tp_size=tp_size, experts=experts,
                          quant=quant, backend=backend, weights=weights)
    c = run.config
    report = {
        "model": {k: _plain(v) for k, v in asdict(config).items() if k != "parallel"},
        "deployment": {"ep_size": c.ep_size, "tp_per_dp_rank": tp_size, "dp_size": c.parallel.dp_size,
                       "all2all_backend": c.parallel.all2all_backend, "all2all_used": c.use_all2all_kernels,
                       "all2all_note": all2all_note(c.parallel), "dispatch_hidden_size": dispatch_h,
                       "hidden_size_note": h_note, "num_tokens": num_tokens,
                       "dispatch_quant": None if run.dispatch_quant[0] is None else list(run.dispatch_quant[0]),
                       "dispatch_quant_note": run.dispatch_quant[1]},
        "backend": {k: _plain(v) for k, v in asdict(c.backend).items()},
        "properties": [{"property": p, "value": v, "reason": r} for p, v, r in c.parallel.explain()],
        "experts": {"implementation": run.experts[0], "reason": run.experts[1], "device": str(hidden.device),
                    "quant": quant},
        "experts_function": describe_experts(config),
        "caveats": preset_caveats(config) if weights is None else [],   # the caveats are about random weights
        "weights": getattr(weights, "description", None) or f"random (seed {seed})",
        "placement": {**_placement_rows(run), **placement_record(placement, run.placements[0])},
        "load": _load_rows(run, run.placements[0].num_experts),   # physical experts (EPLB: replicas too), as the ids
        "check": _checks(run, config),
        "quantization_error": quantization_error(run.output, run.reference_unquantized, config.dtype),
    }
    report["timing"] = _timing(run, num_tokens, time.perf_counter() - t0)   # after the checks: they are timed too
    return report

# %% [markdown]
# A small run shows the report's parts. The test checks the decisions it reports, not the numbers: the batched format
# and round-robin tables for NIXL EP on a grouped model, the explained fallback to linear on an ungrouped one.

# %%
#| test run_report_small
small = MoEConfig(num_experts=16, top_k=4, hidden_size=64, intermediate_size=32, routing_method="grouped_topk",
                  num_expert_group=4, topk_group=2, name="tiny-grouped")
par = ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend="nixl_ep")
rep = run_report(small.replace(parallel=par), num_tokens=12, placement="round_robin")
props = {p["property"]: p["value"] for p in rep["properties"]}
test_eq((props["activation_format"], props["needs_round_robin_routing_tables"]), ("batched_experts", True))
test_eq({k: rep["placement"][k] for k in ("requested", "strategy", "reason")},
        {"requested": "round_robin", "strategy": "round_robin", "reason": "requested"})
test_eq(rep["placement"]["routing_tables"]["global_to_physical"][:4], [0, 4, 8, 12])
assert rep["check"]["vs_float64"]["ok"] and rep["check"]["ep_vs_single_device"]["ok"]
test_eq(sum(rep["load"]["per_rank"]), 12 * 4)
test_eq((rep["deployment"]["all2all_used"], rep["deployment"]["dispatch_hidden_size"]), (True, 2048))  # 64 padded
json.dumps(rep)                                                                  # the report is JSON-ready
ungrouped = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, parallel=par)
rep = run_report(ungrouped, num_tokens=4, placement="round_robin")
test_eq(rep["placement"]["strategy"], "linear"); assert "group" in rep["placement"]["reason"]
p = run_report(ungrouped, num_tokens=4)["placement"]                            # none asked for: the default, so said
test_eq((p["requested"], p["strategy"], p["reason"]), (None, "linear", "default"))
cap = ungrouped.max_num_tokens * 4                                              # the batched slabs' rows, all ranks
test_fail(lambda: run_report(ungrouped, num_tokens=cap + 1), contains=f"num_tokens: expected at most max_num_tokens · "
          f"ep_size = {ungrouped.max_num_tokens} · 4 = {cap} with nixl_ep's batched format")

# %% [markdown]
# The report keeps every entry of every table, however many experts there are — the text abridges, the data does
# not — and its times add up.

# %%
#| test run_report_full_data
par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="deepep_low_latency")
wide = MoEConfig(num_experts=40, top_k=2, hidden_size=32, intermediate_size=16, routing_method="grouped_topk",
                 num_expert_group=4, topk_group=2, dtype=torch.float32, parallel=par)
rep = json.loads(json.dumps(run_report(wide, num_tokens=3, placement="round_robin")))
test_eq(rep["load"]["per_expert"].__len__(), 40); test_eq(sum(rep["load"]["per_expert"]), 3 * 2)
test_eq([q["local_to_global"] for q in rep["placement"]["ranks"]], [list(range(0, 40, 2)), list(range(1, 40, 2))])
test_eq(sorted(rep["placement"]["routing_tables"]["global_to_physical"]), list(range(40)))
assert "..." not in json.dumps(rep)
t = rep["timing"]
test_close(t["weights_s"] + t["forward_s"] + t["reference_and_checks_s"], t["total_s"], eps=1e-9)
assert t["reference_and_checks_s"] > 0 and "not a serving throughput" in t["tokens_per_s_is"]
assert 0.05 < t["peak_resident_gb"] < 64, t["peak_resident_gb"]         # torch alone is a few hundred MB resident
test_fail(lambda: run_report(wide.replace(hidden_size=9000), num_tokens=3), contains="hidden_size: expected <= 8192")
test_fail(lambda: run_report(wide, num_tokens=3, device="bogus"), contains="device: expected 'cpu', 'cuda' or a torch.device")

# %% [markdown]
# ## Placement tables
#
# `tables_report` collects, for every rank of a deployment, its local experts, its `expert_map` and — when the
# backend addresses experts by physical id and the placement is round robin — the routing tables, all in full. It
# builds no weights. `format_tables` prints them.

# %%
#| export
def tables_report(config: MoEConfig,        # the model on its deployment
                  placement: str | None = None,  # requested strategy: 'linear' or 'round_robin' (None: linear)
                  tp_size: int | None = None,  # TP size inside each DP rank; None: the config's (as `run_report`'s)
                 ) -> dict:
    """Every rank's placement for `config`'s deployment as JSON-ready data: local experts, expert_map, routing tables.
    ValueError naming `config`, `tp_size` (`rank_config`), `placement` or `hidden_size` (`dispatch_hidden_size`). Source: vLLM's `determine_expert_map` and round-robin routing tables
    (vllm/model_executor/layers/fused_moe/layer.py)."""
    check_choice("placement", "linear" if placement is None else placement, PLACEMENT_STRATEGIES)
    build = lambda c: Placement.build(c, strategy="linear" if placement is None else placement)
    first = build(rank_config(config, 0, tp_size))   # an impossible deployment is refused here, before a loop of ep_size
    ranks = [rank_config(config, r, tp_size) for r in range(config.ep_size)]     # the deployment as run uses it
    dispatch_h, h_note = dispatch_hidden_size(ranks[0])
    ps = [first] + [build(c) for c in ranks[1:]]
    p0, par = ps[0], ranks[0].parallel
    return {"model": config.name, "num_experts": config.num_experts, "ep_size": config.ep_size,
            "all2all_backend": par.all2all_backend, "all2all_used": par.use_all2all_kernels,
            "all2all_note": all2all_note(par), "dispatch_hidden_size": dispatch_h, "hidden_size_note": h_note,
            "placement": placement_record(placement, p0),
            "global_to_physical": None if p0.global_to_physical is None else p0.global_to_physical.tolist(),
            "physical_to_global": None if p0.physical_to_global is None else p0.physical_to_global.tolist(),
            "ranks": [{"rank": r, "num_local_experts": p.num_local_experts, "local_to_global": p.local_to_global.tolist(),
                       "expert_map": None if p.expert_map is None else p.expert_map.tolist()} for r, p in enumerate(ps)]}

# %%
#| export
_TABLES_KEYS = ("model", "num_experts", "ep_size", "placement", "all2all_note", "hidden_size_note",
                "global_to_physical", "physical_to_global", "ranks")

def format_tables(tables: dict,   # the data of `tables_report`
                 ) -> str:
    """The tables of `tables_report` as text, in full. ValueError naming `tables` for anything but the dict
    `tables_report` returns (`format_sections`). Source: moe-lit's own."""
    return format_sections(tables, "tables", "tables_report", _TABLES_KEYS, _tables_lines)

def _tables_lines(t: dict) -> list[str]:
    lines = [f"{t['model'] or 'model'}: {t['num_experts']} experts on {t['ep_size']} EP rank(s), "
             f"{placement_head(t['placement'])}", f"all2all: {t['all2all_note']}"]
    if t["hidden_size_note"]: lines.append(t["hidden_size_note"])
    if t["global_to_physical"] is not None:
        lines += [f"global_to_physical: {t['global_to_physical']}", f"physical_to_global: {t['physical_to_global']}"]
    for q in t["ranks"]:
        lines += [f"rank {q['rank']}: local_to_global {q['local_to_global']}", f"        expert_map {q['expert_map']}"]
    return lines

# %%
#| test tables_report
cfg = build_config("deepseek-v3", ep=2, all2all="nixl_ep")
tables = tables_report(cfg.replace(num_experts=8, num_expert_group=2, topk_group=2), placement="round_robin")
test_fail(lambda: tables_report(cfg, placement="x"), contains="placement: expected one of ['linear', 'round_robin']")
text = format_tables(tables)
assert "global_to_physical: [0, 4, 1, 5, 2, 6, 3, 7]" in text and "rank 1: local_to_global [1, 3, 5, 7]" in text
assert "placement round_robin (as requested)" in text and "dispatches tokens between 2 EP ranks" in text
test_eq(tables["ranks"][1]["expert_map"], [-1, 0, -1, 1, -1, 2, -1, 3]); json.dumps(tables)
tp_ep = tables_report(build_config("deepseek-v3", ep=2, tp=2, all2all="deepep_low_latency"), tp_size=2)
test_eq(tp_ep["all2all_used"], False)
assert "all2all: backend 'deepep_low_latency' requested but not used" in format_tables(tp_ep)
test_eq(len(tp_ep["ranks"][0]["local_to_global"]), 128)                          # full, not abridged
test_fail(lambda: format_tables({"model": "x"}), contains="tables: expected the dict tables_report returns (keys")

# %% [markdown]
# ## The entry point
#
# Every option's help shows its default, or what leaving it unset means. Errors from the command line name the flag
# that set the bad value (`--tokens`, not `num_tokens`), and an output pipe closed before the command has written
# everything (`moe-lit tables --model deepseek-v3 --ep 256 --all2all nixl_ep --json | head -c 10`) ends it quietly. The exit status, which `--help` also gives: 0 when every check passes, 1 when a check of
# `run` fails, 2 on bad input (and when the model does not fit the machine's memory, or `bench` finds no CUDA GPU),
# 141 on a closed pipe. `run --distributed` reports its errors as the torchrun job does (`moe-lit distributed: rank
# R: error: ...`), since every rank prints them.

# %%
#| export
_HELP = {
    "--quant": "quantize the experts at load (short names fp8, mxfp4, nvfp4 = fp8_w8a8_block, mxfp4_w4a16, nvfp4_w4a16): "
               "FP8 w8a8 (tensor/channel/128x128 block scales) or FP4 weights with "
               "16-bit activations (MXFP4, NVFP4); the check compares with the dequantized weights; unset means "
               "unquantized, or with --weights a pre-quantized checkpoint's own scheme (its stored codes)",
    "--ep": "expert-parallel ranks (devices) in all; unset means 1 (with --distributed: the number of processes)",
    "--tp": "tensor-parallel size inside each data-parallel rank; --tp equal to --ep means TP+EP with a single DP "
            "rank: no all2all, experts masked with expert_map",
    "--all2all": "all2all backend that moves tokens between EP ranks (used only with more than one DP rank); "
                 "unset means allgather_reducescatter with more than one DP rank (vLLM's default), else none",
    "--placement": "how experts are spread over the EP ranks: linear (contiguous blocks) or round_robin (expert e on "
                   "rank e mod ep); round_robin falls back to linear when the deployment cannot use it, and the "
                   "report says why; unset means linear",
    "--dtype": "activation and weight dtype of the layer; unset means the model's own: the torch_dtype "
               "of --config's file (its dtype or torch_dtype key; both must agree; bf16 when it has neither), bf16 for every preset (the reference is always computed in float64)",
    "--experts": "experts implementation: auto = Triton on a GPU, the torch reference otherwise",
    "--device": "where the layer runs: auto = cuda when a GPU is present, else cpu",
    "--tokens": "tokens in the batch (random hidden states); with a batched-format all2all (deepep_low_latency, "
                "nixl_ep) at most the config's max_num_tokens (256) per rank, as vLLM's default cap",
    "--seed": "seed of the random weights and hidden states: the same seed gives the same numbers",
}

# %%
#| export
DISTRIBUTED_REFUSED = ("--weights", "--layer", "--tp", "--backend", "--device")   # `run --distributed` takes none yet

def _quant_scheme(name: str) -> str:
    "`--quant` value: a scheme name, or a short name of `QUANT_ALIASES` (`09_quant.quant_scheme_name`); argparse names the choices."
    return QUANT_ALIASES.get(name, name)

def _add_deployment_args(p: argparse.ArgumentParser) -> None:
    "The options `run` and `tables` share: the model and the deployment."
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, choices=sorted(PRESETS), help=f"a built-in preset (unset: {DEFAULT_PRESET})")
    src.add_argument("--config", help="a Hugging Face config.json (file or checkpoint directory) instead of --model "
                                      "(unset: --model)")
    p.add_argument("--ep", type=int, default=None, help=_HELP["--ep"])   # None: unset (1; with --distributed, the
                                                                        # number of processes)
    p.add_argument("--tp", type=int, default=1, help=_HELP["--tp"])
    p.add_argument("--all2all", default=None, choices=list(BACKENDS), help=_HELP["--all2all"])
    p.add_argument("--placement", default=None, choices=["linear", "round_robin"], help=_HELP["--placement"])

def _add_run_args(p: argparse.ArgumentParser) -> None:
    "The options of `run` only."
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help=_HELP["--dtype"])
    p.add_argument("--experts", default="auto", choices=["auto", "triton", "torch"], help=_HELP["--experts"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=_HELP["--device"])
    p.add_argument("--tokens", type=int, default=64, help=_HELP["--tokens"])
    p.add_argument("--seed", type=int, default=0, help=_HELP["--seed"])
    p.add_argument("--quant", default=None, type=_quant_scheme, choices=[*QUANT_SCHEMES, *QUANT_ALIASES], help=_HELP["--quant"])
    p.add_argument("--backend", default=None, help="an experts backend to force (`moe-lit explain` lists them); refused "
                                                    "with the reason if it does not fit; unset: the oracle's choice")
    p.add_argument("--distributed", action="store_true",
                   help="run across the processes torchrun started (one EP rank each; --ep must equal their number, "
                        "unset: that number); "
                        f"presets or a --config only: not with {', '.join(DISTRIBUTED_REFUSED)}")
    p.add_argument("--weights", metavar="CHECKPOINT_DIR",
                   help="a Hugging Face checkpoint directory (config.json + *.safetensors): run the MoE layer --layer "
                        "with its own weights instead of random ones (the model comes from its config.json); unset: "
                        "random weights")
    p.add_argument("--layer", type=int, default=None,
                   help="with --weights: the decoder layer whose MoE block to load; unset means the "
                        "checkpoint's first MoE layer")
    p.add_argument("--json", action="store_true", help="print the full report (no list abridged) as JSON")

# %%
#| export
TUNE_CHOICES = ["all", "batched", "contiguous", "w4a16", "fp8"]   # `moe-lit bench --tune`: `14_bench.TUNE_SETS`' keys
                                                                  # (the bench module is imported only by `bench`)

def _parser() -> argparse.ArgumentParser:
    "The full `moe-lit` parser: the skeleton of `15a_entry` with every subcommand's options."
    ap, cmd = command_parser()
    run, tables, ex, b = cmd["run"], cmd["tables"], cmd["explain"], cmd["bench"]
    _add_deployment_args(run); _add_run_args(run)
    _add_deployment_args(tables)
    tables.add_argument("--json", action="store_true", help="print every rank's tables as JSON")
    _add_deployment_args(ex)
    ex.add_argument("--quant", default="unquantized", type=_quant_scheme, choices=[*QUANT_SCHEMES, *QUANT_ALIASES],
                    help="weight/activation quantization (short names: " + ", ".join(f"{k} = {v}" for k, v in QUANT_ALIASES.items()) + ")")
    ex.add_argument("--device", default="detect", choices=["detect", *DEVICES, "cpu-interpreter"],
                    help="device kind the oracle decides for (cpu-interpreter: the CPU running Triton's kernels in its "
                         "interpreter, as run --experts triton does)")
    ex.add_argument("--backend", default=None, help="an experts backend to force (refused with the reason if it does not fit)")
    ex.add_argument("--json", action="store_true", help="print the decision as JSON")
    b.add_argument("--tune", nargs="?", const="all", default=None, choices=TUNE_CHOICES,
                   help="sweep tile candidates of these kernels first and save the winners (no value: all; w4a16: "
                        "both FP4 kernels; fp8: both FP8 block kernels; unset: no tuning, the saved tables)")
    b.add_argument("--config-dir", help="with --tune: where tuned tile tables are written (unset: the package's configs/)")
    b.add_argument("--out", help="write the results as JSON to this file (unset: none written)")
    b.add_argument("--scenario", action="append", help="run only scenarios (with --layer: deployments) whose name "
                                                         "contains this, any case (repeatable; unset: all)")
    b.add_argument("--layer", action="store_true",
                   help="benchmark the whole layer instead (FusedMoE eager and graph-replayed, floor, transformers)")
    return ap

# %%
#| export
def _transport_note(config):
    "`moe_lit.transport.transport_note`, imported when `explain` runs (not at the command's start-up)."
    from moe_lit.transport import transport_note
    return transport_note(config)

def explain_report(config: MoEConfig, quant: str = "unquantized", device: str = "detect", backend: str | None = None,
                   num_tokens: int | None = None,   # the batch the prepare/finalize is sized for; None: 64, at most
                   placement: str | None = None,    # its capacity (the decision does not depend on it); None: linear
                   tp_size: int | None = None) -> dict:   # None: the config's (`12_layer.rank_config`)
    """The deployment's properties with reasons, its placement, the prepare/finalize's format and the oracle's decision.
    ValueError naming the argument: `device` not 'detect', 'cpu-interpreter' or a DEVICES kind, `num_tokens` < 1,
    `placement`, `tp_size`, `quant` or `backend` as `run_report` refuses them (the oracle's reason with `backend`).
    Source: vLLM's oracles (vllm/model_executor/layers/fused_moe/oracle/{unquantized,fp8,mxfp4,nvfp4}.py) and the
    properties of its `FusedMoEParallelConfig`."""
    from moe_lit.modular import make_prepare_finalize
    if num_tokens is not None: check_int("num_tokens", num_tokens, lo=1)       # as run_report: a batch has a token
    dev = detect_device() if device == "detect" else CPU_INTERPRETER if device == "cpu-interpreter" else \
        (isinstance(device, str) and DEVICES.get(device)) or check_choice("device", device, ["detect", *DEVICES, "cpu-interpreter"])
    place = Placement.build(rank_config(config, 0, tp_size), strategy="linear" if placement is None else placement)   # validates the deployment
    quant = quant_scheme_name(quant)                 # the report names the full scheme ('fp8' is fp8_w8a8_block)
    cap = config.max_num_tokens * config.ep_size if config.activation_format is ActivationFormat.BatchedExperts else 64
    pf = make_prepare_finalize(config, min(64, cap) if num_tokens is None else num_tokens)
    d = select_experts_backend(config, quant, pf.activation_format, dev, backend)
    return {"model": config.name, "experts_function": describe_experts(config), "deployment": all2all_note(config.parallel),
            "placement": placement_record(placement, place),
            "properties": [{"property": p, "value": v, "reason": r} for p, v, r in config.parallel.explain()],
            "prepare_finalize": {"class": type(pf).__name__, "activation_format": pf.activation_format.value},
            "across_processes": _transport_note(config),
            "device": {"kind": dev.kind, "capability": dev.capability, "libraries": sorted(dev.libraries),
                       "interpreter": dev.interpreter},
            "quant_scheme": quant, "chosen": d.chosen.name,
            "candidates": [{"name": n, "accepted": ok, "reason": r} for n, ok, r in d.trace]}

def format_explain(rep: dict) -> str:
    """`explain_report` as text: properties, then the decision table. Nothing is checked: KeyError for a dict without
    `explain_report`'s keys. Source: moe-lit's own."""
    w = max(len(p["property"]) for p in rep["properties"])
    lines = [f"moe-lit explain: {rep['model'] or 'custom model'}; {rep['deployment']}",
             f"experts: {rep['experts_function']}", ""]
    lines += [f"  {p['property']:<{w}}  {str(p['value']):<15}  {p['reason']}" for p in rep["properties"]]
    pf, dev = rep["prepare_finalize"], rep["device"]
    lines += ["", placement_head(rep["placement"])]
    lines += ["", f"across processes (--distributed): {rep['across_processes']}"]
    lines += ["", f"prepare/finalize: {pf['class']} ({pf['activation_format']}); device {dev['kind']}"
                  f"{' in Triton interpreter' if dev.get('interpreter') else ''} "
                  f"(capability {dev['capability']}); quant {rep['quant_scheme']}", ""]
    n = max(len(c["name"]) for c in rep["candidates"])
    lines += [f"  {c['name']:<{n}}  {verdict(c['accepted'], c['name'] == rep['chosen']):<8}  {c['reason']}"
              for c in rep["candidates"]]
    return "\n".join(lines)

# %%
#| export
_FLAGS = {"layer_index": "--layer", "checkpoint_dir": "--weights", "checkpoint": "--weights", "quant_scheme": "--quant", "num_tokens": "--tokens", "seed": "--seed", "path_or_dict": "--config", "ep": "--ep", "tp": "--tp",
          "tp_size": "--tp", "all2all_backend": "--all2all", "dtype": "--dtype", "strategy": "--placement", "placement": "--placement",
          "device": "--device", "experts": "--experts", "quant": "--quant", "backend": "--backend"}

def _flag_error(e: ValueError) -> str:
    "The message of `e` with the argument it names replaced by the command-line flag that set it."
    name, _, rest = str(e).partition(": ")
    if name in _FLAGS: return f"{_FLAGS[name]}: {rest}"
    if name.startswith("config.json"): return f"--config: {e}"         # a bad key in the file --config names
    m = re.fullmatch(r"expected >= ep_size \((\d+)\) .*, got (\d+)", rest, re.S)
    if name in ("num_experts", "global_num_experts") and m:                     # more ranks than experts
        return f"--ep: expected at most {m[2]} (the model's experts: every rank owns at least one), got {m[1]}"
    return str(e)

def _quiet_closed_stdout() -> None:
    "Point stdout at /dev/null so the interpreter's last flush into a closed pipe is silent (the Python docs' recipe)."
    try: fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError): return              # not a real file (e.g. a test's StringIO)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd); os.close(devnull)

# %%
#| export
def _fail(args, message: str) -> int:
    "Print `moe-lit <command>: error: <message>` to stderr, as argparse words its own errors; returns exit status 2."
    command = getattr(args, "command", None)                 # (None before the arguments were parsed)
    print(f"moe-lit{' ' + command if command else ''}: error: {message}", file=sys.stderr); return 2

def _run(args) -> int:
    if args.command == "bench": return _bench(args)
    try:
        if args.command == "run" and args.distributed: return _run_distributed(args)   # before --ep/--tp are resolved
        cfg = build_config(None if args.config else args.model, args.config, 1 if args.ep is None else args.ep, args.tp, args.all2all,
                           getattr(args, "dtype", None))           # `tables` has no --dtype
        if args.command == "explain":
            rep = explain_report(cfg, args.quant, args.device, args.backend, placement=args.placement, tp_size=args.tp)
            print(json.dumps(rep, indent=1) if args.json else format_explain(rep)); return 0
        if args.command == "tables":
            tables = tables_report(cfg, args.placement, args.tp)
            print(json.dumps(tables, indent=1) if args.json else format_tables(tables)); return 0
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available(): raise ValueError("device: expected a CUDA GPU, got none")
        source = _checkpoint(args, cfg) if args.weights is not None else None
        if source is None and args.layer is not None: raise ValueError("--layer: expected --weights with it, got none")
        quant = args.quant or (source.quant_scheme if source is not None else None) or "unquantized"   # stored codes
        try: report = run_report(cfg if source is None else source.config, args.tokens, args.placement, args.seed,
                                 args.tp, args.experts, device, quant, args.backend, weights=source)
        except ValueError as e: raise _stored_quant_error(e, args, quant) from None
    except ValueError as e: return _fail(args, _flag_error(e))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    checks = [c for c in report["check"].values() if c is not None]
    return 0 if all(c["ok"] for c in checks) else 1

def _stored_quant_error(e: ValueError, args, quant: str) -> ValueError:
    "`e`, but a complaint about `quant` that no --quant gave (the checkpoint's stored codes) names --weights instead."
    name, _, rest = str(e).partition(": ")
    if name != "quant" or args.quant is not None or getattr(args, "weights", None) is None: return e
    return ValueError(f"--weights (its stored {quant} codes; no --quant given): {rest}")

def _checkpoint(args, cfg: MoEConfig):
    "`--weights DIR --layer N`: the checkpoint's MoE layer N (default: its first) on the deployment of `cfg`."
    from moe_lit.checkpoint import CheckpointWeights
    from moe_lit.layouts import moe_layer_indices
    for flag, given in (("--config", args.config), ("--model", args.model)):
        if given: raise ValueError(f"--weights: expected no {flag} (the checkpoint's own config.json is used), got {given}")
    w = Path(args.weights) if args.weights else None     # a file (its config.json, a shard), none, or a directory
    if w is None or not (w / "config.json").is_file():   # without config.json: one message
        got = ("no directory" if w is None or not w.exists() else "the file" if not w.is_dir()
               else "a directory without config.json:")
        raise ValueError(f"--weights: expected a checkpoint directory (config.json and its safetensors files), got "
                         f"{got} {args.weights!r}")
    try:
        layer = args.layer
        if layer is None:
            layers = moe_layer_indices(args.weights)
            if not layers: raise ValueError(f"expected a checkpoint with MoE layers, got none in {args.weights}")
            layer = layers[0]
        return CheckpointWeights(args.weights, layer, parallel=cfg.parallel, dtype=DTYPES[args.dtype] if args.dtype else None)
    except ValueError as e:                               # every complaint about the checkpoint names the flag that gave it
        if str(e).startswith("layer_index:"): raise
        name, _, rest = str(e).partition(": ")             # the loader's own argument name is this flag
        raise ValueError(f"--weights: {rest if name in ('path_or_dict', 'checkpoint_dir', 'checkpoint') else e}") from None

def _run_distributed(args) -> int:
    "`moe-lit run --distributed`: the same job over torch.distributed (`moe_lit.distributed.run_job`), rank 0 reports."
    from moe_lit.distributed import run_job
    given = {"--weights": args.weights is not None, "--layer": args.layer is not None, "--tp": args.tp != 1,
             "--backend": args.backend is not None, "--device": args.device != "auto"}
    unsupported = [f for f in DISTRIBUTED_REFUSED if given[f]]
    if unsupported:
        raise ValueError(f"--distributed: expected none of {', '.join(unsupported)} (across processes moe-lit runs presets "
                         f"or a --config as data-parallel EP ranks on random weights so far), got {', '.join(unsupported)}")
    if not any(v in os.environ for v in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")):   # not a launcher's: say so
        print("moe-lit run: note: --distributed without torchrun runs on this one process; for N ranks start it as "
              "`torchrun --nproc-per-node N -m moe_lit.cli run --distributed ...`", file=sys.stderr)
    return run_job(model=args.model or DEFAULT_PRESET, ep=args.ep, all2all=args.all2all,
                   placement=args.placement, tokens=args.tokens, seed=args.seed, dtype=args.dtype, experts=args.experts,
                   as_json=args.json, config=args.config, quant=args.quant or "unquantized")

def main(argv: list[str] | None = None) -> int:
    """The `moe-lit` command. Exit status: 0, 1 when a check of `run` fails, 2 on bad input (also when the model does
    not fit the machine's memory, or `bench` has no CUDA GPU), 141 on a closed pipe.
    Bad input: argparse's usage errors (an unknown subcommand or flag, a value outside a flag's choices) print usage and
    raise SystemExit(2), as argparse does; a bad value found later prints `moe-lit <command>: error: ...` naming the
    flag and returns 2."""
    use_triton_interpreter_without_gpu()                # before any kernel module is imported
    args = None
    if sys.stdout is None:                                # started with stdout closed (`>&-`): Python has none to print to
        return _fail(None, "standard output: expected an open file to write the report to, got none (closed); "
                           "redirect it to /dev/null to discard the report")
    try:                                                  # (`moe-lit run --help | head -1` closes the pipe in here)
        args = _parser().parse_args(argv)
        status = _run(args)
        sys.stdout.flush()                                # a reader that went away shows up here, not at exit
        return status
    except BrokenPipeError:                               # `moe-lit tables | head -1`: stop quietly, as SIGPIPE would
        _quiet_closed_stdout(); return 141
    except (MemoryError, RuntimeError) as e:              # a model too large for this machine: one line, no traceback
        if not _out_of_memory(e): raise
        tables = getattr(args, "command", None) == "tables"     # its tables grow with ranks × experts, not tokens
        return _fail(args, f"out of memory: this model and deployment need more memory than this machine has "
                           f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); try "
                           + ("a smaller --model or fewer --ep ranks (the tables hold every rank's map of every expert)"
                              if tables else "a smaller --model, more --ep ranks, or --tokens fewer"))

def _out_of_memory(e: BaseException) -> bool:
    "Whether `e` is an allocation failure (host or GPU), as torch raises them."
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e) or \
        "out of memory" in str(e).lower()

# %%
#| export
def _bench(args) -> int:
    "`moe-lit bench`: needs a CUDA GPU; prints a table and optionally writes JSON and tuned tile tables."
    def no_gpu() -> bool:                                          # it times kernels on the card: after the flags' checks
        if torch.cuda.is_available() and not triton_interpreting(): return False
        _fail(args, "expected a CUDA GPU to time the kernels on (without Triton's interpreter), got "
              + ("none" if not torch.cuda.is_available() else "TRITON_INTERPRET set") +
              "; on a CPU, `moe-lit run` checks the layer")
        return True
    if args.scenario and not all(x.strip() for x in args.scenario):        # "" is part of every name: it picks all
        return _fail(args, f"--scenario: expected a non-empty part of a name, got {args.scenario}")
    pick = lambda items: [s for s in items if not args.scenario or any(x.lower() in s["name"].lower() for x in args.scenario)]
    from moe_lit.bench import check_bench_args
    if args.layer:
        for flag, value in (("--tune", args.tune), ("--config-dir", args.config_dir)):
            if value is not None:
                return _fail(args, f"{flag}: not used by --layer (only the GEMM benchmark tunes tiles), got {value!r}")
    try: check_bench_args(args.out, args.tune or False, args.config_dir)   # before minutes of measuring, not after
    except ValueError as e: return _fail(args, str(e))
    if args.layer:
        from moe_lit.bench_layer import LAYER_DEPLOYMENTS, bench_layer, format_bench_layer
        deps = pick(LAYER_DEPLOYMENTS)
        if not deps:
            names = "; ".join(repr(d["name"]) for d in LAYER_DEPLOYMENTS)
            return _fail(args, f"--scenario: expected part of a deployment name ({names}), got {args.scenario}")
        show = lambda rows: print(format_bench_layer(dict(rows=rows)), file=sys.stderr, flush=True)
        if no_gpu(): return 2
        try: report = bench_layer(args.out, deps, on_rows=show)
        except ValueError as e: return _fail(args, str(e))
        print(format_bench_layer(report)); return 0
    from moe_lit.bench import SCENARIOS, run_bench, format_bench
    scs = pick(SCENARIOS)
    if not scs:                                   # (run_bench takes an empty list as "every scenario": refused here)
        names = "; ".join(repr(s["name"]) for s in SCENARIOS)
        return _fail(args, f"--scenario: expected part of a scenario name ({names}), got {args.scenario}")
    if no_gpu(): return 2
    try: report = run_bench(args.out, args.tune or False, args.config_dir, scs, on_scenario=lambda n: print(f"... {n}", file=sys.stderr))
    except ValueError as e: return _fail(args, str(e))
    print(format_bench(report)); return 0

# %% [markdown]
# Quantized experts from the command line: the weights are quantized at load and the check compares with the
# dequantized weights (and, for FP8 w8a8 kernels, allows for the activation rounding). With the Triton quantized
# experts a fourth check holds the output to the kernels' own spec (`09d`: float64, the activations rounded as the
# kernels round them) within the bound the kernel tests use — 5 % relative error for FP8 instead of the float64
# check's 30 %: FP8 activation scales 6 % off pass the float64 check and fail this one (checked by hand). Per-tensor
# FP8 has no such check (`12_layer.kernels_spec_holds`: its scale depends on which rows share a launch). A forced backend that does not
# fit is refused with the oracle's reason.

# %%
#| test run_quantized_cli
with tempfile.TemporaryDirectory() as d:
    f = Path(d, "tiny-moe.json")
    f.write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4, "hidden_size": 64,
                             "num_experts_per_tok": 2, "intermediate_size": 64, "torch_dtype": "bfloat16"}))
    for q, experts in (("fp8", "triton"), ("mxfp4_w4a16", "auto"), ("nvfp4", "auto")):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            test_eq(main(["run", "--config", str(f), "--ep", "2", "--quant", q, "--experts", experts, "--tokens", "6",
                          "--json"]), 0)
        rep = json.loads(out.getvalue())
        test_eq(rep["experts"]["quant"], QUANT_ALIASES.get(q, q))                  # short names resolve
        on_gpu = experts == "triton" or torch.cuda.is_available()              # auto: the oracle's kernels on a GPU
        test_eq(rep["experts"]["implementation"], "triton_quant" if on_gpu else "torch")
        assert rep["check"]["vs_float64"]["ok"] and rep["check"]["vs_float64"]["cosine"] > 0.99
        spec = rep["check"]["vs_kernel_spec"]                     # the Triton kernels against their own spec
        assert (spec is not None and spec["ok"] and spec["rel_err"] < spec["rtol"]) if on_gpu else spec is None, spec
    with contextlib.redirect_stderr(io.StringIO()) as err:
        test_eq(main(["run", "--config", str(f), "--quant", "nvfp4_w4a16", "--backend", "triton_contiguous_w4a16",
                      "--device", "cpu"]), 2)
assert "needs a CUDA GPU" in err.getvalue(), err.getvalue()

# %%
#| hide
from moe_lit.bench import TUNE_SETS

# %%
#| test main_entry_point
test_eq(TUNE_CHOICES, list(TUNE_SETS))                         # the flag's choices are the bench's kernel sets
with tempfile.TemporaryDirectory() as d:                      # a tiny Mixtral-layout config file, end to end
    f = Path(d, "tiny-mixtral.json")
    f.write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4, "hidden_size": 32,
                             "num_experts_per_tok": 2, "intermediate_size": 16, "torch_dtype": "float32"}))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        test_eq(main(["run", "--config", str(f), "--tokens", "5", "--ep", "2", "--all2all", "nixl_ep", "--json"]), 0)
    with contextlib.redirect_stdout(io.StringIO()) as out16:
        test_eq(main(["run", "--config", str(f), "--tokens", "2", "--dtype", "fp16", "--json"]), 0)
rep = json.loads(out.getvalue())
test_eq((rep["model"]["num_experts"], rep["properties"][1]["value"]), (4, "batched_experts"))
test_eq(rep["model"]["name"], "tiny-mixtral")                  # the file's name, not its temporary directory's
test_eq(rep["model"]["dtype"], "float32")                      # the file's torch_dtype, not a default of --dtype
test_eq(json.loads(out16.getvalue())["model"]["dtype"], "float16")   # --dtype given: it wins
with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(main(["tables", "--model", "deepseek-v3", "--ep", "4",
                                                                    "--all2all", "deepep_low_latency", "--placement", "round_robin"]), 0)
assert "global_to_physical" in out.getvalue()
with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(main(["tables", "--ep", "2", "--tp", "2", "--json",
                                                                    "--all2all", "nixl_ep"]), 0)
tables = json.loads(out.getvalue())
test_eq((len(tables["ranks"][1]["local_to_global"]), tables["all2all_used"]), (64, False))   # full lists, as JSON

# %% [markdown]
# Without a GPU the command switches Triton to its CPU interpreter before any kernel module is imported — importing
# `moe_lit.cli` (or `moe_lit.distributed`) imports none — so `--experts triton` runs from a plain shell, where
# `TRITON_INTERPRET` is not set. The test runs the command in a fresh process with the variable removed.

# %%
#| test experts_triton_from_a_plain_shell
code = "import sys, moe_lit.cli, moe_lit.distributed; assert not any(m.startswith('moe_lit.kernels') for m in sys.modules)"
test_eq(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr, "")
with tempfile.TemporaryDirectory() as d:
    f = Path(d, "tiny-mixtral.json")
    f.write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4, "hidden_size": 32,
                             "num_experts_per_tok": 2, "intermediate_size": 16, "torch_dtype": "float32"}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "moe_lit.cli", "run", "--config", str(f), "--tokens", "3", "--experts",
                          "triton", "--json"], capture_output=True, text=True, env=env)
test_eq(out.returncode, 0)
rep = json.loads(out.stdout)
assert rep["experts"]["implementation"].startswith("triton") and rep["check"]["vs_float64"]["ok"], rep["experts"]
env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}      # --distributed, no torchrun:
with tempfile.TemporaryDirectory() as d:                                                     # it runs, and says how many
    f = Path(d, "tiny.json")
    f.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 4,
                             "num_experts_per_tok": 2}))
    out = subprocess.run([sys.executable, "-m", "moe_lit.cli", "run", "--distributed", "--config", str(f), "--tokens", "4",
                          "--quant", "fp8"], capture_output=True, text=True, env=env)
    tp = subprocess.run([sys.executable, "-m", "moe_lit.cli", "run", "--distributed", "--config", str(f), "--tp", "2",
                         "--layer", "1"],
                        capture_output=True, text=True, env=env)
test_eq(out.returncode, 0)
assert "--distributed without torchrun runs on this one process" in out.stderr and "on 1 process" in out.stdout, out.stderr
assert "weights fp8_w8a8_block" in out.stdout and "quantization error vs the float weights" in out.stdout, out.stdout
test_eq(tp.returncode, 2)
assert "--distributed: expected none of --layer, --tp" in tp.stderr, tp.stderr

# %%
#| test main_flags_taken_as_given
seen = []
with tempfile.TemporaryDirectory() as d, mock.patch.object(dist_module, "run_job", lambda **kw: seen.append(kw) or 0):
    f = Path(d, "tiny.json"); f.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64,
                                                       "moe_intermediate_size": 32, "num_experts": 4,
                                                       "num_experts_per_tok": 2}))
    for extra in ([], ["--ep", "1"]): main(["run", "--distributed", "--config", str(f), *extra])
    with contextlib.redirect_stderr(io.StringIO()) as err:
        test_eq(main(["run", "--distributed", "--config", str(f), "--backend", ""]), 2)   # given, though empty
    assert "--distributed: expected none of --backend" in err.getvalue(), err.getvalue()
test_eq([kw["ep"] for kw in seen], [None, 1])          # an explicit --ep 1 is checked against the processes, not unset
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(main(["bench", "--scenario", ""]), 2)
assert "--scenario: expected a non-empty part of a name" in err.getvalue(), err.getvalue()

# %% [markdown]
# A checkpoint's own layer: `--weights CHECKPOINT_DIR` takes the model from the checkpoint's `config.json` and the
# weights of decoder layer `--layer` (default: the first MoE layer) from its safetensors files, each emulated rank
# reading only its own experts. The test writes a tiny DeepSeek-V3 checkpoint with transformers.

# %%
#| test run_checkpoint_weights
with tempfile.TemporaryDirectory() as d:
    tiny_hf_model("deepseek_v3").save_pretrained(d, max_shard_size="100KB")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        test_eq(main(["run", "--weights", d, "--tokens", "6", "--ep", "2", "--all2all", "nixl_ep", "--json"]), 0)
    rep = json.loads(out.getvalue())
    test_eq((rep["model"]["model_type"], rep["model"]["num_experts"]), ("deepseek_v3", 8))
    assert rep["weights"].startswith("checkpoint") and "layer 1" in rep["weights"], rep["weights"]
    assert rep["check"]["vs_float64"]["ok"] and rep["check"]["ep_vs_single_device"]["ok"]
    with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(main(["run", "--weights", d, "--layer", "1"]), 0)
    assert "weights: checkpoint" in out.getvalue()
    for argv, msg in ((["--weights", d, "--layer", "0"], "--layer: expected one of the MoE layers [1]"),
                      (["--weights", d, "--config", d], "--weights: expected no --config"),
                      (["--weights", d, "--model", "mixtral-8x7b"], "--weights: expected no --model"),
                      (["--weights", d + "-missing"], f"--weights: expected a checkpoint directory (config.json and "
                       f"its safetensors files), got no directory '{d}-missing'"),
                      (["--weights", f"{d}/config.json"], f"got the file '{d}/config.json'"),
                      (["--weights", str(shard := next(Path(d).glob("*.safetensors")))], f"got the file '{shard}'"),
                      (["--weights", ""], "--weights: expected a checkpoint directory (config.json and its safetensors "
                       "files), got no directory ''"), (["--layer", "1"], "--layer: expected --weights with it")):
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(main(["run", *argv]), 2)
        assert msg in err.getvalue(), err.getvalue()
with tempfile.TemporaryDirectory() as d:                       # a pre-quantized checkpoint runs its stored codes
    write_fp8_block_checkpoint(d)
    with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(main(["run", "--weights", d, "--tokens", "3", "--json"]), 0)
    rep = json.loads(out.getvalue())
    test_eq((rep["experts"]["quant"], rep["quantization_error"]), ("fp8_w8a8_block", None))   # no weights before
    with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(main(["run", "--weights", d, "--tokens", "3"]), 0)
    assert "quantization error" not in out.getvalue()                  # the stored codes are the weights
    with contextlib.redirect_stderr(io.StringIO()) as err:            # a dtype the stored codes' kernels refuse: the
        test_eq(main(["run", "--weights", d, "--experts", "triton", "--dtype", "fp32"]), 2)   # codes are named, not --quant
    assert "error: --weights (its stored fp8_w8a8_block codes; no --quant given): expected a bf16 or fp16 layer" in \
        err.getvalue(), err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()) as err:            # a wire that pads the hidden size: what else runs
        test_eq(main(["run", "--weights", d, "--ep", "2", "--all2all", "nixl_ep"]), 2)
    assert ("hidden_size 320 padded to 2048 for nixl_ep's wire; run them on an all2all that sends this size as it is "
            "(allgather_reducescatter, deepep_high_throughput), or dequantize them (quant='unquantized'; moe-lit run "
            "--quant unquantized)") in err.getvalue(), err.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):                   # and both of those do
        for extra in (["--all2all", "deepep_high_throughput"], ["--all2all", "nixl_ep", "--quant", "unquantized"]):
            test_eq(main(["run", "--weights", d, "--ep", "2", "--tokens", "3", *extra]), 0)

# %%
#| test main_errors_name_the_flag
with tempfile.TemporaryDirectory() as d:
    big, bad = Path(d, "big.json"), Path(d, "bad.json")
    big.write_text(json.dumps({"num_experts": 8, "num_experts_per_tok": 2, "hidden_size": 9000, "intermediate_size": 8}))
    bad.write_text(json.dumps({"num_experts": "8", "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 8}))
    k9 = Path(d, "k9.json")
    k9.write_text(json.dumps({"num_experts": 8, "num_experts_per_tok": 9, "hidden_size": 64, "intermediate_size": 8}))
    for argv, msg in ((["run", "--tokens", "0"], "moe-lit run: error: --tokens: expected >= 1, got 0"),
                      (["run", "--seed", "-1"], "moe-lit run: error: --seed: expected >= 0, got -1"),
                      (["tables", "--ep", "6", "--tp", "4"], "moe-lit tables: error: --tp: expected a divisor of ep=6, got 4"),
                      (["tables", "--config", str(Path(d, "missing.json"))], "--config: expected an existing config.json"),
                      (["tables", "--config", str(bad)], "--config: config.json num_experts: expected an int"),
                      (["tables", "--config", str(k9)], "--config: config.json num_experts_per_tok (top_k): expected <= 8, got 9"),
                      (["tables", "--config", str(big), "--ep", "16"], "--ep: expected at most 8 (the model's experts: every rank owns at least one), got 16"),
                      (["tables", "--config", str(big), "--ep", "2", "--all2all", "nixl_ep"],
                       "hidden_size: expected <= 8192 for all2all backend 'nixl_ep', got 9000"),
                      (["bench", "--layer", "--out", str(Path(d, "no", "x.json"))], "(--out): expected a file in an existing directory"),
                      (["bench", "--out", d], "(--out): expected a file in an existing directory"),
                      (["bench", "--out", ""], "(--out): expected a path (a non-empty str or Path"),
                      (["bench", "--config-dir", d], "(--config-dir): expected tune (--tune) with it"),
                      (["bench", "--tune", "--config-dir", str(Path(d, "nowhere"))], "(--config-dir): expected an existing directory"),
                      (["bench", "--layer", "--config-dir", ""], "--config-dir: not used by --layer"),
                      (["bench", "--tune", "--config-dir", ""], "(--config-dir): expected a path (a non-empty str"),
                      (["bench", "--layer", "--tune"], "--tune: not used by --layer"),
                      (["bench", "--layer", "--scenario", "nope"], "--scenario: expected part of a deployment name ('Qwen3"),
                      (["bench", "--tune", "--scenario", "nope"], "--scenario: expected part of a scenario name ('DeepSeek"),
                      (["run", "--weights", d], "moe-lit run: error: --weights: expected a checkpoint directory "
                       f"(config.json and its safetensors files), got a directory without config.json: '{d}'")):
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(main(argv), 2)
        assert msg in err.getvalue() and "path_or_dict" not in err.getvalue(), (argv, err.getvalue())
if not torch.cuda.is_available():                       # the benchmark on a CPU: one line saying what it needs
    for argv in (["bench"], ["bench", "--layer"]):
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(main(argv), 2)
        assert "moe-lit bench: error: expected a CUDA GPU to time the kernels on" in err.getvalue(), err.getvalue()
# a model too large for the machine: one line naming the cause (the allocation itself is not tried here: on a host
# that overcommits memory it would succeed and then fill the machine)
for exc in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] ... can't allocate memory: you tried to allocate 8 TB")):
    def _raise(args, exc=exc): raise exc
    real, _cli._run = _cli._run, _raise
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(_cli.main(["run"]), 2)
    finally: _cli._run = real
    assert err.getvalue().startswith("moe-lit run: error: out of memory"), err.getvalue()
    assert "more --ep ranks" in err.getvalue(), err.getvalue()
real, _cli._run = _cli._run, lambda args: (_ for _ in ()).throw(MemoryError())      # `tables`: ranks × experts
try:
    with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(_cli.main(["tables"]), 2)
finally: _cli._run = real
assert "try a smaller --model or fewer --ep ranks (the tables hold" in err.getvalue(), err.getvalue()
real, _cli._run = _cli._run, lambda args: (_ for _ in ()).throw(RuntimeError("shape mismatch"))   # other errors propagate
try: test_fail(lambda: _cli.main(["run"]), contains="shape mismatch")
finally: _cli._run = real

# %%
#| test main_options
def exit_code(argv):
    try: main(argv)
    except SystemExit as e: return e.code
for argv, code, has, lacks in ((["--version"], 0, f"moe-lit {__version__}", None),
                               (["run", "--help"], 0, "at most the config's max_num_tokens (256) per rank, as vLLM's default cap (default: 64)", None),
                               (["run", "--help"], 0, "unset means the model's own: the torch_dtype of --config's "
                                                      "file (its dtype or torch_dtype key; both must agree; bf16 when "
                                                      "it has neither), bf16 for every preset", None),
                               (["tables", "--help"], 0, "no all2all, experts masked with expert_map", "--dtype")):
    with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(exit_code(argv), code)
    text = " ".join(out.getvalue().split())                    # argparse wraps to the terminal's width
    assert has in text and (lacks is None or lacks not in text), (argv, text)
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(exit_code(["tables", "--dtype", "fp32"]), 2)
assert "unrecognized arguments: --dtype" in err.getvalue()       # --dtype does nothing for tables, so it is not offered
for argv in (["bench", "--config", "c.json"], ["run", "--tok", "3"]):   # flags are spelled out: --config is not taken
    with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(exit_code(argv), 2)   # for bench's --config-dir
    assert f"unrecognized arguments: {argv[1]}" in err.getvalue(), err.getvalue()

# %%
#| test main_closed_pipe
class ClosedPipe(io.StringIO):                                 # stdout whose reader has gone (`| head -1`)
    def write(self, s): raise BrokenPipeError(32, "Broken pipe")
with contextlib.redirect_stdout(ClosedPipe()), contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(main(["tables", "--ep", "2"]), 141)                # 128 + SIGPIPE, what a shell reports for `yes | head`
test_eq(err.getvalue(), "")                                    # no traceback
with mock.patch.object(sys, "stdout", None), contextlib.redirect_stderr(io.StringIO()) as err:   # started with `>&-`
    test_eq(main(["tables", "--ep", "2"]), 2)
assert err.getvalue().startswith("moe-lit: error: standard output: expected an open file"), err.getvalue()

# %% [markdown]
# `python -m moe_lit.cli` runs the command too. The cell is not evaluated in the notebook, where `sys.argv` holds the
# notebook runner's arguments.

# %%
#| eval: false
#| export
if __name__ == "__main__": sys.exit(main())

# %%
#| test explain_nixl_nvfp4
rep = explain_report(build_config("gpt-oss-120b", ep=8, all2all="nixl_ep"), "nvfp4_w4a16", "h200")
test_eq((rep["prepare_finalize"]["activation_format"], rep["chosen"]), ("batched_experts", "triton_batched_w4a16"))
text = format_explain(rep)
names = {c["name"] for c in rep["candidates"]}
verdicts = {l.split()[0]: l.split()[1] for l in text.splitlines() if l.split() and l.split()[0] in names}
test_eq(verdicts["triton_batched_w4a16"], "chosen")                       # the decision table's words (11_oracle.verdict)
assert set(verdicts.values()) >= {"chosen", "rejected"} and set(verdicts.values()) <= {"chosen", "accepted", "rejected"}, verdicts
assert "consumes standard, the prepare/finalize produces batched_experts" in text
with contextlib.redirect_stdout(io.StringIO()) as out:
    test_eq(main(["explain", "--model", "deepseek-v3", "--ep", "8", "--all2all", "nixl_ep", "--quant", "fp8_w8a8_block",
                  "--device", "cpu", "--json"]), 0)
test_eq(json.loads(out.getvalue())["chosen"], "torch_batched")
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(main(["explain", "--ep", "2", "--backend", "triton_contiguous", "--device", "cpu"]), 2)
assert "needs a CUDA GPU" in err.getvalue() and "explain --device cpu-interpreter" in err.getvalue()
with contextlib.redirect_stdout(io.StringIO()) as out:            # what run --experts triton --backend decides on a CPU
    test_eq(main(["explain", "--ep", "2", "--backend", "triton_contiguous", "--device", "cpu-interpreter"]), 0)
assert "device cpu in Triton interpreter" in out.getvalue() and "runs in Triton's CPU interpreter" in out.getvalue()
test_eq(explain_report(build_config(ep=2, all2all="nixl_ep"), device="cpu-interpreter")["chosen"], "triton_batched")
small = build_config(ep=2, all2all="nixl_ep").replace(max_num_tokens=16)   # sized within its capacity: decided, not refused
test_eq((explain_report(small, "fp8", device="h200")["chosen"], explain_report(small, "fp8", device="h200")["quant_scheme"]),
        ("triton_batched_fp8", "fp8_w8a8_block"))
test_fail(lambda: explain_report(small, device="h200", num_tokens=0), contains="num_tokens: expected >= 1, got 0")
for dev in (["h200"], "h9000", None):                       # the device named, not a TypeError from a dict lookup
    test_fail(lambda: explain_report(small, device=dev), contains="device: expected one of")
test_fail(lambda: explain_report(small, device="h200", backend="nope"), contains="backend: expected one of")   # the
test_fail(lambda: explain_report(small, device="h200", backend="torch_standard"),     # oracle's own argument name
          contains="backend: expected a backend that fits this layer, got 'torch_standard'")
with contextlib.redirect_stderr(io.StringIO()) as err:
    test_eq(main(["explain", "--ep", "256", "--device", "cpu"]), 2)                 # more ranks than experts
with contextlib.redirect_stdout(io.StringIO()) as out:
    main(["explain", "--model", "deepseek-v3", "--ep", "8", "--all2all", "nixl_ep", "--placement", "round_robin", "--device", "cpu"])
assert "placement round_robin" in out.getvalue()

# %% [markdown]
# ### The seed's scenario
#
# gpt-oss-120b on 8 ranks with NIXL EP, FP4 weights, on an H200 — the deployment whose oracles once picked a
# Standard-format kernel. `moe-lit explain --model gpt-oss-120b --ep 8 --all2all nixl_ep --quant nvfp4_w4a16
# --device h200` prints the properties with their reasons and the whole decision: every Standard-format candidate
# is rejected for its format, the library backends for their libraries or their format, and the batched K-loop FP4
# kernel is chosen and declared an emulation. MXFP4 takes the same path.

# %%
for q in ("nvfp4_w4a16", "mxfp4_w4a16"):
    print(format_explain(explain_report(build_config("gpt-oss-120b", ep=8, all2all="nixl_ep"), q, "h200")), end="\n\n")

# %% [markdown]
# ## Using it
#
# Each subcommand as a user types it, run here through `main`, which the console script calls. First, a layer on a
# config.json of your own: here a tiny Qwen3-MoE, which runs in seconds on a CPU, on two EP ranks with NIXL EP,
# emulated in this one process:
#
# ```sh
# moe-lit run --config tiny.json --tokens 8 --ep 2 --all2all nixl_ep
# ```

# %%
tiny = Path(tempfile.mkdtemp(), "tiny.json")
tiny.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32,
                            "num_experts": 4, "num_experts_per_tok": 2}))
status = main(["run", "--config", str(tiny), "--tokens", "8", "--ep", "2", "--all2all", "nixl_ep"])
assert status == 0

# %% [markdown]
# The placement and routing tables of the same deployment, asking for round-robin placement
# (`moe-lit tables --config tiny.json --ep 2 --all2all nixl_ep --placement round_robin`); this config has no expert
# groups, so the placement falls back to linear, and the first line says why:

# %%
assert main(["tables", "--config", str(tiny), "--ep", "2", "--all2all", "nixl_ep", "--placement", "round_robin"]) == 0

# %% [markdown]
# The others, as command lines:
#
# - **A checkpoint's own layer:** `moe-lit run --weights CHECKPOINT_DIR --layer 1` runs the MoE block of decoder
#   layer 1 with the checkpoint's weights (the model from its `config.json`; unset `--layer`: the first MoE layer).
# - **Across processes:** `torchrun --nproc-per-node 2 -m moe_lit.cli run --distributed --config tiny.json --all2all
#   nixl_ep` runs one EP rank a process (`13b_distributed`); rank 0 prints the report.
# - **The oracle's decision:** `moe-lit explain --model gpt-oss-120b --ep 8 --all2all nixl_ep --quant nvfp4
#   --device h200` (the cell above).
# - **Benchmarks, on a CUDA GPU:** `moe-lit bench` times the experts GEMMs of both formats against their peers and
#   the measured roofline (`14_bench`); `moe-lit bench --layer --scenario DeepSeek-V3 --out layer.json` times the
#   whole layer of the DeepSeek-V3 deployments, eager and replayed, and writes the rows as JSON (`14a_bench_layer`).
# - `--json` on `run`, `tables` and `explain` prints the whole report as JSON instead of text.
