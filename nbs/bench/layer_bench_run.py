"""The whole layer benchmark with every deployment's rows saved as they finish (a cut-off run keeps what it measured),
then the figure beside the JSON.

    python nbs/bench/layer_bench_run.py OUT.json            # every deployment; writes OUT.json and OUT.png
    python nbs/bench/layer_bench_run.py OUT.json 1 4        # only LAYER_DEPLOYMENTS[1] and [4] (a partial run: no figure)
"""
import json, sys
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, bench_layer, format_bench_layer, plot_bench_layer
from moe_lit.bench import source_commit

chosen = [LAYER_DEPLOYMENTS[int(i)] for i in sys.argv[2:]] or None
rows = []
def save(new):
    rows.extend(new); print(format_bench_layer(dict(rows=new)), flush=True)
    json.dump(dict(commit=source_commit(), rows=rows, partial=True), open(sys.argv[1], "w"), indent=1)
rep = bench_layer(sys.argv[1], chosen, on_rows=save)
if chosen is None: plot_bench_layer(rep).savefig(sys.argv[1].replace(".json", ".png"), dpi=110)
