"""Tile tables for the layer's own GEMM calls at decode, tuned by replaying the whole layer (GPU).

    [TUNE_MAX_TOKENS=64] python nbs/bench/tune_layer.py OUT_DIR [deployment index ...]

`bench --tune` (14_bench) tunes GEMM1 alone on synthetic slabs at one batch per model, so at small T the layer's
two GEMMs mostly run on the heuristic tile (`default_tile_config`), and GEMM2's shape (N = hidden) has no table at
all. This script tunes the tile of each GEMM call site of every `LAYER_DEPLOYMENTS` entry, per tile-table bucket
(`expected_m` = T·top_k / num_experts, the key the layer looks tables up by), for T = 1 .. TUNE_MAX_TOKENS (64) where that bucket
is <= 16 rows per expert (decode). Each candidate is written into a copy of the package's tables under
OUT_DIR/configs (`MOE_LIT_TILE_CONFIG_DIR`), the tile caches are cleared, and the layer is captured and replayed
at the smallest and largest T of the bucket: the time is the whole layer's, so a tile is judged where it runs.
A candidate is kept only when it beats the bucket's current tile by 3 % and its output matches the current
output (relative error <= 2e-2: a wrong tile shows as O(1)). GEMM1 is tuned first (for the Standard format its
BLOCK_M is the alignment block, which GEMM2 then shares), then GEMM2. Tables are written as they improve, so a
cut-off run keeps what it finished; OUT_DIR/tune_layer.json lists every timing.

The candidates are `14_bench.tile_candidates`'. The committed log `tune_layer_h200_b39ccfc.json` came from this
script's first, private list (BLOCK_M 16 only up to 8 rows, plus BLOCK_K 64 at 6 stages); every tile it kept is in
the shared list.
"""
import json, os, shutil, sys, time
from pathlib import Path
import torch
import moe_lit
from moe_lit.bench import tile_candidates
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, LAYER_TOKENS, deployment_config
from moe_lit.config import ActivationFormat
from moe_lit.kernels import batched as kb, contiguous as kc, quant as kq
from moe_lit.kernels.batched import fit_shared_memory, tile_config_path
from moe_lit.layer import FusedMoE

out = Path(sys.argv[1]); cfg_dir = out / "configs"
if not cfg_dir.exists(): shutil.copytree(Path(moe_lit.__file__).parent / "configs", cfg_dir)
os.environ["MOE_LIT_TILE_CONFIG_DIR"] = str(cfg_dir)
order = [int(a) for a in sys.argv[2:]] or [0, 4, 1, 3, 5, 2]
max_tokens = int(os.environ.get("TUNE_MAX_TOKENS", 64))   # the largest T whose bucket is tuned (16: Qwen3's m = 1)
device_name = torch.cuda.get_device_name()
log = []


def reset_tiles(layer):
    """Forget every resolved tile, parsed table and launch plan: the kernels resolve tiles once per shape in their
    `functools.lru_cache`s (a table's entry, the tile, the whole launch plan, the alignment block), and the layer keeps
    its ModularKernels and recorded launches. Every such cache of the kernel modules is cleared, so one added later
    cannot keep a stale tile (the first version of this script cleared four by name and, once launch plans were
    cached, timed the same tile for every candidate)."""
    for mod in (kb, kc, kq):
        for f in vars(mod).values():
            if callable(getattr(f, "cache_clear", None)): f.cache_clear()
    layer._kernels, layer._plans, layer._seen, layer.graphs = {}, {}, set(), {}


def candidates(m: int, kernel: str, gated: bool, block_m: int | None) -> list[dict]:
    "`14_bench.tile_candidates` for `m` rows that fit `gated`'s shared memory; `block_m` (GEMM2 on GEMM1's alignment) fixed."
    cands = [c if block_m is None else dict(c, BLOCK_M=block_m) for c in tile_candidates(m, kernel)]
    unique = list({tuple(sorted(c.items())): c for c in cands}.values())
    return [c for c in unique if fit_shared_memory(c, gated, 2) == c]


def replay_us(layer, x, n=20) -> tuple[float, torch.Tensor]:
    "The mean of `n` replays of a fresh capture of the layer at `x`'s T, and its output."
    T = len(x)
    layer.capture([T], warmup=2)
    g, sx, sy = layer.graphs[T]; sx.copy_(x)
    for _ in range(3): g.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): g.replay()
    e.record(); torch.cuda.synchronize()
    y = sy.clone(); layer.graphs = {}
    return s.elapsed_time(e) / n * 1e3, y


for d in order:
    dep = LAYER_DEPLOYMENTS[d]
    t0 = time.time()
    layer = FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"])
    c = layer.config
    kernel = "batched_moe_gemm" if c.activation_format is ActivationFormat.BatchedExperts else "fused_moe_gemm"
    (E, N1, K1), N2, H = layer.w13.shape, layer.w2.shape[1], c.hidden_size   # K1, N2: the padded hidden size
    groups = {}
    for T in (t for t in LAYER_TOKENS if t <= max_tokens):
        m = max(1, T * c.top_k // layer.placement.num_experts)
        if m <= 16: groups.setdefault(m, []).append(T)
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = {T: torch.randn(T, H, device="cuda", dtype=c.dtype, generator=g) for Ts in groups.values() for T in Ts}
    for gemm, N in ((1, N1), (2, N2)):
        path = tile_config_path(kernel, E, N, device_name, torch.bfloat16, cfg_dir)
        for sib in kb.TILE_TABLE_SIBLINGS.get(device_name, ()):     # a card without its own table starts from the
            sp = tile_config_path(kernel, E, N, sib, torch.bfloat16, cfg_dir)   # sibling's it ran on: entries not
            if not path.exists() and sp.exists():                    # tuned here (prefill) stay as they were
                path.parent.mkdir(parents=True, exist_ok=True); path.write_text(sp.read_text())
        for m, Ts in groups.items():
            Ts = sorted({Ts[0], Ts[-1]})
            table = json.loads(path.read_text()) if path.exists() else {}
            before = table.get(str(m))

            def measure(entry):
                t = {k: v for k, v in table.items() if k != str(m)}
                if entry is not None: t[str(m)] = entry
                path.parent.mkdir(parents=True, exist_ok=True)
                if t: path.write_text(json.dumps(t, indent=1, sort_keys=True))
                else: path.unlink(missing_ok=True)            # no entry: the heuristic, as before
                reset_tiles(layer)
                return [replay_us(layer, xs[T]) for T in Ts]

            base = measure(before)
            base_us = sum(u for u, _ in base)
            block_m = None
            if gemm == 2 and kernel == "fused_moe_gemm":     # GEMM2 runs on GEMM1's alignment block
                block_m = kb.lookup_tile_config(kernel, E, N1, K1, m, c.dtype)["BLOCK_M"]
            best, best_us, tried = before, base_us, []
            for cand in candidates(m, kernel, gemm == 1, block_m):
                try: res = measure(cand)
                except Exception as exc:                      # out of resources on this GPU: not a candidate
                    tried.append(dict(tile=cand, error=type(exc).__name__)); continue
                err = max(float((y.double() - y0.double()).norm() / y0.double().norm()) for (_, y), (_, y0) in zip(res, base))
                us = sum(u for u, _ in res)
                tried.append(dict(tile=cand, us=us, rel_err=err))
                if err <= 2e-2 and us < best_us * (0.97 if best is before else 1.0): best, best_us = cand, us
            measure(best)                                     # leave the winner (or the old entry) in the table
            row = dict(deployment=dep["name"], kernel=kernel, gemm=gemm, E=E, N=N, expected_m=m, tokens=Ts,
                       before=before, before_us=base_us, after=best, after_us=best_us, tried=tried)
            log.append(row)
            print(f"{dep['name']:<45} GEMM{gemm} m={m:<3} T={Ts}: {base_us:7.1f} -> {best_us:7.1f} us  {best}", flush=True)
            (out / "tune_layer.json").write_text(json.dumps(dict(device=device_name, rows=log), indent=1))
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    layer = None; torch.cuda.empty_cache()
