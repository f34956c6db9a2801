"""Tune the FP4 (w4a16) and FP8 (block) GEMM tiles on the decode scenarios, then benchmark every quantized scheme with them.

    python nbs/bench/tune_quant.py OUT_DIR [w4a16|fp8]    # default: both kernel sets
writes OUT_DIR/configs/<kernel>/E=..,N=..,device_name=..,dtype=bf16.json (the tables the launchers read; copy them into
moe_lit/configs/), OUT_DIR/tune_quant.json (every candidate's time) and OUT_DIR/quant_bench.json (bench_quant with the
new tables). OUT_DIR/configs starts as a copy of the package's tables, so the kernels not tuned in this run keep theirs
(and the bench times them as the layer would run them).
"""
import json, os, shutil, sys
from pathlib import Path
import moe_lit
out = Path(sys.argv[1]); cfg_dir = out / "configs"
shutil.copytree(Path(moe_lit.__file__).parent / "configs", cfg_dir, dirs_exist_ok=True)
os.environ["MOE_LIT_TILE_CONFIG_DIR"] = str(cfg_dir)       # the launchers read the tables written here
from moe_lit.bench import SCENARIOS, TUNE_SETS, measure_device, tune_scenario, _save_tile, bench_quant, format_bench_quant
from moe_lit.bench import source_commit
dev = measure_device()
sweeps = []
for sc in [s for s in SCENARIOS if "decode" in s["name"]]:
    for kernel in [k for s in (sys.argv[2:] or ["w4a16", "fp8"]) for k in TUNE_SETS[s]]:
        best, timings = tune_scenario(sc, kernel=kernel)
        _save_tile(kernel, sc, best, dev["device_name"], cfg_dir)
        t = min(t for _, t in timings)
        print(f"{sc['name']:<24} {kernel:<24} best {t:7.1f} us {best}", flush=True)
        sweeps.append(dict(scenario=sc["name"], kernel=kernel, best=best, timings=timings))
tables = {str(p.relative_to(cfg_dir)): json.loads(p.read_text()) for p in sorted(cfg_dir.rglob("*.json"))}
json.dump(dict(device=dev, commit=source_commit(), sweeps=sweeps, tables=tables), open(out / "tune_quant.json", "w"), indent=1)
rows = bench_quant(dev)
print(format_bench_quant(rows), flush=True)
json.dump(dict(device=dev, commit=source_commit(), quant=rows), open(out / "quant_bench.json", "w"), indent=1)
