# %%
#| default_exp cli

# %% [markdown]
# # Command line
# > `moe-lit run` builds a real model's MoE layer on a deployment and reports every decision, the load, the check against float64 and the time; `moe-lit tables` prints the placement tables.

# %%
#| export
from __future__ import annotations
import argparse, json, math, sys, time
from dataclasses import asdict
import torch
from moe_lit.terms import check_int
from moe_lit.config import BACKENDS, MoEConfig, ParallelConfig
from moe_lit.models import PRESETS, preset, moe_config_from_hf
from moe_lit.routing import expert_load
from moe_lit.placement import Placement
from moe_lit.layer import run_emulated_ep, rank_config
from moe_lit.testing import assert_close, tolerance

# %%
#| hide
from fastcore.test import test_eq, test_fail
import io, contextlib, json, tempfile
from pathlib import Path

# %% [markdown]
# In this notebook: `build_config` (model + deployment from the command line), `run_report` (the main job, as a
# dict), `format_report` (the same as text), `tables_report`, and `main`, the `moe-lit` entry point. A **how-to**
# page.
#
# ## From arguments to a config
#
# `--ep N` is the number of expert-parallel ranks (devices). They are deployed as vLLM deploys wide EP: `N / tp`
# data-parallel ranks of `tp` devices each with expert parallelism on, so `ParallelConfig.make` flattens them into an
# EP group of `N`. With `--tp N --ep N` (one DP rank) there is no all2all at all — TP+EP masks with `expert_map` and the
# backend's format does not apply, which the report explains.

# %%
#| export
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def build_config(model: str | None = "qwen3-30b-a3b", config_path: str | None = None, ep: int = 1, tp: int = 1,
                 all2all: str = "none", dtype: str = "bf16") -> MoEConfig:
    "The MoE config of a preset `model` (or an HF `config_path`) deployed on `ep` EP ranks of `tp`-way TP groups."
    check_int("ep", ep, lo=1); check_int("tp", tp, lo=1)
    if ep % tp: raise ValueError(f"tp: expected a divisor of ep={ep}, got {tp}")
    if dtype not in DTYPES: raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    par = ParallelConfig.make(tp_size=tp, dp_size=ep // tp, enable_expert_parallel=ep > 1, all2all_backend=all2all)
    if config_path is not None: cfg = moe_config_from_hf(config_path, parallel=par)
    else: cfg = preset(model, parallel=par)
    cfg = cfg.replace(dtype=DTYPES[dtype])
    return cfg

# %%
#| test build_config
cfg = build_config("deepseek-v3", ep=8, all2all="nixl_ep")
test_eq((cfg.num_experts, cfg.ep_size, cfg.use_batched_activation_format), (256, 8, True))
test_eq(build_config("deepseek-v3", ep=8, tp=8, all2all="nixl_ep").use_batched_activation_format, False)  # TP+EP
test_fail(lambda: build_config("nope"), contains="expected one of")
test_fail(lambda: build_config(ep=6, tp=4), contains="tp: expected a divisor of ep=6, got 4")
test_fail(lambda: build_config(dtype="fp8"), contains="dtype: expected one of ['bf16', 'fp16', 'fp32'], got 'fp8'")
test_fail(lambda: build_config(all2all="pplx", ep=2), contains="all2all_backend: expected one of")

# %% [markdown]
# ## The main job
#
# `run_report` runs the deployment with `run_emulated_ep` and collects the report as plain data (JSON-ready): the
# model, the resolved parallel config with the reason for every property, the backend's record, the placement and
# routing tables, the per-expert load, the checks and the time. Long tables are abridged for large `num_experts`.

# %%
#| export
def _abridge(xs, keep: int = 16) -> list:
    "`xs` as a list, with the middle replaced by '...' when longer than `keep`."
    xs = [x.item() if hasattr(x, "item") else x for x in xs]
    return xs if len(xs) <= keep else xs[: keep // 2] + ["..."] + xs[-keep // 4:]

def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    "max |a - b| / max |b| (0 for an all-zero b)."
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300) if b.numel() else 0.0

# %%
#| export
def _check(actual, reference, dtype) -> dict:
    try: assert_close(actual, reference, dtype=dtype); ok, msg = True, ""
    except AssertionError as e: ok, msg = False, str(e)
    return {"max_rel_err": _max_rel(actual, reference), "rtol": tolerance(dtype), "ok": ok, "detail": msg}

def _placement_rows(run) -> dict:
    p0 = run.placements[0]
    tables = None
    if p0.global_to_physical is not None:
        tables = {"global_to_physical": _abridge(p0.global_to_physical), "physical_to_global": _abridge(p0.physical_to_global)}
    return {"strategy": p0.strategy, "reason": p0.reason,
            "ranks": [{"rank": r, "num_local_experts": p.num_local_experts, "local_to_global": _abridge(p.local_to_global)}
                      for r, p in enumerate(run.placements)],
            "expert_map_rank0": None if p0.expert_map is None else _abridge(p0.expert_map),
            "routing_tables": tables}

# %%
#| export
def run_report(config: MoEConfig, num_tokens: int = 64, placement: str = "linear", seed: int = 0,
               tp_size: int = 1, experts: str = "auto", device: str = "cpu") -> dict:
    "Run the main job on `num_tokens` random tokens and return the report as JSON-ready data."
    check_int("num_tokens", num_tokens, lo=1); check_int("seed", seed, lo=0)
    t0 = time.perf_counter()
    hidden = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 7))
    hidden = hidden.to(device=device, dtype=config.dtype)
    run = run_emulated_ep(config, hidden, seed=seed, placement=placement, tp_size=tp_size, experts=experts)
    load = expert_load(run.topk_ids.cpu(), config.num_experts)
    per_rank = [int(load[p.local_to_global.cpu()].sum()) for p in run.placements]
    fwd = sum(run.rank_seconds)
    c = run.config
    return {
        "model": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
                  for k, v in asdict(config).items() if k != "parallel"},
        "deployment": {"ep_size": c.ep_size, "tp_per_dp_rank": tp_size, "dp_size": c.parallel.dp_size,
                       "all2all_backend": c.parallel.all2all_backend, "num_tokens": num_tokens},
        "backend": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else getattr(v, "value", v))
                    for k, v in asdict(c.backend).items()},
        "properties": [{"property": p, "value": v, "reason": r} for p, v, r in c.parallel.explain()],
        "experts": {"implementation": run.experts[0], "reason": run.experts[1], "device": str(hidden.device)},
        "placement": {"requested": placement, **_placement_rows(run)},
        "load": {"per_expert": _abridge(load, 32), "min": int(load.min()), "max": int(load.max()),
                 "mean": float(load.float().mean()), "empty_experts": int((load == 0).sum()),
                 "hottest": [[int(e), int(load[e])] for e in load.argsort(descending=True, stable=True)[:5]],
                 "per_rank": per_rank},
        "check": {"vs_float64": _check(run.output, run.reference, config.dtype),
                  "single_device_vs_float64": _check(run.single_device, run.reference, config.dtype),
                  "ep_vs_single_device": None if c.ep_size == 1 else
                      _check(run.output, run.single_device.double(), config.dtype)},
        "timing": {"forward_s": fwd, "tokens_per_s": num_tokens / fwd if fwd else float("inf"),
                   "per_rank_forward_s": [round(s, 4) for s in run.rank_seconds],
                   "weights_s": run.weight_seconds, "total_s": time.perf_counter() - t0},
    }

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
test_eq(rep["placement"]["strategy"], "round_robin")
test_eq(rep["placement"]["routing_tables"]["global_to_physical"][:4], [0, 4, 8, 12])
assert rep["check"]["vs_float64"]["ok"] and rep["check"]["ep_vs_single_device"]["ok"]
test_eq(sum(rep["load"]["per_rank"]), 12 * 4)
json.dumps(rep)                                                                  # the report is JSON-ready
ungrouped = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, parallel=par)
rep = run_report(ungrouped, num_tokens=4, placement="round_robin")
test_eq(rep["placement"]["strategy"], "linear"); assert "group" in rep["placement"]["reason"]

# %% [markdown]
# ## The report as text

# %%
#| export
def _verdict(c: dict | None) -> str:
    if c is None: return "n/a (one rank)"
    return f"max rel err {c['max_rel_err']:.2e} (rtol {c['rtol']:g}) {'OK' if c['ok'] else 'FAIL: ' + c['detail']}"

def _section_model(r: dict) -> list[str]:
    m, d, b = r["model"], r["deployment"], r["backend"]
    return [f"moe-lit run: {m['name'] or 'custom model'} MoE layer, {d['num_tokens']} tokens, {m['dtype']}, "
            f"{d['ep_size']} EP rank(s) ({d['dp_size']} DP x {d['tp_per_dp_rank']} TP), all2all {d['all2all_backend']!r}",
            "", "model",
            f"  num_experts={m['num_experts']} top_k={m['top_k']} hidden_size={m['hidden_size']} "
            f"intermediate_size={m['intermediate_size']} num_shared_experts={m['num_shared_experts']}",
            f"  routing={m['routing_method']} scoring_func={m['scoring_func']} renormalize={m['renormalize']} "
            f"num_expert_group={m['num_expert_group']} topk_group={m['topk_group']} "
            f"routed_scaling_factor={m['routed_scaling_factor']} correction_bias={m['has_correction_bias']}",
            "", f"backend {b['name']!r}: {b['summary']}",
            "  " + " ".join(f"{k}={v}" for k, v in b.items() if k not in ("name", "summary"))]

def _section_properties(r: dict) -> list[str]:
    w = max(len(p["property"]) for p in r["properties"])
    e = r["experts"]
    return ["", "parallel config properties (rank 0)"] + [
        f"  {p['property']:<{w}}  {str(p['value']):<15}  {p['reason']}" for p in r["properties"]] + [
        "", f"experts: {e['implementation']} on {e['device']} ({e['reason']})"]

# %%
#| export
def _section_placement(r: dict) -> list[str]:
    p = r["placement"]
    out = ["", f"placement {p['strategy']} (requested {p['requested']}: {p['reason']})"]
    ranks = p["ranks"] if len(p["ranks"]) <= 8 else p["ranks"][:4] + p["ranks"][-2:]
    out += [f"  rank {q['rank']}: {q['num_local_experts']} local experts, local_to_global {q['local_to_global']}"
            for q in ranks]
    out.append(f"  expert_map (rank 0): {p['expert_map_rank0']}")
    t = p["routing_tables"]
    out += ["  routing tables: not used (linear placement or a backend without physical ids)"] if t is None else [
        f"  global_to_physical: {t['global_to_physical']}", f"  physical_to_global: {t['physical_to_global']}"]
    return out

def _section_load_check_time(r: dict) -> list[str]:
    l, c, t = r["load"], r["check"], r["timing"]
    return ["", f"load (token-slots per expert): min {l['min']}, mean {l['mean']:.2f}, max {l['max']}, "
                f"{l['empty_experts']} experts empty; hottest (expert, slots) {l['hottest']}",
            f"  per rank: {l['per_rank']}", f"  per expert: {l['per_expert']}",
            "", "check", f"  output vs float64 reference:         {_verdict(c['vs_float64'])}",
            f"  single-device vs float64 reference:  {_verdict(c['single_device_vs_float64'])}",
            f"  EP sum over ranks vs single device:  {_verdict(c['ep_vs_single_device'])}",
            "", f"time: forward {t['forward_s']:.3f} s over all ranks ({t['tokens_per_s']:.1f} tokens/s), "
                f"per rank {t['per_rank_forward_s']} s; weights generated in {t['weights_s']:.2f} s; "
                f"total {t['total_s']:.2f} s"]

def format_report(report: dict) -> str:
    "The report of `run_report` as text."
    return "\n".join(_section_model(report) + _section_properties(report) + _section_placement(report)
                     + _section_load_check_time(report))

# %%
#| test format_report
small = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, name="tiny")
text = format_report(run_report(small, num_tokens=6))
for part in ("backend 'none'", "use_batched_activation_format", "placement linear", "output vs float64 reference",
             "tokens/s", "n/a (one rank)"):
    assert part in text, part

# %% [markdown]
# ## Placement tables
#
# `tables_report` prints, for every rank of a deployment, its local experts, its `expert_map` and — when the backend
# addresses experts by physical id and the placement is round robin — the routing tables. It builds no weights.

# %%
#| export
def tables_report(config: MoEConfig, placement: str = "linear", tp_size: int = 1) -> str:
    "Text of every rank's placement for `config`'s deployment: local experts, expert_map, routing tables."
    lines = []
    for r in range(config.ep_size):
        p = Placement.build(rank_config(config, r, tp_size), strategy=placement)
        if r == 0:
            lines += [f"{config.name or 'model'}: {config.num_experts} experts on {config.ep_size} rank(s), "
                      f"backend {config.parallel.all2all_backend!r}, placement {p.strategy} ({p.reason})"]
            if p.global_to_physical is not None:
                lines += [f"global_to_physical: {p.global_to_physical.tolist()}",
                          f"physical_to_global: {p.physical_to_global.tolist()}"]
        lines += [f"rank {r}: local_to_global {p.local_to_global.tolist()}",
                  f"        expert_map {None if p.expert_map is None else p.expert_map.tolist()}"]
    return "\n".join(lines)

# %%
#| test tables_report
cfg = build_config("deepseek-v3", ep=2, all2all="nixl_ep")
text = tables_report(cfg.replace(num_experts=8, num_expert_group=2, topk_group=1), placement="round_robin")
assert "global_to_physical: [0, 4, 1, 5, 2, 6, 3, 7]" in text and "rank 1: local_to_global [1, 3, 5, 7]" in text

# %% [markdown]
# ## The entry point

# %%
#| export
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-lit", description="Mixture-of-Experts layers with expert parallelism.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "build a model's MoE layer on a deployment and report every decision and check"),
                        ("tables", "print the placement and routing tables of a deployment")):
        p = sub.add_parser(name, help=help_)
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(PRESETS), help="a built-in preset")
        src.add_argument("--config", help="a Hugging Face config.json (file or directory) instead of --model")
        p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (devices)")
        p.add_argument("--tp", type=int, default=1, help="TP size inside each DP rank (--tp = --ep: TP+EP, no all2all)")
        p.add_argument("--all2all", default="none", choices=list(BACKENDS), help="all2all backend")
        p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
        p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
        if name == "run":
            p.add_argument("--experts", default="auto", choices=["auto", "triton", "torch"],
                           help="experts implementation: auto = Triton on a GPU, the torch reference otherwise")
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="where the layer runs (auto: cuda when a GPU is present)")
            p.add_argument("--tokens", type=int, default=64, help="tokens in the batch")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--json", action="store_true", help="print the report as JSON")
    b = sub.add_parser("bench", help="benchmark the batched-experts GEMM against peers and the roofline (GPU)")
    b.add_argument("--tune", action="store_true", help="sweep tile candidates first and save the winners")
    b.add_argument("--config-dir", help="where tuned tile tables are written (default: the package's configs/)")
    b.add_argument("--out", help="write the results as JSON to this file")
    b.add_argument("--scenario", action="append", help="run only scenarios whose name contains this (repeatable)")
    return ap

# %%
#| export
def main(argv: list[str] | None = None) -> int:
    "The `moe-lit` command. Returns the exit status: 0, or 1 when a check of `run` fails, 2 on bad input."
    args = _parser().parse_args(argv)
    if args.command == "bench": return _bench(args)
    try:
        cfg = build_config(None if args.config else args.model, args.config, args.ep, args.tp, args.all2all, args.dtype)
        if args.command == "tables":
            print(tables_report(cfg, args.placement, args.tp)); return 0
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available(): raise ValueError("device: expected a CUDA GPU, got none")
        report = run_report(cfg, args.tokens, args.placement, args.seed, args.tp, args.experts, device)
    except ValueError as e:
        print(f"moe-lit: error: {e}", file=sys.stderr); return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    checks = [c for c in report["check"].values() if c is not None]
    return 0 if all(c["ok"] for c in checks) else 1

# %%
#| export
def _bench(args) -> int:
    "`moe-lit bench`: needs a CUDA GPU; prints a table and optionally writes JSON and tuned tile tables."
    from moe_lit.bench import SCENARIOS, run_bench, format_bench
    scs = [s for s in SCENARIOS if not args.scenario or any(x.lower() in s["name"].lower() for x in args.scenario)]
    try: report = run_bench(args.out, args.tune, args.config_dir, scs, progress=lambda n: print(f"... {n}", file=sys.stderr))
    except ValueError as e:
        print(f"moe-lit: error: {e}", file=sys.stderr); return 2
    print(format_bench(report)); return 0

# %%
#| test main_entry_point
with tempfile.TemporaryDirectory() as d:                      # a tiny Mixtral-layout config.json, end to end
    Path(d, "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4, "hidden_size": 32,
                                                  "num_experts_per_tok": 2, "intermediate_size": 16}))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        test_eq(main(["run", "--config", d, "--tokens", "5", "--ep", "2", "--all2all", "nixl_ep", "--json"]), 0)
rep = json.loads(out.getvalue())
test_eq((rep["model"]["num_experts"], rep["properties"][1]["value"]), (4, "batched_experts"))
with contextlib.redirect_stderr(io.StringIO()) as err: test_eq(main(["run", "--tokens", "0"]), 2)
assert "num_tokens: expected >= 1, got 0" in err.getvalue()
with contextlib.redirect_stdout(io.StringIO()) as out: test_eq(main(["tables", "--model", "deepseek-v3", "--ep", "4",
                                                                    "--all2all", "deepep_low_latency", "--placement", "round_robin"]), 0)
assert "global_to_physical" in out.getvalue()

# %%
#| export
if __name__ == "__main__": sys.exit(main())
