# %%
#| default_exp report

# %% [markdown]
# # The report as text
# > What moe-lit run prints: the data of run_report written as sections — model, deployment and backend, properties, placement, load and checks, time — with long lists abridged.

# %%
#| export
from __future__ import annotations

# %%
#| hide
import json
import torch
from fastcore.test import test_eq, test_fail
from moe_lit.config import MoEConfig, ParallelConfig
from moe_lit.cli import run_report

# %% [markdown]
# In this notebook: `format_report` (the report of `15_cli`'s `run_report` as text), and the helpers the command's
# other texts share, `format_sections` and `placement_head`. A **reference** page.
#
# %% [markdown]
# ## Sections
#
# The text abridges long lists (the middle replaced by `'...'`); nothing else is left out.

# %%
#| export
def _abridge(xs: list | None, keep: int = 16) -> list | None:
    "`xs` with the middle replaced by '...' when longer than `keep` (for text only; the report keeps all)."
    if xs is None or len(xs) <= keep: return xs
    return xs[: keep // 2] + ["..."] + xs[-keep // 4:]

def _spec_verdict(c: dict) -> str:
    "A `check_spec_output` result in words."
    return (f"rel err {c['rel_err']:.2e} (limit {c['rtol']:g}), cosine {c['cosine']:.6f} (limit {c['cosine_min']:g}) "
            f"{'OK' if c['ok'] else 'FAIL: ' + c['detail']}")

def _verdict(c: dict | None) -> str:
    if c is None: return "n/a (one rank)"
    return f"max rel err {c['max_rel_err']:.2e} (rtol {c['rtol']:g}), cosine {c.get('cosine', 1.0):.6f} {'OK' if c['ok'] else 'FAIL: ' + c['detail']}"

# %%
#| export
def _section_model(r: dict) -> list[str]:
    m, d, b = r["model"], r["deployment"], r["backend"]
    a2a = f"all2all {d['all2all_backend']!r}" + ("" if d["all2all_used"] else
                                                 " requested but not used" if b["moves_tokens"] else " (no all2all)")
    return [f"moe-lit run: {m['name'] or 'custom model'} MoE layer, {d['num_tokens']} tokens, {m['dtype']}, "
            f"{d['ep_size']} EP rank(s) ({d['dp_size']} DP x {d['tp_per_dp_rank']} TP), {a2a}",
            "", "model",
            f"  num_experts={m['num_experts']} top_k={m['top_k']} hidden_size={m['hidden_size']} "
            f"intermediate_size={m['intermediate_size']} num_shared_experts={m['num_shared_experts']}",
            f"  routing={m['routing_method']} scoring_func={m['scoring_func']} renormalize={m['renormalize']} "
            f"num_expert_group={m['num_expert_group']} topk_group={m['topk_group']} "
            f"routed_scaling_factor={m['routed_scaling_factor']} correction_bias={m['has_correction_bias']}",
            f"  experts: {r['experts_function']}",
            "", f"backend {b['name']!r}: {b['summary']}",
            "  " + " ".join(f"{k}={v}" for k, v in b.items() if k not in ("name", "summary")),
            f"  on this deployment: {d['all2all_note']}"] + (
            [f"  {d['hidden_size_note']}"] if d["hidden_size_note"] else []) + (
            [f"  activations on the wire: {d['dispatch_quant_note']}"]
            if d["all2all_used"] and d.get("dispatch_quant_note") else []) + (
            [f"  note: {c}" for c in r.get("caveats", [])]) + (
            ["  weights and router are random (seeded); the load below comes from the random router, not the model"]
            if r.get("weights", "random").startswith("random") else [f"  weights: {r['weights']}"])

def _section_properties(r: dict) -> list[str]:
    w = max(len(p["property"]) for p in r["properties"])
    e = r["experts"]
    return ["", "parallel config properties (rank 0)"] + [
        f"  {p['property']:<{w}}  {str(p['value']):<15}  {p['reason']}" for p in r["properties"]] + [
        "", f"experts: {e['implementation']} on {e['device']}, weights {e.get('quant', 'unquantized')} ({e['reason']})"]

# %%
#| export
def placement_record(requested: str | None, placement) -> dict:
    """A report's placement: the strategy asked for (`requested`; None: none, linear by default), the strategy the
    `Placement` uses, and why: 'requested', 'default' (none asked for), or the conditions that forced linear.
    Nothing is checked: `requested` is stored as given, and a `placement` without `reason` and `strategy` is an
    AttributeError. Source: moe-lit's own (the reason comes from `04_placement`'s resolver, after vLLM's
    `determine_expert_placement_strategy`)."""
    why = "default" if placement.reason == "requested" and requested is None else placement.reason
    return {"requested": requested, "strategy": placement.strategy, "reason": why}

def placement_why(p: dict) -> str:
    """Why a report's placement is what it is: 'as requested', 'the default' (none requested), or the request and the
    reason it was not honoured. Nothing is checked: KeyError for a dict without `placement_record`'s `reason` (and
    `requested` when it was not honoured). Source: moe-lit's own."""
    if p["reason"] == "default" or (p["reason"] == "requested" and not p.get("requested")): return "the default"
    if p["reason"] == "requested": return "as requested"
    return f"requested {p['requested']}; {p['reason']}"

def placement_head(p: dict) -> str:
    """'placement linear (the default)', 'placement round_robin (as requested)', or the request and why it was not
    honoured. Nothing is checked: KeyError for a dict without `placement_record`'s keys. Source: moe-lit's own."""
    return f"placement {p['strategy']} ({placement_why(p)})"

def _section_placement(r: dict) -> list[str]:
    p = r["placement"]
    out = ["", placement_head(p)]
    ranks = p["ranks"] if len(p["ranks"]) <= 8 else p["ranks"][:4] + p["ranks"][-2:]
    out += [f"  rank {q['rank']}: {q['num_local_experts']} local experts, local_to_global {_abridge(q['local_to_global'])}"
            for q in ranks]
    out.append(f"  expert_map (rank 0): {_abridge(p['expert_map_rank0'])}")
    t = p["routing_tables"]
    out += ["  routing tables: not used (linear placement or a backend without physical ids)"] if t is None else [
        f"  global_to_physical: {_abridge(t['global_to_physical'])}",
        f"  physical_to_global: {_abridge(t['physical_to_global'])}"]
    return out

# %%
#| export
def _section_load_check(r: dict) -> list[str]:
    l, c = r["load"], r["check"]
    return ["", f"load (token-slots per expert): min {l['min']}, mean {l['mean']:.2f}, max {l['max']}, "
                f"{l['empty_experts']} experts empty; hottest (expert, slots) {l['hottest']}",
            f"  per rank: {l['per_rank']}", f"  per expert: {_abridge(l['per_expert'], 32)}",
            "", "check", f"  {('EP' if c['ep_vs_single_device'] else 'layer') + ' output vs float64 reference:':<37}"
                         f"{_verdict(c['vs_float64'])}",
            "  single-device vs float64 reference:  " + (_verdict(c['single_device_vs_float64'])
                if c['ep_vs_single_device'] or r["experts"]["implementation"] != "torch" else
                "the same computation as the line above (one rank, torch experts)"),
            f"  EP sum over ranks vs single device:  {_verdict(c['ep_vs_single_device'])}"] + (
            [] if not c.get("vs_kernel_spec") else
            [f"  {('EP' if c['ep_vs_single_device'] else 'layer') + ' output vs the kernels’ spec:':<37}"
             f"{_spec_verdict(c['vs_kernel_spec'])}",
             "    (the quantized experts' float64 spec, activations rounded as the kernels round them: the bound of "
             "the kernel tests)"]) + (
            [] if not r.get("quantization_error") else
            [f"  quantization error (output vs float64 on the weights before quantization, information): max rel err "
             f"{r['quantization_error']['max_rel_err']:.2e}, cosine {r['quantization_error']['cosine']:.6f}"])

def _section_time(r: dict) -> list[str]:
    t = r["timing"]
    rate = "n/a" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:.1f}"
    return ["", "time (this emulation on this machine: the ranks run one after another in one process)",
            f"  weights {'loaded' if r.get('weights', 'random').startswith('checkpoint') else 'generated'} {t['weights_s']:.2f} s + forward {t['forward_s']:.2f} s (all ranks; per rank "
            f"{[round(s, 3) for s in t['per_rank_forward_s']]} s) + single-device and float64 references and checks "
            f"{t['reference_and_checks_s']:.2f} s = total {t['total_s']:.2f} s",
            f"  {rate} tokens/s = tokens / forward time of this emulation (not a serving throughput)"] + _memory_line(t)

def _memory_line(t: dict) -> list[str]:
    "The peak memory line, from what the report holds (older reports without it: nothing)."
    parts = [f"{t[k]:.2f} GiB {what}" for k, what in (("peak_resident_gb", "resident (this process)"),
                                                      ("peak_gpu_gb", "allocated on the GPU")) if t.get(k) is not None]
    return [f"  memory peak {', '.join(parts)}"] if parts else []

# %% [markdown]
# > `format_report` and `format_tables` accept only what `run_report` and `tables_report` return: a dict without one
# > of the top-level keys, or with a section of another shape, is a `ValueError` naming the argument, never a
# > `KeyError` from the middle of the formatting.

# %%
#| export
_REPORT_KEYS = ("model", "deployment", "backend", "properties", "experts", "placement", "load", "check", "timing")

def format_sections(data, name: str, made_by: str, keys: tuple, lines) -> str:
    """'\\n'.join(lines(data)); ValueError naming `name` unless `data` has the shape of the dict `made_by` returns.
    Source: moe-lit's own."""
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else None
    if missing is None or missing:
        got = type(data).__name__ if missing is None else f"a dict without {missing}"
        raise ValueError(f"{name}: expected the dict {made_by} returns (keys {list(keys)}), got {got}")
    try: return "\n".join(lines(data))
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:   # a section of another shape
        raise ValueError(f"{name}: expected the dict {made_by} returns, got one whose sections differ from it "
                         f"({type(e).__name__}: {e})") from None

def format_report(report: dict,   # the data of `run_report`
                 ) -> str:
    """The report of `run_report` as text, long lists abridged. ValueError naming `report` for anything but the dict
    `run_report` returns (`format_sections`). Source: moe-lit's own."""
    return format_sections(report, "report", "run_report", _REPORT_KEYS, lambda r: _section_model(r) + _section_properties(r)
                      + _section_placement(r) + _section_load_check(r) + _section_time(r))

# %%
#| test report_quantization_error
small = MoEConfig(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, name="tiny")
rep = run_report(small, num_tokens=6, quant="mxfp4_w4a16")
q, k = rep["quantization_error"], rep["check"]["vs_float64"]
assert k["ok"] and q["max_rel_err"] > 10 * k["max_rel_err"], (q, k)   # FP4's own error dwarfs the kernel's
assert "quantization error (output vs float64 on the weights before quantization" in format_report(rep)
test_eq(run_report(small, num_tokens=6)["quantization_error"], None)

# %%
#| test format_report
small = MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, name="tiny")
text = format_report(run_report(small, num_tokens=6))
for part in ("backend 'none'", "use_batched_activation_format", "placement linear (the default)",
             "layer output vs float64 reference", "the same computation as the line above", "tokens/s",
             "n/a (one rank)", "not a serving throughput", "memory peak", "GiB resident (this process)",
             "references and checks", "on this deployment: no all2all"):
    assert part in text, part
par = ParallelConfig.make(2, 1, enable_expert_parallel=True, all2all_backend="deepep_low_latency")   # TP+EP
wide = MoEConfig(num_experts=40, top_k=2, hidden_size=2880, intermediate_size=8, dtype=torch.float32, parallel=par)
text = format_report(run_report(wide, num_tokens=2, placement="round_robin", tp_size=2))
assert "all2all 'deepep_low_latency' requested but not used" in text.splitlines()[0]
assert "backend 'deepep_low_latency' requested but not used: no all2all (TP+EP with one DP rank" in text
assert "'...'" in text and "padded" not in text                                  # abridged; no dispatch, no padding
text = format_report(run_report(wide.replace(parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True,
                     all2all_backend="deepep_low_latency")), num_tokens=2, placement="linear"))
assert "hidden_size 2880 is dispatched padded to 3072 by 'deepep_low_latency'" in text
assert "placement linear (as requested)" in text                                # asked for, not the default
for bad in ("", 0, False):                                                      # falsy is not "unset": refused
    test_fail(lambda: run_report(small, num_tokens=2, placement=bad), contains="placement: expected one of ['linear', 'round_robin']")

# %%
#| test format_report_bad_input
test_fail(lambda: format_report({}), contains="report: expected the dict run_report returns (keys ['model', "
          "'deployment', 'backend', 'properties', 'experts', 'placement', 'load', 'check', 'timing']), got a dict without")
test_fail(lambda: format_report("report"), contains="report: expected the dict run_report returns (keys")
rep = run_report(MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8), num_tokens=2)
test_fail(lambda: format_report({**rep, "load": {}}), contains="report: expected the dict run_report returns, got one "
          "whose sections differ from it (KeyError: 'min')")

# %% [markdown]
# ## The distributed run's report
#
# `run_distributed` (`13b_distributed`) reports the same kind of facts per rank — tokens, pairs sent and received,
# rows per local expert — and checks the distributed output against the single-process layer and float64;
# `format_distributed_report` writes it for `torchrun -m moe_lit.distributed` and `moe-lit run --distributed`.

# %%
#| export
def _distributed_lines(r: dict) -> list[str]:
    c, t = r["check"], r["timing"]
    verdict = lambda x: f"{'ok' if x['ok'] else 'FAILED'} (max rel err {x['max_rel_err']:.2e}, rtol {x['rtol']:g})"
    procs = f"{r['world_size']} process" + ("es" if r["world_size"] > 1 else "")
    lines = [f"moe-lit distributed: {r['model'] or 'model'} on {procs} ({r['process_group']}, {r['device']})",
             f"  deployment   all2all {r['all2all_backend']!r} -> {r['activation_format']} format",
             f"  transport    {r['transport']}",
             f"  experts      {r['experts']['implementation']}, weights {r['experts'].get('quant', 'unquantized')} "
             f"({r['experts']['reason']})",
             f"  placement    {r['placement']['strategy']} ({placement_why(r['placement'])})",
             f"  tokens       {r['num_tokens']} in all, per rank {r['tokens_per_rank']}",
             f"  pairs        sent per rank {r['pairs_sent_per_rank']}, received per rank {r['pairs_received_per_rank']}"]
    if r["expert_num_tokens_per_rank"] is not None:            # the text abridges; the report keeps every count
        rows = [f"{min(n, default=0)}-{max(n, default=0)} ({n.count(0)} empty)" for n in r["expert_num_tokens_per_rank"]]
        lines.append(f"  slabs        rows per local expert, per rank: {', '.join(rows)}; layout matches the "
                     f"emulation: {r['slab_layout_matches_emulation']}")
    if r.get("dispatch_quant_note"):
        w, pad = r.get("wire_width"), r.get("wire_width") != r.get("hidden_size")
        n, per = next(((r[k], k.rsplit("_", 1)[1]) for k in ("wire_bytes_per_pair", "wire_bytes_per_token")
                       if r.get(k) and r["world_size"] > 1), (None, None))   # one rank: nothing travels
        size = (f" ({n} bytes a {per}: rows of {w} columns"
                + (f", hidden {r.get('hidden_size')} padded to the backend's size)" if pad else ")") if n else "")
        lines.append(f"  on the wire  {r['dispatch_quant_note']}{size}")
    lines += [f"  check        distributed vs float64: {verdict(c['distributed_vs_float64'])}",
              f"               distributed vs single process: {verdict(c['distributed_vs_single_process'])}",
              f"               single process vs float64: {verdict(c['single_process_vs_float64'])}",
              *([f"               distributed vs the kernels’ spec: {_spec_verdict(c['distributed_vs_kernel_spec'])}"]
                if c.get("distributed_vs_kernel_spec") else []),
              *([f"  quantization error vs the float weights (information): max rel err "
                 f"{r['quantization_error']['max_rel_err']:.2e}, cosine {r['quantization_error']['cosine']:.5f}"]
                if r.get("quantization_error") else []),
              f"  time         forward {max(t['forward_s_per_rank']):.3f} s (slowest rank), weights "
              f"{max(t['weights_s_per_rank']):.3f} s, reference on rank 0 {t['reference_s']:.3f} s"]
    return lines

# %%
#| export
_DISTRIBUTED_KEYS = ("model", "world_size", "process_group", "device", "all2all_backend", "activation_format", "transport",
                     "experts", "placement", "num_tokens", "tokens_per_rank", "pairs_sent_per_rank",
                     "pairs_received_per_rank", "expert_num_tokens_per_rank", "check", "timing")

def format_distributed_report(report: dict,   # `run_distributed(...).report` (rank 0)
                             ) -> str:
    """The report of `run_distributed` (`13b_distributed`) as a few lines of text; ValueError unless it has that shape
    (naming `report`, from `format_sections`). Source: moe-lit's own."""
    return format_sections(report, "report", "run_distributed(...).report", _DISTRIBUTED_KEYS, _distributed_lines)

# %%
#| test format_distributed_report_bad_input
test_fail(lambda: format_distributed_report({}), contains="report: expected the dict run_distributed(...).report returns")
rep = run_report(MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8), num_tokens=2)
test_fail(lambda: format_distributed_report(rep), contains="got a dict without ['world_size'")   # run_report's, not run_distributed's
