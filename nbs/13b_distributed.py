# %%
#| default_exp distributed

# %% [markdown]
# # Expert parallelism across processes: the main job
# > `moe-lit run` on N real processes: every rank builds the same FusedMoE a single-process user gets, routes its share of the batch with the layer's router, and runs the layer's experts between the distributed dispatch and combine; rank 0 checks the result against one process and float64.

# %%
#| export
from __future__ import annotations
import argparse, json, sys, time
from dataclasses import dataclass
import torch
import torch.distributed as dist
from moe_lit.terms import check_int, check_choice, use_triton_interpreter_without_gpu, acc_dtype
from moe_lit.config import ActivationFormat, MoEConfig, ParallelConfig, BACKENDS
from moe_lit.models import PRESETS, DEFAULT_PRESET, preset, moe_config_from_hf
from moe_lit.routing import select_experts, router_logits
from moe_lit.placement import Placement
from moe_lit.dispatch_plan import slab_sources
from moe_lit.modular import ModularKernel, SharedExperts, make_experts, dispatch_quantization
from moe_lit.quant import quant_scheme_name, QUANT_SCHEMES, QUANT_ALIASES
from moe_lit.layer import FusedMoE, RandomExpertWeights, rank_config, reference_by_global_id, kernels_spec_holds
from moe_lit.testing import check_output, check_spec_output, quantization_error
from moe_lit.report import format_distributed_report, placement_record
from moe_lit.transport import (all_gather_rows, config_rank_in_group, group_device, init_distributed, transport_note,
                               make_distributed_prepare_finalize)

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.config import BACKENDS, ParallelConfig, MoEConfig
from moe_lit.placement import Placement
from moe_lit.layer import rank_config
from moe_lit.testing import assert_close
from moe_lit.dispatch_plan import plot_dispatch
import contextlib, io, json, os, tempfile
from moe_lit.distributed import _parser
from pathlib import Path

# %% [markdown]
# In this notebook: the main job across processes (`split_tokens`, `run_distributed`, `run_job`, `main`, the
# `torchrun -m moe_lit.distributed` entry point) over the transport of `13a_transport`; its report's text is
# `15b_report`'s `format_distributed_report`. The launcher that starts the processes from Python, and the tests
# across real processes, are in `13c_launch`. An **explanation** page with a **how-to** (the command below).
#
# Words from other chapters: DP rank, prepare / finalize, slab and the two activation formats (Standard: a flat list
# of tokens; batched: one slab of rows a local expert) are in the overview's list (`index`) and `05_formats`; EPLB,
# replicated experts, is `04_placement`'s; EP emulation, every rank in turn in one process, is `12_layer`'s
# `run_emulated_ep`.

# %% [markdown]
# ## The main job across processes
#
# `run_distributed` is the main job of `moe-lit run` on real processes. Every rank
#
# 1. takes its config from the deployment (`rank_config`: DP rank `r` of `S`, EP on) and builds its `Placement`;
# 2. builds its `FusedMoE` (`12_layer`) — the same object a single-process user gets: only its own experts' weights
#    (`RandomExpertWeights`: expert `g` depends only on `(seed, g)`; under EPLB a physical slot `p` holds logical
#    expert `p % num_experts`, vLLM's initial EPLB map), the replicated router, the placement's tables, the experts
#    the deployment's format and the device call for; with `quant` its experts are quantized at load, as a
#    single-process layer's are, and `10_modular.dispatch_quantization` (asked `across_processes=True`) says whether
#    the transport sends FP8 rows (`13a_transport`: the all-to-all a pair's, the all-gather a token's) — the report's
#    "on the wire" line gives the decision and why;
# 3. takes its share of the tokens — the batch is drawn from the shared seed exactly as `moe-lit run` draws it, so
#    both commands see the same tokens — and routes them with the layer's router (EPLB: each logical id then goes to
#    one of its physical replicas);
# 4. runs `ModularKernel(make_distributed_prepare_finalize(...), the layer's experts and shared experts)` on the
#    layer's weights and gets its own tokens' output. Only the prepare/finalize differs from the layer's own forward.
#
# Every rank gathers every rank's output and routing (on the CPU); rank 0 computes the single-process result the
# way EP emulation (`12_layer.run_emulated_ep`, every rank in one process) does
# (`12_layer.reference_by_global_id`: the Standard path over the experts the tokens reach, a few at a time from the
# weight source by global id, into an fp32 accumulator, and the same in float64) from the routing the ranks used. It then checks the distributed output against both, with the package's one
# `assert_close` policy.

# %%
#| export
def split_tokens(num_tokens: int,   # tokens in the whole batch
                 num_ranks: int,    # ranks sharing it
                ) -> list:          # tokens of each rank
    """Split a batch over ranks as evenly as possible, the first `num_tokens % num_ranks` ranks taking one more.
    ValueError from `check_int` naming `num_tokens` (not an int >= 0) or `num_ranks` (not an int >= 1). Source: the
    split of `torch.tensor_split` (the first `n % k` sections one larger), the rule linear placement follows."""
    check_int("num_tokens", num_tokens, lo=0); check_int("num_ranks", num_ranks, lo=1)
    base, rem = divmod(num_tokens, num_ranks)
    return [base + (r < rem) for r in range(num_ranks)]

# %%
#| test split_tokens
test_eq(split_tokens(11, 4), [3, 3, 3, 2])
test_eq(split_tokens(1, 3), [1, 0, 0])
test_eq(split_tokens(0, 2), [0, 0])
test_fail(lambda: split_tokens(-1, 2), contains="num_tokens: expected >= 0, got -1")
test_fail(lambda: split_tokens(4, 0), contains="num_ranks: expected >= 1, got 0")

# %%
#| export
@dataclass
class DistributedRun:
    """What `run_distributed` returns on every rank; the references and the report on rank 0 only.
    Raises nothing: a plain dataclass, its fields are not checked (`run_distributed` fills them). Source: moe-lit's own
    (no counterpart in vLLM)."""
    config: MoEConfig                       # this rank's config
    placement: Placement                    # this rank's placement
    token_counts: list                      # tokens of each rank
    output_local: torch.Tensor              # [T_rank, H] config.dtype: this rank's tokens' output
    rank_stats: list                        # per rank: what its prepare moved, weights_s and forward_s (seconds)
    experts: tuple = ("torch", "")          # (implementation, reason)
    prepare_finalize: str = ""              # class name of the prepare/finalize
    quant: str = "unquantized"              # the experts' weight scheme (full name)
    dispatch_quant: tuple = (None, "")      # (block or None, reason): FP8 on the wire or not, and why
    output: torch.Tensor | None = None          # [T, H] config.dtype, every rank's output in rank order (CPU)
    topk_weights: torch.Tensor | None = None    # [T, top_k] fp32, every rank's router weights
    topk_ids: torch.Tensor | None = None        # [T, top_k] int64, the logical ids every rank routed to
    single_device: torch.Tensor | None = None   # rank 0: [T, H] config.dtype, the single-process result
    reference: torch.Tensor | None = None       # rank 0: [T, H] float64 (the dequantized weights, when quantized)
    reference_unquantized: torch.Tensor | None = None   # rank 0, quantized runs: [T, H] float64, the float weights
    report: dict | None = None                  # rank 0: JSON-ready report

# %%
#| export
def _tokens(config: MoEConfig, num_tokens: int, seed: int) -> torch.Tensor:
    "The batch `[num_tokens, H]` in config.dtype on the CPU, drawn as `moe-lit run` draws it (seed + 7)."
    return torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 7)).to(config.dtype)

def _route(cfg: MoEConfig, weights: RandomExpertWeights, hidden: torch.Tensor):
    "The single-process routing of rank 0's check: `(topk_weights fp32, logical topk_ids int64)`, `[T, top_k]`, by the spec."
    r = {k: t.to(hidden.device) for k, t in weights.router().items()}
    logits = router_logits(hidden, r["gate"], r.get("gate_bias"))
    wts, ids = select_experts(cfg, logits, r.get("e_score_correction_bias"))
    return wts, ids.long()

# %%
#| export
def _single_process(config: MoEConfig, weights: RandomExpertWeights, hidden: torch.Tensor, wts, ids,
                    quant: str = "unquantized", kernels_spec: bool = False):
    """`(single [T, H] config.dtype, reference [T, H] float64, unquantized [T, H] float64 or None, kernels' spec
    [T, H] float64 or None)`: every expert by global id (`12_layer`; quantized: its dequantized weights, the float
    ones for the third, the Triton quantized experts' spec for the fourth when `kernels_spec`), then the shared ones."""
    T = hidden.shape[0]
    single = torch.zeros(T, config.hidden_size, dtype=acc_dtype(config.dtype))
    ref = torch.zeros(T, config.hidden_size, dtype=torch.float64)
    ref_float = None if quant == "unquantized" else torch.zeros_like(ref)
    ref_kernels = torch.zeros_like(ref) if kernels_spec else None
    reference_by_global_id(config, weights, hidden, wts, ids, single, ref, quant, ref_float, ref_kernels)
    shared = weights.shared()
    if shared is not None:
        sh = SharedExperts(**shared)
        single += sh(hidden).to(single.dtype); ref += (shared_ref := sh(hidden.double()))
        for r in (ref_float, ref_kernels):
            if r is not None: r += shared_ref
    return single.to(config.dtype), ref, ref_float, ref_kernels

# %%
#| export
def run_distributed(config: MoEConfig,                 # the model on its deployment: parallel.ep_size = world size
                    num_tokens: int = 64,              # tokens in the whole batch, split over the ranks
                    placement: str | None = None,      # requested placement: 'linear' or 'round_robin' (None: linear)
                    seed: int = 0,                     # seed of the weights and the tokens (shared by every rank)
                    experts: str = "auto",             # 'auto', 'torch' or 'triton'
                    token_counts: list | None = None,  # tokens of each rank (sum = num_tokens); None: split_tokens
                    max_num_tokens_per_rank: int | None = None,   # batched capacity; None: config.max_num_tokens
                    group=None,                        # the EP group (None: the default group)
                    quant: str = "unquantized",        # experts' scheme, quantized at load (short names: 'fp8', ...)
                   ) -> DistributedRun:
    """The main job on every rank of `group`; rank 0 gathers the output and checks it against the single-process result
    (float64, and for the Triton quantized experts their own spec). Returns a `DistributedRun` on every rank, its
    references and report on rank 0. A collective: every rank calls it with the same arguments, in a process group
    that exists (`13a_transport.init_distributed`; under NCCL each rank on its own GPU, `torch.cuda.set_device`, as
    `init_distributed` sets it). ValueError, on every rank alike, naming the argument for a bad config (experts that
    are not SiLU-gated without biases: gpt-oss), token counts (`num_tokens` in [0, 65536]), `seed` (in [0, 2^40]),
    placement, experts or `quant`, ranks that disagree, or a capacity overflow. Source: moe-lit's own job (`moe-lit run` across processes); the dispatch and
    combine follow vLLM's all2all backends (`13a_transport`)."""
    rank, S, counts = _check_run_args(config, num_tokens, seed, token_counts, group)   # the same answer on every rank
    device, cfg, t0 = group_device(group), rank_config(config, rank), time.perf_counter()
    weights, quant = RandomExpertWeights(config, seed), quant_scheme_name(quant)
    layer = FusedMoE(cfg, weights, "linear" if placement is None else placement, experts=experts, device=device,
                     quant=quant)                           # its experts (quantized at load), router, tables
    hidden_all = _tokens(config, num_tokens, seed)
    hidden = hidden_all[sum(counts[:rank]):sum(counts[:rank + 1])].to(device)
    wts, ids = layer.route(hidden)                          # EPLB: physical ids, one replica per logical choice
    logical = ids.long() % config.num_experts               # physical p is a copy of logical p % num_experts
    wire = dispatch_quantization(cfg, layer.experts, layer.qweights, across_processes=True)   # FP8 rows, or not: why
    pf = make_distributed_prepare_finalize(cfg, group, max_num_tokens_per_rank, quant_block=wire[0])
    place, impl = layer.placement, (layer.experts, layer.experts_reason)
    mk, t1 = ModularKernel(pf, make_experts(pf, layer.experts), layer.shared_experts), time.perf_counter()
    stages = {}                                             # dispatch (prepare), experts, combine (finalize) seconds
    w13, w2 = (layer.qweights, None) if layer.experts == "triton_quant" else (layer.w13, layer.w2)
    out = mk(hidden, w13, w2, wts, ids, place, cfg.apply_router_weight_on_input, timings=stages,
             w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, activation=layer.activation)
    if device.type == "cuda": torch.cuda.synchronize()
    stats = dict(pf.stats, weights_s=t1 - t0, forward_s=time.perf_counter() - t1, **stages)
    run = DistributedRun(cfg, place, counts, out, [None] * S, impl, type(pf).__name__, quant, wire)
    dist.all_gather_object(run.rank_stats, stats, group=group)
    run.output, run.topk_weights, run.topk_ids = (all_gather_rows(t, counts, group).cpu() for t in (out, wts, logical))
    if rank == 0: _finish_on_rank0(run, config, weights, hidden_all, placement, seed, dist.get_backend(group), device)
    return run

# %%
#| export
def _check_run_args(config, num_tokens, seed, token_counts, group) -> tuple[int, int, list]:
    "`(rank, world size, tokens of each rank)` after checking the arguments of `run_distributed`."
    rank, S = config_rank_in_group(config, group)
    if config.activation != "silu" or config.has_expert_bias:   # gpt-oss's experts run in FusedMoE / run_emulated_ep
        raise ValueError(f"config: expected SiLU experts without biases across processes, got activation "
                         f"{config.activation!r}, has_expert_bias={config.has_expert_bias}")
    check_int("num_tokens", num_tokens, lo=0, hi=65537); check_int("seed", seed, lo=0, hi=2**40)
    counts = split_tokens(num_tokens, S) if token_counts is None else _check_token_counts(token_counts, num_tokens, S)
    seen = [None] * S
    dist.all_gather_object(seen, (num_tokens, counts, seed), group=group)     # every rank must agree, or all raise
    if any(x != seen[0] for x in seen):
        raise ValueError(f"token_counts: expected the same (num_tokens, token_counts, seed) on every rank, got {seen}")
    return rank, S, counts

def _check_token_counts(token_counts, num_tokens: int, num_ranks: int) -> list:
    "`token_counts` as a list of `num_ranks` ints >= 0 summing to `num_tokens`."
    if not isinstance(token_counts, (list, tuple)) or len(token_counts) != num_ranks:
        raise ValueError(f"token_counts: expected a list of {num_ranks} ints (one per rank), got {token_counts!r}")
    counts = [check_int("token_counts[r]", n, lo=0) for n in token_counts]
    if sum(counts) != num_tokens: raise ValueError(f"token_counts: expected a sum of num_tokens={num_tokens}, got {counts}")
    return counts

# %% [markdown]
# On rank 0 the run is checked and reported. For the batched format, the slab layout each rank really received is also
# compared with `slab_sources` computed from the ids the ranks dispatched — `13_dispatch_plan`'s figure is the real dispatch.

# %%
#| export
def _finish_on_rank0(run: DistributedRun, config, weights, hidden_all, placement, seed, backend, device) -> None:
    "Rank 0: the single-process result, the checks and the report, stored in `run`."
    t0, S, cfg = time.perf_counter(), len(run.token_counts), run.config
    run.single_device, run.reference, run.reference_unquantized, spec = _single_process(
        config, weights, hidden_all, run.topk_weights, run.topk_ids, run.quant, kernels_spec_holds(run.quant, run.experts[0]))
    q = (run.quant, run.experts[0])                                 # w8a8 kernels round activations; references do not
    batched = cfg.activation_format is ActivationFormat.BatchedExperts
    slabs_ok = None
    if batched:
        places = [Placement.build(rank_config(config, r), "linear" if placement is None else placement) for r in range(S)]
        want = slab_sources(places, [s["topk_ids"] for s in run.rank_stats], run.rank_stats[0]["slab_source"].shape[1] // S)
        slabs_ok = all(torch.equal(w, s["slab_source"]) for w, s in zip(want, run.rank_stats))
    routed_here = _route(config, weights, hidden_all)[1]            # the whole batch routed in one process
    run.report = {"model": config.name, "world_size": S, "process_group": backend, "device": str(device),
                  "all2all_backend": cfg.backend.name, "activation_format": cfg.activation_format.value,
                  "transport": transport_note(cfg), "prepare_finalize": run.prepare_finalize,
                  "experts": {"implementation": run.experts[0], "reason": run.experts[1], "quant": run.quant},
                  "dispatch_quant": None if run.dispatch_quant[0] is None else list(run.dispatch_quant[0]),
                  "dispatch_quant_note": run.dispatch_quant[1],
                  "wire_bytes_per_pair": run.rank_stats[0].get("wire_bytes_per_pair"),     # all-to-all: a pair's row
                  "wire_bytes_per_token": run.rank_stats[0].get("wire_bytes_per_token"),   # all-gather: a token's row
                  "wire_width": run.rank_stats[0].get("wire_width"),          # columns a row travels with (padding)
                  "hidden_size": config.hidden_size,
                  "placement": placement_record(placement, run.placement),
                  "num_tokens": sum(run.token_counts), "tokens_per_rank": run.token_counts, "seed": seed,
                  "pairs_sent_per_rank": [s["pairs_sent"] for s in run.rank_stats],
                  "pairs_received_per_rank": [s["pairs_received"] for s in run.rank_stats],
                  "expert_num_tokens_per_rank": [s["expert_num_tokens"] for s in run.rank_stats] if batched else None,
                  "slab_layout_matches_emulation": slabs_ok,
                  "routing_same_as_single_process": bool(torch.equal(routed_here, run.topk_ids)),
                  "check": {"distributed_vs_float64": check_output(run.output, run.reference, config.dtype, *q),
                            "single_process_vs_float64": check_output(run.single_device, run.reference, config.dtype),
                            "distributed_vs_single_process": check_output(run.output, run.single_device.double(), config.dtype,
                                                                          *q, between_runs=True),
                            "distributed_vs_kernel_spec": None if spec is None else   # activations rounded as the
                                check_spec_output(run.output, spec, run.quant)},         # kernels do: their tests' bound
                  "quantization_error": quantization_error(run.output, run.reference_unquantized, config.dtype),
                  "timing": {"weights_s_per_rank": [s["weights_s"] for s in run.rank_stats],
                             "forward_s_per_rank": [s["forward_s"] for s in run.rank_stats],
                             **{f"{k}_per_rank": [s.get(k) for s in run.rank_stats]
                                for k in ("prepare_s", "experts_s", "finalize_s")},
                             "reference_s": time.perf_counter() - t0}}

# %% [markdown]
# ## The torchrun entry point
#
# `main` is what `torchrun ... -m moe_lit.distributed` runs on every process: a few options, the model from the
# presets (or any Hugging Face `config.json` with `--config`: a tiny one makes a quick multi-process run on a CPU), the
# deployment `--ep N` data-parallel ranks with EP on (`N` = the number of processes). Across processes the experts
# must be SiLU-gated without biases: the gpt-oss presets are refused (exit 2; `12_layer.run_emulated_ep` runs them in
# one process). EPLB replicas are not a flag here (`run_distributed` takes a config with them from Python).
# `--max-tokens-per-rank` sizes the batched format's slabs (NIXL EP, DeepEP low-latency) and is ignored by the
# Standard-format backends.
#
# **Running it.** `torchrun` starts the processes and sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
# `MASTER_PORT`, which `13a_transport.init_distributed` reads: NCCL with one GPU a process (`cuda:LOCAL_RANK`) where
# CUDA is visible, gloo on CPUs otherwise; without those variables it makes a one-process group. On two CPU processes:
#
# ```sh
# .venv/bin/torchrun --nproc-per-node 2 -m moe_lit.distributed --model qwen3-30b-a3b --all2all nixl_ep
# ```
#
# prints rank 0's report (`15b_report.format_distributed_report`; `13c_launch`, *A run, and its report*, shows one).
# From Python, in each process: `rank, world, device = init_distributed()`, then
# `run_distributed(preset("qwen3-30b-a3b", ParallelConfig.make(1, world, enable_expert_parallel=True,
# all2all_backend="nixl_ep")), num_tokens=64)`, whose `.report` rank 0 holds; `run_job(...)` is the same with the
# command's checks and exit status, and it destroys the process group when it ends (the one it joined, or the
# caller's). Exit status: 0, 1 when a check fails (rank 0 says which), 2 on bad input: every rank checks the same
# arguments, so each refuses them alike; an error in joining the group (a bad `LOCAL_RANK`, say) can be one rank's.

# %%
#| export
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m moe_lit.distributed",
                                 description="The moe-lit main job on N processes (one EP rank each).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                     help="a built-in preset (SiLU experts without biases: not the gpt-oss ones)")
    src.add_argument("--config", default=None, help="a Hugging Face config.json (file or checkpoint directory) instead of --model")
    ap.add_argument("--ep", type=int, default=None, help="EP ranks; must equal the number of processes; None: that number")
    ap.add_argument("--all2all", default=None, choices=list(BACKENDS),
                    help="all2all backend; None: allgather_reducescatter with more than one rank, else none")
    ap.add_argument("--placement", default=None, choices=["linear", "round_robin"], help="expert placement; None: linear")
    ap.add_argument("--tokens", type=int, default=64, help="tokens in the whole batch, split over the ranks")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokens")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="None: the model's own")
    ap.add_argument("--experts", default="auto", choices=["auto", "triton", "torch"], help="auto: Triton on a GPU")
    ap.add_argument("--quant", default="unquantized", choices=["unquantized", *QUANT_SCHEMES, *QUANT_ALIASES],
                    help="quantize the experts at load (fp8 = fp8_w8a8_block: with Triton experts, "
                         + ", ".join(n for n, d in BACKENDS.items() if d.quantizes_before_dispatch)
                         + " send the rows as FP8 with their scales)")
    ap.add_argument("--max-tokens-per-rank", type=int, default=None,
                    help="batched capacity (nixl_ep, deepep_low_latency; the others ignore it); None: the model's")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait for its peers")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap

# %%
#| export
def run_job(model: str = DEFAULT_PRESET,          # a preset
            ep: int | None = None,                 # EP ranks; None: the number of processes (which it must equal)
            all2all: str | None = None,            # None: allgather_reducescatter with more than one rank, else none
            placement: str | None = None,          # 'linear' or 'round_robin'; None: linear
            tokens: int = 64,                      # tokens in the whole batch (>= 1), split over the ranks
            seed: int = 0,                         # seed of the weights and the tokens
            dtype: str | None = None,              # 'bf16', 'fp16', 'fp32'; None: the model's own
            experts: str = "auto",                 # 'auto', 'torch' or 'triton'
            max_tokens_per_rank: int | None = None,   # batched capacity (tokens a rank); None: the model's
            timeout: float = 600.0,                # seconds a collective may wait for its peers
            as_json: bool = False,                 # rank 0 prints the report as JSON, not as text
            config: str | None = None,             # a config.json (file or directory) instead of `model`
            quant: str = "unquantized") -> int:    # the experts' scheme (a QUANT_SCHEMES name or short name)
    """The main job on this process's rank (what `main` and `moe-lit run --distributed` call); rank 0 prints the report.
    Joins the process group from torchrun's variables (`init_distributed`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT; NCCL where CUDA is visible, else gloo; one process without them) and destroys it at the end, a
    caller's too. Returns 0, 1 when a check fails (rank 0), or 2 on bad input: a ValueError from joining the group or
    from the job is printed to stderr naming the flag (`--timeout`, `--tokens` up to 65536, `--ep`, ...) and not
    raised. Other errors (a peer that
    dies, a collective's timeout) propagate. Source: moe-lit's own (what torchrun runs on each rank)."""
    use_triton_interpreter_without_gpu()                # before any kernel module is imported
    try: rank, world, _ = init_distributed(timeout)
    except ValueError as e:                             # the flag's name, not the function's argument
        print(f"moe-lit distributed: error: {str(e).replace('timeout_s:', '--timeout:', 1)}", file=sys.stderr); return 2
    try:
        check_int("num_tokens", tokens, lo=1)           # a job runs a batch (as `moe-lit run`); the function takes 0
        ep = world if ep is None else ep
        if ep != world: raise ValueError(f"--ep: expected the number of processes ({world}), got {ep}")
        all2all = all2all or ("allgather_reducescatter" if ep > 1 else "none")
        par = ParallelConfig.make(1, ep, enable_expert_parallel=ep > 1, all2all_backend=all2all)
        cfg = preset(model, par) if config is None else moe_config_from_hf(config, par)
        if dtype: cfg = cfg.replace(dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            check_choice("--dtype", dtype, ("bf16", "fp16", "fp32"))])
        run = run_distributed(cfg, tokens, placement, seed, experts, max_num_tokens_per_rank=max_tokens_per_rank,
                              quant=quant)
    except ValueError as e:                             # every rank says it: torchrun may stop the others first
        from moe_lit.cli import _flag_error             # the argument as its flag, as `moe-lit run` says it
        name, _, rest = str(e).partition(": ")
        msg = f"--max-tokens-per-rank: {rest}" if name == "max_num_tokens_per_rank" else _flag_error(e)
        sys.stderr.write(f"moe-lit distributed: rank {rank}: error: {msg}\n"); sys.stderr.flush()   # one write: no interleaving
        dist.destroy_process_group(); return 2
    status = 0
    if rank == 0:
        print(json.dumps(run.report, indent=1) if as_json else format_distributed_report(run.report), flush=True)
        status = 0 if all(c["ok"] for c in run.report["check"].values() if c is not None) else 1
    dist.destroy_process_group()
    return status

def main(argv: list | None = None) -> int:
    """`torchrun --nproc-per-node N -m moe_lit.distributed ...`: the main job on N processes; rank 0 prints the report.
    A bad flag or choice raises SystemExit(2) from argparse (`--help`: SystemExit(0)); otherwise `run_job`'s status.
    Source: argparse for the options; torchrun (torch.distributed.run) for the environment each process gets."""
    a = _parser().parse_args(argv)
    return run_job(a.model, a.ep, a.all2all, a.placement, a.tokens, a.seed, a.dtype, a.experts, a.max_tokens_per_rank,
                   a.timeout, a.json, a.config, a.quant)

# %%
#| export
#| eval: false
if __name__ == "__main__": sys.exit(main())

# %% [markdown]
# The command's `--quant` takes the default it shows, and its help names the backends that send FP8 rows from the
# descriptor table (a backend added there is named here with no edit).

# %%
#| test distributed_quant_flag
test_eq(_parser().parse_args(["--quant", "unquantized"]).quant, "unquantized")
test_eq(_parser().parse_args([]).quant, "unquantized")
_help = " ".join(_parser().format_help().split())
_quant_help = _help.split("quantize the experts at load", 1)[1].split("--max-tokens-per-rank")[0]
for _name, _d in BACKENDS.items(): test_eq(_name in _quant_help, _d.quantizes_before_dispatch)

# %% [markdown]
# The job on a config.json instead of a preset, in this process as a group of one (the multi-process runs are
# `13c_launch`'s tests): the report names the file's model and its checks pass; a bad key in the file is refused by
# name, on every rank.

# %%
#| test run_job_with_a_config
if not dist.is_initialized() and not any(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
    with tempfile.TemporaryDirectory() as d:
        cfg_json = {"model_type": "qwen3_moe", "_name_or_path": "tiny-qwen3", "hidden_size": 64,
                    "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}
        Path(d, "config.json").write_text(json.dumps(cfg_json))
        with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(run_job(config=d, tokens=6, experts="torch"), 0)
        assert "tiny-qwen3 on 1 process" in out.getvalue() and "distributed vs float64: ok" in out.getvalue(), out.getvalue()
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(run_job(config=d, tokens=0, experts="torch"), 2)
        assert "--tokens: expected >= 1, got 0" in err.getvalue(), err.getvalue()
        Path(d, "config.json").write_text(json.dumps({**cfg_json, "num_experts_per_tok": 9}))
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(run_job(config=d, tokens=6), 2)
        assert "config.json num_experts_per_tok (top_k)" in err.getvalue(), err.getvalue()
        with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(run_job(config=str(Path(d, "none.json"))), 2)
        assert "error: --config: expected an existing config.json" in err.getvalue(), err.getvalue()
        Path(d, "config.json").write_text(json.dumps(cfg_json))
        with contextlib.redirect_stderr(io.StringIO()) as err:                   # a layer's argument, named as a flag
            test_eq(run_job(config=d, tokens=6, experts="triton", quant="fp8", dtype="fp32"), 2)
        assert "rank 0: error: --quant: expected a bf16 or fp16 layer" in err.getvalue(), err.getvalue()
    test_eq(dist.is_initialized(), False)                           # the job left no process group behind
else: raise AssertionError("expected a process outside torchrun (no RANK/WORLD_SIZE/MASTER_* and no process group)")
