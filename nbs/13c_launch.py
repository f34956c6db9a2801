# %%
#| default_exp launch

# %% [markdown]
# # Launching processes
# > Start N Python processes that form a torch.distributed group, run a function on each, and get every rank's result — or one error that names the rank that failed; plus the jobs and the sweep the multi-process tests run.

# %%
#| export
from __future__ import annotations
import importlib, os, pickle, subprocess, sys, tempfile, time, traceback
import torch
import torch.distributed as dist
from moe_lit.terms import check_int, check_choice, check_bool, check_positive_real
from moe_lit.config import MoEConfig, ParallelConfig, BACKENDS
from moe_lit.formats import moe_reference_standard, expert_mlp
from moe_lit.modular import ModularKernel, make_experts
from moe_lit.layer import FusedMoE, RandomExpertWeights
from moe_lit.distributed import run_distributed
from moe_lit.transport import (init_distributed, free_port, group_device, AllGatherReduceScatterPrepareFinalize,
                               AllToAllBatchedPrepareFinalize)

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close
from moe_lit.transport import *                       # the transport and the run under test
from moe_lit.distributed import *
from moe_lit.report import format_distributed_report
from moe_lit.placement import Placement
from moe_lit.layer import rank_config

# %% [markdown]
# In this notebook: `launch` (N processes, one torch.distributed group, every rank's result or one error naming the
# failing rank), `worker_main`, the jobs the tests run (`run_cases`, `world_one_job`, the failing, disagreeing and
# sleeping jobs) and `sweep_cases`; then the tests of `13a_transport` and `13b_distributed` across real processes. A **how-to** page.
#
# ## Launching processes from Python
#
# Tests (and notebooks) start their own processes: `launch` runs a module-level function on `world_size` fresh Python
# processes joined by torch.distributed, the way `torchrun` would (same environment variables, one free port), and
# returns each rank's result. It never waits forever:
#
# - every collective has a timeout (`collective_timeout_s`), so a rank waiting for a dead peer fails by itself;
# - when a rank fails, the others get a short grace period to notice and exit with their own error — gloo notices a
#   closed peer at once — then the launcher kills what is left;
# - a hard deadline (`timeout_s`) kills every process still running and raises `DistributedTimeoutError`.
#
# Every rank's error is collected, so the exception says which rank failed first and how the others stopped.

# %%
#| export
class DistributedJobError(RuntimeError):
    """A launched job failed: `errors` maps each failed rank to its error text; `pids` are the processes (all ended).
    A RuntimeError that `launch` raises; its constructor raises nothing. Source: moe-lit's own (no counterpart in
    vLLM)."""
    def __init__(self, message: str, errors: dict, pids: list):
        super().__init__(message)
        self.errors, self.pids = errors, pids

class DistributedTimeoutError(DistributedJobError, TimeoutError):
    """A launched job was still running at its deadline: every process was killed.
    Both a DistributedJobError and a TimeoutError, raised by `launch`; its constructor raises nothing. Source: moe-lit's
    own."""

_WORKER = "import sys; from moe_lit.launch import worker_main; worker_main(sys.argv[1])"

# %%
#| export
def _describe_failure(e: BaseException) -> str:
    "A rank's error, saying plainly when it only stopped because a peer failed or timed out."
    text = f"{type(e).__name__}: {e}".strip()
    peer = isinstance(e, getattr(dist, "DistBackendError", ())) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out", "NCCL")))
    return f"stopped in a collective because a peer rank failed or timed out ({text.splitlines()[0][:300]})" if peer else text

def worker_main(spec_path: str) -> None:
    """The entry point of a process started by `launch`: join the group, run the job, write the result or the error.
    Never raises from the job: any exception (BaseException) of joining or of the job goes to `rank{r}.err` and the
    process leaves with `os._exit(1)`; reading the spec (OSError, pickle's errors, KeyError without `RANK`) raises.
    Source: moe-lit's own (what torchrun's worker would run)."""
    with open(spec_path, "rb") as f: spec = pickle.load(f)
    rank, out = int(os.environ["RANK"]), spec["out"]
    try:
        init_distributed(spec["collective_timeout_s"], spec["backend"])
        result = spec["fn"](**spec["kwargs"])
        part = os.path.join(out, f"rank{rank}.part")
        torch.save(result, part)
        os.replace(part, os.path.join(out, f"rank{rank}.pt"))    # the launcher never reads a half-written result
    except BaseException as e:                        # a rank that fails must leave, not wait in the next collective
        traceback.print_exc()
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f: f.write(_describe_failure(e))
        sys.stdout.flush(); sys.stderr.flush(); os._exit(1)
    dist.destroy_process_group()

# %%
#| export
def _worker_env(rank: int, world_size: int, port: int) -> dict:
    "The environment torchrun would give rank `rank`, plus the package's path, one thread and no progress bars."
    import moe_lit
    root = os.path.dirname(os.path.dirname(os.path.abspath(moe_lit.__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), MOE_LIT_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")            # as torchrun does: N processes must not fight over the cores
    return env

def _wait(procs: list, timeout_s: float, grace_s: float) -> tuple[list, bool]:
    "Poll until all exit; after the first failure allow `grace_s` more; kill what is left at the deadline."
    deadline, failed = time.monotonic() + timeout_s, False
    while any(p.poll() is None for p in procs):
        if not failed and any(p.poll() not in (None, 0) for p in procs):
            failed, deadline = True, min(deadline, time.monotonic() + grace_s)
        if time.monotonic() > deadline:
            killed = [r for r, p in enumerate(procs) if p.poll() is None]
            for r in killed: procs[r].kill()
            for p in procs: p.wait()
            return killed, not failed
        time.sleep(0.02)
    return [], False

# %%
#| export
def _job_error(name, tmp, procs, killed, timed_out, timeout_s) -> DistributedJobError:
    "The exception for a failed or timed-out job, with every rank's error (or its log's tail)."
    errors = {}
    for r, p in enumerate(procs):
        err, log = os.path.join(tmp, f"rank{r}.err"), os.path.join(tmp, f"rank{r}.log")
        if os.path.exists(err): errors[r] = open(err).read()
        elif r in killed: errors[r] = ("still running at the deadline" if timed_out else "still running after the "
                                       "grace period that followed another rank's failure") + ": killed by the launcher"
        elif p.returncode != 0:
            tail = open(log, errors="replace").read()[-1500:] if os.path.exists(log) else ""
            errors[r] = f"exited with status {p.returncode} without an error report; log tail:\n{tail}"
    pids = [p.pid for p in procs]
    if timed_out:
        return DistributedTimeoutError(f"distributed job {name!r}: ranks {killed} still running after {timeout_s:g} s "
                                       f"(a hang); every process was killed", errors, pids)
    detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items(), key=lambda re: "peer rank" in re[1]))
    return DistributedJobError(f"distributed job {name!r} failed on ranks {sorted(errors)}: {detail}", errors, pids)

# %%
#| export
def launch(fn,                                  # a module-level function the workers can import (e.g. run_cases)
           world_size: int,                     # processes to start
           timeout_s: float = 120.0,            # hard deadline for the whole job (s); then everything is killed
           backend: str = "gloo",               # 'gloo' (CPU) or 'nccl' (one GPU per process)
           collective_timeout_s: float | None = None,   # timeout of each collective (s); None: timeout_s / 2
           **kwargs) -> list:                   # fn(**kwargs) of every rank, in rank order
    """Run `fn(**kwargs)` on `world_size` fresh processes joined by torch.distributed; raise if any rank fails or hangs.
    ValueError naming `fn` (not a module-level function), `world_size` (not an int in [1, 256]), `timeout_s` or
    `collective_timeout_s` (not a finite number > 0) or `backend` (not 'gloo'/'nccl'); pickle's errors for `kwargs`
    that cannot be pickled; DistributedJobError naming each failed rank; DistributedTimeoutError at the deadline.
    Source: the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK); moe-lit's own
    launcher."""
    name, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if name == "__main__" and "<" not in qual:                 # this notebook's copy of an exported job: the module's
        fn = getattr(importlib.import_module("moe_lit.launch"), qual, fn)
        name = getattr(fn, "__module__", None)
    if not callable(fn) or name in (None, "__main__") or "<" in qual:
        raise ValueError(f"fn: expected a module-level function the worker processes can import, got {fn!r}")
    check_int("world_size", world_size, lo=1, hi=257); check_positive_real("timeout_s", timeout_s)
    check_choice("backend", backend, ("gloo", "nccl"))
    coll = timeout_s / 2 if collective_timeout_s is None else check_positive_real("collective_timeout_s", collective_timeout_s)
    with tempfile.TemporaryDirectory(prefix="moe_lit_launch_") as tmp:
        spec = os.path.join(tmp, "spec.pkl")
        with open(spec, "wb") as f:
            pickle.dump({"fn": fn, "kwargs": kwargs, "backend": backend, "collective_timeout_s": coll, "out": tmp}, f)
        port, procs = free_port(), []
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.log"), "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, spec], env=_worker_env(r, world_size, port),
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        killed, timed_out = _wait(procs, timeout_s, grace_s=coll + 10.0)
        if timed_out or killed or any(p.returncode for p in procs):
            raise _job_error(qual, tmp, procs, killed, timed_out, timeout_s)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]

# %% [markdown]
# ### Jobs
#
# The functions `launch` runs must be importable by the workers, so they live here, not in test cells: `run_cases`
# runs `run_distributed` once per case on every rank (process start-up is the expensive part, so one launch checks
# many cases), `failing_job` and `sleeping_job` fail and hang on purpose, `gather_mismatch_job` disagrees on purpose (in
# `all_gather_rows`, and in the rows of both transports: dtype, widths, FP8 group, capacity, top_k, ids dtype), and
# `world_one_job` drives both
# prepare/finalize classes at world size 1 (the NCCL check on one GPU).

# %%
#| export
def run_cases(cases: list) -> list:
    """Job: `run_distributed(**case)` per case on every rank; rank 0 returns outputs and references, the others stats.
    Re-raises a case's ValueError unless its `expect_error` is in the message; AssertionError when a case with
    `expect_error` raises none; `run_distributed`'s other errors propagate. Source: moe-lit's own test job."""
    out = []
    for case in cases:
        kw = dict(case); name, expect = kw.pop("name"), kw.pop("expect_error", None)
        try: run = run_distributed(**kw)
        except ValueError as e:                              # consistent errors only: every rank raises the same
            if expect is None or expect not in str(e): raise
            out.append({"name": name, "error": str(e)}); continue
        if expect is not None: raise AssertionError(f"{name}: expected a ValueError containing {expect!r}, got none")
        res = {"name": name, "pairs_received": run.rank_stats[dist.get_rank()]["pairs_received"]}
        if run.report is not None:
            res.update(output=run.output, reference=run.reference, single_device=run.single_device, report=run.report,
                       dispatched=[s.get("topk_ids") for s in run.rank_stats])
        out.append(res)
    return out

def failing_job(fail_rank: int, config: MoEConfig) -> None:
    """Job: one healthy run on every rank, then rank `fail_rank` raises while the others start the next run.
    RuntimeError on rank `fail_rank` (by design); the others stop in a collective. Source: moe-lit's own test job."""
    run_distributed(config, num_tokens=4)
    if dist.get_rank() == fail_rank: raise RuntimeError(f"injected failure on rank {fail_rank}")
    run_distributed(config, num_tokens=4)                    # the others wait in a collective for the dead rank

def disagreeing_counts_job(config: MoEConfig) -> None:
    """Job: the ranks pass different `token_counts` for the same batch (a caller's bug that every rank must catch).
    Raises, by design, `run_distributed`'s ValueError naming `token_counts` on every rank (on a group of 2 ranks).
    Source: moe-lit's own test job."""
    run_distributed(config, num_tokens=4, token_counts=[1, 3] if dist.get_rank() == 0 else [3, 1])

def gather_mismatch_job() -> dict:
    """Job: `all_gather_rows`, the all-to-all and the all-gather where the ranks disagree on their rows; each case's
    error per rank. The cases' ValueErrors are returned, not raised; outside a process group torch.distributed's
    ValueError ("Default process group has not been initialized"). Source: moe-lit's own test job."""
    from moe_lit.transport import all_gather_rows
    r, S, out = dist.get_rank(), dist.get_world_size(), {}
    cases = {"dtype": (torch.zeros(1, 2, dtype=torch.int32 if r else torch.float32), [1] * S),
             "counts": (torch.zeros(1, 2), [2 if (i == 0 and r) else 1 for i in range(S)]),   # rank 1: "rank 0 has 2"
             "shape": (torch.zeros(1, 2, 3) if r else torch.zeros(1, 3, 2), [1] * S),      # same bytes a row
             "agree": (torch.full((1, 2), float(r)), [1] * S)}
    for name, (x, counts) in cases.items():
        try: out[name] = all_gather_rows(x, counts, None).tolist()
        except ValueError as e: out[name] = str(e)
    from moe_lit.placement import Placement                   # the all-to-all's rows: every rank must send the same
    from moe_lit.layer import rank_config
    cfg = MoEConfig(8, 2, 128, 64, dtype=torch.bfloat16,
                    parallel=ParallelConfig.make(1, S, enable_expert_parallel=True, all2all_backend="nixl_ep"))
    place, h, w, ids = Placement.build(rank_config(cfg, r)), torch.randn(2, 128).bfloat16(), torch.rand(2, 2), torch.tensor([[0, 5], [2, 7]])
    for name, kw in {"a2a quant_block": dict(quant_block=(1, 128) if r == 0 else None),
                     "a2a wire width": dict(padded_hidden_size=256 if r else None),
                     "a2a capacity": dict(max_num_tokens_per_rank=8 if r == 0 else 4), "a2a dtype": {}}.items():
        pf = AllToAllBatchedPrepareFinalize(kw.pop("max_num_tokens_per_rank", 8), **kw)
        try: pf.prepare(h.half() if name == "a2a dtype" and r else h, w, ids, place); out[name] = "no error"
        except ValueError as e: out[name] = str(e)
    place = Placement.build(rank_config(cfg.replace(parallel=ParallelConfig.make(                 # and the all-gather's
        1, S, enable_expert_parallel=True, all2all_backend="deepep_high_throughput")), r))
    for name, kw in {"ag quant_block": dict(quant_block=(1, 128) if r == 0 else None),
                     "ag wire width": dict(padded_hidden_size=256 if r else None), "ag dtype": {},
                     "ag fp32 for FP8": dict(quant_block=(1, 128)),   # one rank's hidden may not be quantized:
                     "ag ids dtype": {}, "ag top_k": {}}.items():     # every rank raises, none waits
        hh = h.half() if name == "ag dtype" and r else h.float() if name == "ag fp32 for FP8" and r == 0 else h
        ii, ww = (ids.int() if name == "ag ids dtype" and r else ids), w
        if name == "ag top_k" and r: ii, ww = torch.tensor([[0, 5, 1], [2, 7, 3]]), torch.rand(2, 3)
        try:
            AllGatherReduceScatterPrepareFinalize(**kw).prepare(hh, ww, ii, place)
            out[name] = "no error"
        except ValueError as e: out[name] = str(e)
    return out

def sleeping_job(seconds: float) -> None:
    """Job: hang (sleep) — for the test that a hang fails within the launcher's deadline. `seconds` is not checked:
    `time.sleep`'s ValueError for a negative one, TypeError for a non-number. Source: moe-lit's own test job."""
    time.sleep(seconds)

# %%
#| export
def world_one_job(experts: str = "triton") -> list:
    """Job at world size 1: both prepare/finalize classes around `experts`, vs the float64 reference; plus
    run_distributed. ValueError outside a process group (torch.distributed's), for an `experts` value FusedMoE
    refuses, or from the prepares' placement check on a group of more than one rank. Source: moe-lit's own test job."""
    device, g = group_device(None), torch.Generator().manual_seed(3)
    cfg = MoEConfig(8, 2, 64, 32, dtype=torch.bfloat16, num_shared_experts=1, name="world-one")
    layer = FusedMoE(cfg, RandomExpertWeights(cfg, 1), experts=experts, device=device)
    place, w13, w2, shared = layer.placement, layer.w13, layer.w2, layer.shared_experts
    hidden = torch.randn(13, 64, generator=g).to(device=device, dtype=cfg.dtype)
    wts, ids = layer.route(hidden)
    ref = moe_reference_standard(hidden.double().cpu(), w13.cpu(), w2.cpu(), wts.cpu(), ids.cpu())
    ref = ref + expert_mlp(hidden.double().cpu(), shared.w13.cpu(), shared.w2.cpu())
    out = []
    for pf in (AllGatherReduceScatterPrepareFinalize(), AllToAllBatchedPrepareFinalize(16)):
        mk = ModularKernel(pf, make_experts(pf, experts), shared)
        got = mk(hidden, w13, w2, wts, ids.to(pf.topk_indices_dtype), place)
        out.append({"name": f"{type(pf).__name__}/{experts}", "output": got.cpu(), "reference": ref})
    run = run_distributed(cfg, num_tokens=9, experts=experts)
    out.append({"name": f"run_distributed/{experts}", "output": run.output, "reference": run.reference})
    if experts == "triton":                  # FP8 on the wire: the all-to-all's slabs against the in-process FP8 dispatch
        from moe_lit.modular import BatchedPrepareFinalize
        q = FusedMoE(cfg, RandomExpertWeights(cfg, 1), experts="triton", quant="fp8", device=device)
        fp8 = [ModularKernel(pf, make_experts(pf, "triton_quant"))(hidden, q.qweights, None, wts, ids.long(), place)
               for pf in (AllToAllBatchedPrepareFinalize(16, quant_block=(1, 128)),
                          BatchedPrepareFinalize(16, 1, use_triton=True, quant_block=(1, 128)))]
        out.append({"name": "fp8 on the wire/triton", "output": fp8[0].cpu(), "reference": fp8[1].double().cpu()})
        ag = [ModularKernel(pf, make_experts(pf, "triton_quant"))(hidden, q.qweights, None, wts, ids, place)   # the
              for pf in (AllGatherReduceScatterPrepareFinalize(quant_block=(1, 128)),      # all-gather's FP8 rows
                         AllGatherReduceScatterPrepareFinalize())]                         # against its 16-bit rows
        out.append({"name": "fp8 all-gather/triton", "output": ag[0].cpu(), "reference": ag[1].cpu(), "exact": True})
    return out

# %% [markdown]
# ### The test sweep
#
# `sweep_cases` lists the cases the multi-process tests run, for a given world size: every backend × both placements
# (each resolved the way the record allows), uneven token counts with a rank that has none, a batch with no tokens at
# all, a single token so that every other rank *receives* nothing, EPLB replicas (twice, with the ranks' batches
# swapped so different replicas serve the same tokens), bf16 with a shared expert and router weights applied on the
# input in both formats, the Triton experts (in the interpreter on a CPU), and an overflow that must raise on every
# rank. Hidden size 24 is dispatched as 2048 by the batched backends, so the padding path is in every batched case.
# With `triton`, two FP8 cases too: NIXL EP sends its rows as FP8 (2048 codes and 16 scales a pair), and DeepEP
# high-throughput's Standard format all-gathers them as FP8 (24 codes and one scale a token: no padding).

# %%
#| export
def sweep_cases(world_size: int,        # ranks of the launch
                triton: bool = False,   # include cases with the Triton experts (the interpreter on a CPU)
               ) -> list:               # kwargs of run_distributed, plus 'name' and 'expect_error'
    """The cases of the multi-process test sweep at `world_size` (see above). ValueError naming `world_size` (not an
    int in [2, 8]) or `triton` (not a bool). Source: moe-lit's own test sweep."""
    check_int("world_size", world_size, lo=2, hi=9); check_bool("triton", triton)
    S = world_size
    def cfg(backend, eplb=False, **kw):
        base = dict(num_experts=8, top_k=2, hidden_size=24, intermediate_size=16, dtype=torch.float32, max_num_tokens=8,
                    routing_method="grouped_topk", num_expert_group=4, topk_group=2, name="sweep")
        par = ParallelConfig.make(1, S, enable_expert_parallel=True, all2all_backend=backend, enable_eplb=eplb)
        return MoEConfig(**{**base, **kw}, parallel=par)
    uneven = [7, 0] + [3 + r for r in range(S - 2)]                         # rank 1 has no tokens
    cases = [dict(name=f"{b}/{p}", config=cfg(b), num_tokens=sum(uneven), token_counts=uneven, placement=p, seed=1)
             for b in BACKENDS for p in ("linear", "round_robin")]
    one = [0] * S; one[S - 1] = 1
    replicated = cfg("nixl_ep", eplb=True, num_redundant_experts=S)     # S extra physical copies: 8 + S split evenly
    cases += [dict(name="no tokens anywhere", config=cfg("deepep_low_latency"), num_tokens=0),
              dict(name="no tokens anywhere/standard", config=cfg("allgather_reducescatter"), num_tokens=0),
              dict(name="one token: other ranks receive nothing", config=cfg("nixl_ep", top_k=1), num_tokens=1, token_counts=one),
              dict(name="eplb", config=replicated, num_tokens=3 * S, token_counts=[2] * (S - 1) + [S + 2], seed=2),
              dict(name="eplb/other replicas", config=replicated, num_tokens=3 * S, token_counts=[S + 2] + [2] * (S - 1),
                   seed=2)]
    for b in ("allgather_reducescatter", "deepep_low_latency"):
        c = cfg(b, dtype=torch.bfloat16, num_shared_experts=1, apply_router_weight_on_input=True)
        cases.append(dict(name=f"{b}/bf16 shared on-input", config=c, num_tokens=3 * S, placement="round_robin"))
    if triton: cases += [dict(name=f"{b}/triton", config=cfg(b), num_tokens=2 * S, experts="triton")
                         for b in ("allgather_reducescatter", "nixl_ep")] + [
        dict(name=f"{b}/fp8", config=cfg(b, dtype=torch.bfloat16, num_shared_experts=1), num_tokens=3 * S,
             experts="triton", quant="fp8", placement="round_robin") for b in ("deepep_high_throughput", "nixl_ep")]
    cases.append(dict(name="overflow", config=cfg("nixl_ep"), num_tokens=9 + S, token_counts=[10] + [1] * (S - 1),
                      expect_error="capacity overflow"))
    return cases

# %% [markdown]
# ## Tests in one process
#
# In one process, without torchrun's variables, `init_distributed` joins a one-process gloo group. That is enough to
# check, without starting any process, that both prepare/finalize classes compute the layer and that bad arguments
# are refused with a clear message from inside a group:

# %%
#| test one_process_group
if not dist.is_initialized() and not any(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
    test_eq(init_distributed(timeout_s=60, backend="gloo"), (0, 1, torch.device("cpu")))
    try:
        test_eq(init_distributed(), (0, 1, torch.device("cpu")))            # already joined: the same group
        for res in world_one_job(experts="torch"): assert_close(res["output"], res["reference"], name=res["name"])
        two = MoEConfig(8, 2, 16, 16, parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
        test_fail(lambda: make_distributed_prepare_finalize(two), contains="config.parallel.ep_size: expected the "
                  "group's world size 1, got 2")
        test_fail(lambda: run_distributed(two), contains="config.parallel.ep_size: expected the group's world size 1")
        one = MoEConfig(8, 2, 16, 16)
        test_fail(lambda: run_distributed(one, 4, token_counts=[3]), contains="token_counts: expected a sum of num_tokens=4, got [3]")
        test_fail(lambda: run_distributed(one, 4, placement="zigzag"), contains="placement: expected one of")
        test_fail(lambda: run_distributed(one, -1), contains="num_tokens: expected >= 0, got -1")
        test_fail(lambda: AllToAllBatchedPrepareFinalize(0), contains="max_num_tokens_per_rank: expected >= 1, got 0")
        test_fail(lambda: AllGatherReduceScatterPrepareFinalize(topk_indices_dtype=torch.float32),
                  contains="topk_indices_dtype: expected one of")
        h, w, i, p1 = torch.randn(3, 16), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long), Placement.build(rank_config(two, 1))
        test_fail(lambda: AllToAllBatchedPrepareFinalize(4).prepare(h, w, i, p1),
                  contains="placement: expected the placement of rank 0 of 1, got rank 1 of 2")
        test_fail(lambda: AllGatherReduceScatterPrepareFinalize().prepare(h[0], w, i, p1), contains="hidden: expected a 2-D")
    finally: dist.destroy_process_group()
if not any(v in os.environ for v in ("RANK", "WORLD_SIZE")):               # a half-set torchrun environment
    os.environ["RANK"] = "0"
    try: test_fail(lambda: init_distributed(), contains="environment: expected RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    finally: del os.environ["RANK"]

# %% [markdown]
# ## Tests across processes
#
# Two ranks, then four, on gloo: every case's gathered output is compared with the float64 reference and with the
# single-process result; a rank that received nothing is seen; the EPLB runs used replicas and still agree; the
# overflow raised the same error on every rank; and each batched run's real slab layout equals the emulation's.

# %%
#| test distributed_world_2
t0 = time.monotonic()
results = launch(run_cases, 2, timeout_s=180, cases=sweep_cases(2, triton=not torch.cuda.is_available()))
for res in results[0]:
    if "error" in res: continue
    if res["report"]["experts"]["quant"] != "unquantized":    # w8a8: the report's checks allow for the activations'
        assert all(c["ok"] for c in res["report"]["check"].values() if c), (res["name"], res["report"]["check"])   # rounding
        continue
    for key, want in (("output", res["reference"]), ("single_device", res["reference"])):
        assert_close(res[key], want, name=f"{res['name']} {key}")
    assert_close(res["output"], res["single_device"].double(), name=f"{res['name']} vs single process")
    assert res["report"]["slab_layout_matches_emulation"] in (True, None), res["name"]
by_name = {r["name"]: r for r in results[0]}
test_eq(by_name["nixl_ep/round_robin"]["report"]["placement"]["strategy"], "round_robin")
test_eq(by_name["allgather_reducescatter/round_robin"]["report"]["placement"]["strategy"], "linear")
test_eq(by_name["nixl_ep/linear"]["report"]["tokens_per_rank"], [7, 0])
if "nixl_ep/fp8" in by_name:                                       # the interpreter's run: FP8 on the wire or not, why
    fp8, ht = by_name["nixl_ep/fp8"]["report"], by_name["deepep_high_throughput/fp8"]["report"]
    test_eq((fp8["dispatch_quant"], fp8["wire_bytes_per_pair"]), ([1, 128], 2048 + 4 * 16))
    assert fp8["check"]["distributed_vs_kernel_spec"]["ok"], fp8["check"]          # the kernels' own spec, 5 %
    test_eq((ht["dispatch_quant"], ht["wire_bytes_per_pair"], ht["wire_bytes_per_token"]), ([1, 128], None, 24 + 4))
    assert ht["check"]["distributed_vs_kernel_spec"]["ok"], ht["check"]          # no padding: 24 codes, one scale
    assert "the standard format's all-gather: each token's row once to every rank" in ht["dispatch_quant_note"], ht
    assert "(28 bytes a token: rows of 24 columns)" in format_distributed_report(ht)
    assert "on the wire  backend 'nixl_ep' quantizes before dispatch" in format_distributed_report(fp8)
assert 0 in by_name["one token: other ranks receive nothing"]["report"]["pairs_received_per_rank"]
assert any((d >= 8).any() for d in by_name["eplb"]["dispatched"] + by_name["eplb/other replicas"]["dispatched"])
for rank_results in results:                                       # the overflow raised on EVERY rank
    assert "capacity overflow, raised on every rank" in {r["name"]: r for r in rank_results}["overflow"]["error"]
print(f"{len(results[0])} cases on 2 ranks in {time.monotonic() - t0:.1f} s")

# %%
#| test distributed_world_4
t0 = time.monotonic()
results = launch(run_cases, 4, timeout_s=240, cases=sweep_cases(4))
for res in results[0]:
    if "error" in res: continue
    assert_close(res["output"], res["reference"], name=res["name"])
    assert_close(res["output"], res["single_device"].double(), name=f"{res['name']} vs single process")
    assert res["report"]["check"]["distributed_vs_float64"]["ok"], res["name"]
    assert res["report"]["slab_layout_matches_emulation"] in (True, None), res["name"]
by_name = {r["name"]: r for r in results[0]}
test_eq(by_name["deepep_low_latency/linear"]["report"]["tokens_per_rank"], [7, 0, 3, 4])
test_eq(sum(by_name["nixl_ep/round_robin"]["report"]["pairs_received_per_rank"]), 14 * 2)
assert by_name["one token: other ranks receive nothing"]["report"]["pairs_received_per_rank"].count(0) == 3
test_eq([{r["name"]: r for r in rr}["overflow"]["error"] for rr in results], [results[0][-1]["error"]] * 4)
print(f"{len(results[0])} cases on 4 ranks in {time.monotonic() - t0:.1f} s")

# %% [markdown]
# A rank that fails makes every rank exit with a clear error — its own, or "a peer rank failed" — well within the
# deadline, and nobody is killed: the ranks noticed by themselves. A hang fails the launch at its deadline and kills
# the processes, so it can never block CI.

# %%
#| test failing_rank_stops_every_rank
cfg = MoEConfig(8, 2, 24, 16, dtype=torch.float32, max_num_tokens=8,
                parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
t0 = time.monotonic()
try: launch(failing_job, 2, timeout_s=120, collective_timeout_s=30, fail_rank=1, config=cfg); raise AssertionError("no error")
except DistributedJobError as e: err = e
assert not isinstance(err, DistributedTimeoutError) and time.monotonic() - t0 < 60
test_eq(sorted(err.errors), [0, 1])                                  # both ranks reported an error of their own
assert err.errors[1] == "RuntimeError: injected failure on rank 1", err.errors
assert err.errors[0].startswith("stopped in a collective because a peer rank failed"), err.errors
assert str(err).startswith("distributed job 'failing_job' failed on ranks [0, 1]: rank 1: RuntimeError: injected")

# %%
#| test ranks_that_disagree_all_raise
cfg = MoEConfig(8, 2, 24, 16, dtype=torch.float32, max_num_tokens=8,
                parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
try: launch(disagreeing_counts_job, 2, timeout_s=120, collective_timeout_s=30, config=cfg); raise AssertionError("no error")
except DistributedJobError as e: err = e
test_eq(sorted(err.errors), [0, 1])                                  # the same clear error on both ranks
assert all("token_counts: expected the same (num_tokens, token_counts, seed) on every rank" in m for m in err.errors.values()), err.errors

# %%
#| test gather_ranks_that_disagree_all_raise
for rank_out in launch(gather_mismatch_job, 2, timeout_s=120, collective_timeout_s=30):   # never bytes read as another
    for case in ("dtype", "counts", "shape"):                                           # rank's dtype or shape
        assert "expected the same dtype, row shape and counts on every rank" in rank_out[case], (case, rank_out[case])
    for case in ("a2a quant_block", "a2a wire width", "a2a capacity", "a2a dtype",      # the all-to-all's row format
                 "ag quant_block", "ag wire width", "ag dtype", "ag fp32 for FP8", "ag ids dtype", "ag top_k"):
        assert "expected the same rows on every rank, got (dtype, wire width, quant_block" in rank_out[case], (case, rank_out[case])
    test_eq(rank_out["agree"], [[0.0, 0.0], [1.0, 1.0]])

# %%
#| test hang_fails_at_the_deadline
t0 = time.monotonic()
try: launch(sleeping_job, 1, timeout_s=6, seconds=3600); raise AssertionError("no timeout")
except DistributedTimeoutError as e: err = e
assert time.monotonic() - t0 < 20 and "still running after 6 s (a hang); every process was killed" in str(err)
for pid in err.pids:                                                  # nothing is left behind
    test_fail(lambda: os.kill(pid, 0), exc=ProcessLookupError)

# %%
#| test launch_bad_input
test_fail(lambda: launch(lambda: 0, 2), contains="fn: expected a module-level function the worker processes can import")
test_fail(lambda: launch(run_cases, 0, cases=[]), contains="world_size: expected >= 1, got 0")
test_fail(lambda: launch(run_cases, 2, timeout_s=0, cases=[]), contains="timeout_s: expected a finite number > 0")
test_fail(lambda: launch(run_cases, 2, backend="mpi", cases=[]), contains="backend: expected one of ['gloo', 'nccl']")
test_fail(lambda: sweep_cases(1), contains="world_size: expected >= 2, got 1")
test_fail(lambda: init_distributed(timeout_s=-1), contains="timeout_s: expected a finite number > 0")
test_fail(lambda: init_distributed(backend="mpi"), contains="backend: expected one of ['gloo', 'nccl'], got 'mpi'")

# %% [markdown]
# On a GPU: NCCL at world size 1, with the Triton experts, through both prepare/finalize classes and the main job; the
# all-to-all's FP8 slabs (FP8 on the wire) against the in-process FP8 dispatch's; and the all-gather's FP8 rows against
# its 16-bit rows, bit for bit.

# %%
#| test nccl_world_1
#| gpu
world_one = launch(world_one_job, 1, timeout_s=300, backend="nccl", experts="triton")[0]
test_eq([r["name"] for r in world_one[-2:]], ["fp8 on the wire/triton", "fp8 all-gather/triton"])
for res in world_one:
    if res.get("exact"): assert torch.equal(res["output"], res["reference"]), res["name"]   # the same codes, the same bits
    else: assert_close(res["output"], res["reference"], name=res["name"])
if torch.cuda.device_count() >= 2:                                   # a machine with two GPUs: the sweep on NCCL too
    for res in launch(run_cases, 2, timeout_s=300, backend="nccl", cases=sweep_cases(2, triton=True))[0]:
        if "error" not in res: assert_close(res["output"], res["reference"], name=f"nccl {res['name']}")

# %% [markdown]
# ## A run, and its report
#
# One small run on two processes, as `torchrun` would start it; rank 0's report:

# %%
demo_cfg = MoEConfig(8, 2, 64, 32, dtype=torch.float32, routing_method="grouped_topk", num_expert_group=4, topk_group=2,
                     name="tiny-grouped", parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True,
                                                                       all2all_backend="nixl_ep"))
demo_results = launch(run_cases, 2, timeout_s=120, cases=[dict(name="demo", config=demo_cfg, num_tokens=10,
                                                               placement="round_robin")])
print(format_distributed_report(demo_results[0][0]["report"]))

