# %% [markdown]
# # moe-lit
# > Mixture-of-Experts layers with expert parallelism — the design of vLLM's fused MoE, rebuilt small, correct by construction, and explained.

# %% [markdown]
# moe-lit is a literate Python + Triton library for the Mixture-of-Experts (MoE) layer of a transformer served with
# expert parallelism (EP). A layer routes each token to `top_k` of `num_experts` expert MLPs; under EP the experts
# live on different ranks and an *all2all backend* carries tokens to them and back. Whether the experts receive one
# flat token list (the **Standard** activation format) or per-expert slabs (the **BatchedExperts** format of DeepEP
# low-latency and NIXL EP) is a property of that backend — and every later choice must agree with it: the experts
# kernel, the placement of experts on ranks and its routing tables, how shared experts are added.
#
# In moe-lit every such fact is declared **once**, in one backend descriptor table (`moe_lit.config.BACKENDS`), and
# every decision is derived from it and can explain itself. Each module is a chapter: read the notebooks in order.
#
# Words used below (the chapter *Terms*, `00_terms`, has the whole vocabulary with vLLM's and Hugging Face's names):
#
# - **DP, TP, EP**: data, tensor and expert parallelism — ranks that split the tokens, each weight matrix, and the set
#   of experts. `--ep 8` is a deployment of 8 expert-parallel ranks.
# - **prepare / finalize**: the two halves of an all2all backend around the experts — prepare sends each token's row
#   to the ranks that hold its experts (dispatch), finalize brings the expert outputs back and sums them with the
#   router's weights (combine).
# - **slab**: in the BatchedExperts format, one local expert's block of rows, `[max tokens per expert, hidden]`.
# - **w13, w2**: an expert's fused gate-and-up projection `[2 · intermediate_size, hidden_size]` and its down
#   projection `[hidden_size, intermediate_size]`.
# - **placement, `expert_map`, routing tables**: which rank holds which expert (linear: contiguous blocks; round
#   robin: every `ep_size`-th); `expert_map` turns a global expert id into this rank's local index; round-robin
#   routing tables turn it into a *physical* id whose rank the dispatch can compute.
#   `needs_round_robin_routing_tables` says whether a backend's dispatch translates ids through them (where tokens
#   travel through all2all kernels without it, round-robin placement falls back to linear, and the report says why;
#   without all2all, each rank masks with its `expert_map` and round robin is kept).
# - **oracle**: the function that picks the experts kernel for a deployment, a device and a quantization scheme, from
#   the descriptor table, with the reason (`moe-lit explain` prints its decision table).
#
# ## Install and run
#
# On a fresh Linux machine with Python ≥ 3.11, from a clone of this repository, two commands. The first installs
# moe-lit into `.venv` and runs the main job on the built-in default, the MoE layer of Qwen3-30B-A3B (128 experts,
# top-8, hidden 2048, expert width 768). The install puts torch 2.13 in first, then the package with its development
# tools; pip takes the torch build its index offers: a CPU wheel where one is configured, otherwise PyPI's default
# CUDA build on Linux, several GB more.
#
# ```sh
# bash .ci/install && .venv/bin/moe-lit run
# ```
#
# It takes about two minutes:
#
# - the install: 70–90 s on an idle machine, 2–2.5 minutes beside other jobs; `.venv` is about 2 GB. It prints
#   nothing of its own; pip's `WARNING: Location '…' is ignored: it is neither a file nor a directory` lines name
#   package folders its configuration lists that this machine does not have, and are harmless;
# - the run: 4–7 s on 2 idle cores, 20–40 s on a busy machine or straight after the install; most of it is the
#   float64 reference and the checks (the report's time section splits it), at a peak of about 1.5 GiB resident.
#
# The second runs the whole test suite — the regeneration check, the exported tests under pytest, the wheel installed
# into a fresh venv, and the documentation site built (which executes every notebook except its test cells, which
# pytest has run, and fails on any failing cell) and opened in headless Chromium (about 8 minutes on 2 otherwise idle CPU
# cores: pytest about 4.5, the docs build about 1; longer with other runs sharing the cores, where pytest alone has
# taken 10.5). Its exit status says whether it passed (0: every step passed; it stops at the first that fails); after
# a pass the last line is the browser check's. When Chromium is missing it
# first installs Debian's package, which needs root or sudo and takes about a minute:
#
# ```sh
# bash .ci/test
# ```
#
# Without a GPU the kernels run in Triton's interpreter, which does not compile them; so the suite also compiles every
# kernel the layer launches for Hopper (sm_90) with Triton's bundled compiler (`moe_lit.testing.compile_for_gpu`) and
# executes the FP4 decode's inline PTX on the CPU, bit for bit (`emulate_ptx`).
#
# The commands further down (not the two above) assume the environment is active (`source .venv/bin/activate`); otherwise prefix them with
# `.venv/bin/` (`.venv/bin/moe-lit`, `.venv/bin/python`, `.venv/bin/torchrun`).
#
# `moe-lit run` prints the resolved parallel config with the reason for every backend property, the backend's record
# and whether the deployment uses it at all, the placement and routing tables, the per-expert load, the output checked
# against a float64 reference and the time of each part (weights, forward, references and checks). More to try:
#
# - **A wide-EP deployment.** `moe-lit run --model deepseek-v3 --ep 8 --all2all nixl_ep --placement round_robin` runs
#   the eight ranks of a DeepSeek-V3 deployment one after another in one process (never holding more than one rank's
#   weights) and checks that they sum to the single-device result, computed from the weights by global id, a few
#   experts at a time, independently of the ranks. On 2 idle CPU cores: 2.5–7 minutes (generating 11 billion random
#   expert weights, then again the experts the tokens reach for the float64 references, which with the checks take
#   the larger part), about 3.3 GiB resident at peak;
#   up to 12 minutes measured with other jobs sharing the cores. The report prints at the end (a progress bar shows the ranks on a terminal).
#   A placement the deployment cannot use falls back as vLLM's does, and the report says why (`placement linear
#   (requested round_robin; fell back to linear: round_robin needs num_expert_group > 1 ...)`).
# - **Tables and decisions.** `moe-lit tables` takes `run`'s deployment flags and prints every rank's placement tables
#   in full (`moe-lit tables --ep 8 --all2all nixl_ep`; without flags, the one rank of a single device); `moe-lit explain --ep 8 --all2all
#   nixl_ep --quant nvfp4_w4a16 --device h200` prints every property with its reason and the oracle's decision table.
#   For `explain`, `--device` is the GPU model the oracle decides for, `cpu` (the torch reference), `cpu-interpreter`
#   (the CPU running the Triton kernels, as `run --experts triton` does) or `detect` (this machine, the default); for
#   `run`, `--device` is where the layer runs: `auto`, `cpu` or `cuda`.
# - **Exit status** (also in `--help`): 0 when every check passes, 1 when a check of `run` fails, 2 on bad input (the
#   message names the flag), on a model too large for the machine's memory, or for `bench` without a CUDA GPU; 141
#   when the output pipe closes before the command has written everything (an output larger than the pipe's buffer:
#   `moe-lit tables --model deepseek-v3 --ep 256 --all2all nixl_ep --json | head -c 10`, about 550 kB; a short
#   output written whole before the reader closes ends with 0).
# - **Quantized experts.** `moe-lit run --quant fp8` (short for `fp8_w8a8_block`; also `mxfp4`, `nvfp4` and the other
#   schemes `--help` lists) quantizes the experts at load, one expert at a time, and checks against the dequantized
#   weights. On 2 idle CPU cores the default model takes 4–7 s unquantized, about 16 s with FP8 (5 minutes was
#   measured beside other jobs on the same 2 cores) and 60–220 s with
#   MXFP4 (nearly all of it generating and quantizing the random weights; it varies 3× between machines of one kind),
#   at a peak of 1.5, 3.2 and 3.1 GiB resident; the report's last line gives the run's own peak. The Triton kernels of
#   every quantized scheme take 16-bit activations, so with `--experts triton` a float32 layer is refused for them:
#   pass `--dtype bf16` (or `fp16`), or run the torch reference (`--experts torch`, the CPU's default), which takes
#   float32 too. With the Triton quantized experts the report adds a check against the kernels' own float64 spec,
#   which rounds the activations as the kernels do (5 % for FP8 where the float64 check allows 30 %; not for
#   per-tensor FP8, whose scale depends on which rows share a launch: one outlier or NaN row there changes every
#   row's output, see the quantization chapter).
#   A quantized layer does not save memory yet: beside the codes the experts read, it keeps its experts'
#   dequantized weights in the layer's dtype as its parameters (what its `state_dict` holds, what the references and
#   the dequantized emulations read, and what an edit goes through), so it holds the 16-bit weights plus the codes
#   (`12_layer`, "Quantized weights").
# - **Small shapes.** Without a GPU the experts run as the torch reference; `--experts triton` runs the Triton kernels
#   in Triton's CPU interpreter, meant for small shapes (a full-size model takes minutes). Shrink a model with a small
#   `config.json` passed as `--config` (any family's keys, e.g. Qwen3-MoE's: `model_type` qwen3_moe, `hidden_size`
#   64, `moe_intermediate_size` 32, `num_experts` 4 and `num_experts_per_tok` 2).
#
# `run`'s text abridges long lists; with `--json`, `run`, `tables` and `explain` print their full data.
# `moe-lit run --help` lists the options with their defaults (or what leaving one unset means), and `moe-lit --version` the version.
#
# ## Documentation
#
# Each notebook is a chapter of the documentation site (to read offline: `_docs/index.html` after `bash .ci/test`
# or `.venv/bin/python .ci/docs.py`, below). On a machine with Quarto, `nbdev_docs` builds it as a Quarto
# website (`_quarto.yml`). Where Quarto cannot be installed (it downloads itself at install time),
# `.venv/bin/python .ci/docs.py` builds the same chapters offline into `_docs/`: it executes every notebook on the CPU
# except its test cells (fresh outputs and figures), runs nbdev's own page processing, and renders each page with pandoc. `bash .ci/test`
# runs that build itself and then opens every page in headless Chromium (`.ci/browser.py`). The package itself installs as a wheel:
# `python -m build` gives `moe_lit-<version>-py3-none-any.whl`, which needs only torch, triton, numpy and fastcore
# (`[plot]` adds matplotlib, `[progress]` tqdm). Without a GPU the Triton kernels run in Triton's interpreter. The
# interpreter of triton 3.6, which the `[dev]` extra `.ci/install` installs pins, fails with numpy 2.4 or newer, so
# that extra pins numpy below it; installing the wheel alone lets pip pick a newer triton, whose interpreter works with the newer numpy (the wheel
# check prints the pair it got, e.g. `triton 3.9.0 numpy 2.4.6`). Should triton 3.6 meet numpy 2.4, moe-lit names the
# clash instead of failing inside Triton.
#
# ## In Python
#
# A layer is an `nn.Module`: `FusedMoE(config)` holds the router and the experts (random weights from `seed` unless
# `weights=` gives them) and `layer(x)` runs routing, experts and shared experts on `[num_tokens, hidden_size]`.
# Without a GPU, `experts="auto"` runs the torch reference; to run the Triton kernels in Triton's CPU interpreter from
# Python, set `TRITON_INTERPRET=1` in the environment before moe-lit's kernels are imported and pass
# `experts="triton"` (the `moe-lit` command sets it itself; importing moe-lit never changes the environment).
# `layer.experts_reason` says why its experts run where they do, and `backend=` (on the command line `--backend`)
# forces one of the oracle's candidates — on the CPU a Triton one with `experts="triton"`, which runs it in the
# interpreter. `select_experts_backend(cfg, "fp8", cfg.activation_format, DEVICES["h200"]).table()` (a
# quantization scheme's name, "unquantized" for none; `select_experts_backend` and `DEVICES` from `moe_lit.oracle`) gives the decision table `moe-lit explain` prints (as Markdown, where the command aligns plain
# text), for any device model. `FusedMoE(config, quant="fp8")` (or "mxfp4", "nvfp4", any name `moe-lit run --quant`
# takes) quantizes the experts at construction, as `run --quant` does. A model's own
# `config.json` gives the config: `moe_lit.models.moe_config_from_hf(path)` (then `FusedMoE.from_pretrained(dir,
# layer_index)` for its weights). The dtype is the config's and fixed when the layer is built: a cast to it
# (`model.to(torch.bfloat16)` around a bf16 layer) keeps the router fp32; a cast to another is refused — build the
# layer in the dtype wanted (`config.replace(dtype=...)`).

# %%
import torch
from moe_lit.config import ParallelConfig
from moe_lit.models import preset
from moe_lit.layer import FusedMoE, run_emulated_ep

# %%
cfg = preset("qwen3-30b-a3b").replace(num_experts=16, hidden_size=128, intermediate_size=64)   # scaled down
layer = FusedMoE(cfg, seed=0)
x = torch.randn(8, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(cfg.dtype)
y = layer(x)
print(y.shape, y.dtype, layer.experts)                 # torch.Size([8, 128]) torch.bfloat16 torch

# %% [markdown]
# The same layer on four expert-parallel ranks behind NIXL EP, run one rank after another in this process and summed
# (`run_emulated_ep`), against the float64 reference and the single-device output above. (`ParallelConfig.make`'s
# `all2all_backend` defaults to `"none"`: every rank sees every token and masks with its `expert_map`. The command's
# `--ep` without `--all2all` takes `allgather_reducescatter`, vLLM's default backend.)

# %%
par = ParallelConfig.make(tp_size=1, dp_size=4, enable_expert_parallel=True, all2all_backend="nixl_ep")
ep_cfg = cfg.replace(parallel=par)
print(ep_cfg.activation_format.value, ep_cfg.needs_round_robin_routing_tables)  # batched_experts True: the nixl_ep record's
run = run_emulated_ep(ep_cfg, x)
print(f"max |EP - float64| = {(run.output.double() - run.reference).abs().max():.3g}")   # 0.00713 (bf16 rounding)
print(f"max |EP - one device| = {(run.output.float() - y.float()).abs().max():.3g}")     # 0.00391

# %% [markdown]
# ## A real model's layer
#
# `FusedMoE.from_pretrained(checkpoint_dir, layer_index)` builds decoder layer `layer_index`'s MoE block from a Hugging
# Face checkpoint directory (`config.json` + `*.safetensors`, sharded or not), reading only the experts the rank owns;
# pre-quantized FP8-block (DeepSeek-V3) and MXFP4 (gpt-oss) checkpoints keep their codes as stored. The families it
# reads (`model_type`): `qwen2_moe`, `qwen3_moe`, `qwen3_next`, `mixtral`, `deepseek_v2`, `deepseek_v3`,
# `glm4_moe`, `gpt_oss`, `llama4` / `llama4_text` and `minimax_m2`; another model type is refused by name. The example
# writes a tiny Qwen3-MoE with transformers itself (the `hf` extra, `pip install '.[hf]'` from a clone, adds
# transformers and safetensors; the install above has them) — point `ckpt` at your own checkpoint instead:

# %%
import tempfile, torch
from moe_lit.layer import FusedMoE
from moe_lit.testing import tiny_hf_model, hf_moe_block, hf_moe_output

# %%
ckpt = tempfile.mkdtemp()
model = tiny_hf_model("qwen3_moe")          # a seeded transformers model: AutoModelForCausalLM.from_config(...)
model.save_pretrained(ckpt)
layer = FusedMoE.from_pretrained(ckpt, layer_index=1, dtype=torch.float32)
x = torch.randn(4, layer.config.hidden_size)
print(f"max |moe-lit - transformers| = {(layer(x) - hf_moe_output(hf_moe_block(model, 1), x)).abs().max():.2g}")
# 0 for this float32 model on the CPU: both sides round alike here; `12c_real_models` holds every family to float64

# %% [markdown]
# The other way round, moe-lit runs the experts of every MoE layer inside a transformers model:

# %%
from transformers import AutoModelForCausalLM
from moe_lit.integrations.transformers import register, check_model

# %%
register()                                  # adds the experts implementation "moe_lit"
hf = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="moe_lit")
print(sorted(check_model(hf)))              # the MoE blocks whose experts moe-lit now runs
# ['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']

# %% [markdown]
# On a CUDA device the registered experts run moe-lit's Triton kernels; on a CPU (and wherever a forward needs a
# gradient) they run moe-lit's torch reference, which keeps the model's own dtype, float64 included; the gradients
# reach the expert parameters as eager's do, also for layouts moe-lit copies (gpt-oss's transposed, interleaved one).
# Weights edited in place (`with torch.no_grad(): p.mul_(2)`, an optimizer step, `load_state_dict`) are followed. A
# write through `p.data` bumps no version counter, so what moe-lit derived from the weight stays as it was: in the
# transformers integration, the converted copy of a layout it copies (gpt-oss's; Qwen3's and Mixtral's are used as
# they are) — call `moe_lit.integrations.transformers.clear_cache()` after such a write, and after a fused
# optimizer's steps taken while the model ran another experts implementation; in a `FusedMoE`, the router's
# 16-bit copy of the gate (bf16/fp16 layers) and a quantized layer's codes — call `layer.refresh()`, which re-derives
# them (a layer built with `debug=True` names the stale one at its next call).
# `check_model` raises, naming the blocks, for a model whose experts moe-lit cannot reach (Llama-4's: transformers
# does not send them through that interface), and for one loaded without `experts_implementation="moe_lit"` (its
# blocks run transformers' own experts; `check_model(model, selected=False)` asks only whether moe-lit could reach
# them), and for a quantized one: on a GPU transformers keeps an FP8 or MXFP4 checkpoint's experts quantized, in its
# own classes (loading either needs `pip install accelerate`; on a CPU it dequantizes FP8 by itself). Load it
# dequantized, or run its MoE layers with moe-lit as below (`FusedMoE.from_pretrained`, `moe-lit run --weights`), which
# keeps the FP8-block and MXFP4 codes. And the main job on a
# checkpoint's layer: `.venv/bin/moe-lit run --weights CHECKPOINT_DIR --layer N` (any `--ep`/`--all2all` deployment;
# without `--layer`, the first MoE layer; a pre-quantized checkpoint runs its stored codes unless `--quant` says
# otherwise, on an all2all that sends its hidden size unpadded — the error names those that do). On an expert-parallel deployment, `FusedMoE.from_pretrained(ckpt, N, parallel=...)` builds one rank's
# layer and reads only that rank's experts. Each rank's `forward` adds the shared experts by default: to sum the ranks'
# outputs for the same tokens, call all ranks but one with `add_shared=False`, as `run_emulated_ep` does. The chapter *Loading a real model*
# (`12c_real_models`) has the key layouts and the parity with transformers' own blocks for every family.
#
# For decode on a GPU, `layer.capture(batch_sizes=(1, 2, 4, ..., 256))` records one CUDA graph of the whole forward per
# token bucket, and later calls replay the smallest bucket that fits; the forward never synchronises with the host
# (`debug=True` turns the value checks back on, in eager forwards: a layer built with it refuses to capture). Eager, after the first call of each shape, every Triton kernel is
# launched straight from its compiled binary, skipping the JIT's per-call binding (`MOE_LIT_FAST_LAUNCH=0` turns that
# off), and from the third call of a shape the forward replays a *launch plan* recorded at the second — its torch ops
# and launches without moe-lit's Python, the same bits (`12_layer`; on an H100 the host overhead at one token fell
# from 11–222 µs to 2–24 µs; `MOE_LIT_LAUNCH_PLAN=0` turns it off). On NIXL EP and DeepEP low-latency deployments
# with FP8-block *Triton* experts (on a GPU, or `--experts triton` in the interpreter, on a bf16 or fp16 model) the dispatch sends
# each row as FP8 with its 1×128 scales, as those backends do, and GEMM1 quantizes nothing;
# `10_modular.dispatch_quantization` says when and why, and `moe-lit run`'s report prints it as "activations on the
# wire" whenever the all2all is in use (the `--distributed` run's report too: its all-to-all sends the FP8 rows, and
# DeepEP high-throughput's all-gather sends each token's row as FP8). On Hopper and newer GPUs a layer without shared experts launches its kernels with programmatic dependent
# launch, so that each kernel's launch overlaps the end of the one before (`06_kernels.batched`: replays gain up to
# 5.5 µs on one chain of kernels and lose 5–10 µs where shared experts run beside it, so those layers keep it off);
# `MOE_LIT_PDL=1` or `0`, set before import, turns it on or off for every layer. At decode the Standard-format experts'
# second GEMM also sums each token's slots, one launch fewer, where that was measured faster: no shared experts' addend
# and no w2 bias (the class attribute `moe_lit.kernels.contiguous.TritonExperts.combine_in_gemm2`: "auto", "always"
# or "never"). Otherwise FP8 w8a8 layers quantize
# their 16-bit activations in a launch before each GEMM; `MOE_LIT_FP8_ACT_QUANT=loop`, set before import, has the GEMMs quantize
# each 1×128 group in their K loop instead, where the K tile is one group (measured slower on every H100 row,
# `09c_kernels.quant`). The Triton layer is an inference layer: it keeps no autograd
# graph, so a forward whose input needs a gradient is refused by name (run it under `torch.inference_mode()`, or build
# the layer with `experts="torch"` for gradients through it: to `hidden` as built, and to the experts' `w13` and `w2`
# once you call `requires_grad_()` on them, since they are created frozen; the router's `gate` is a buffer, never trained).
# `moe-lit bench --layer` measures the whole layer, eager and replayed,
# against the bytes it must read and against transformers' own MoE blocks (`14a_bench_layer`).
#
# %% [markdown]
# ## Module map
#
# | notebook | module | what it decides or computes |
# |---|---|---|
# | `00_terms` | `moe_lit.terms` | vocabulary, dimension legend, names in vLLM and Hugging Face, argument checks |
# | `00_testing` | `moe_lit.testing` | the one float64 comparison policy, the poison for unwritten rows, kernels compiled for sm_90 and inline PTX run without a GPU |
# | `01_config` | `moe_lit.config` | the backend descriptor table, `ParallelConfig` (vLLM's flattening rule), `MoEConfig` |
# | `02_models` | `moe_lit.models` | real-model presets and Hugging Face `config.json` parsing |
# | `03_routing` | `moe_lit.routing` | softmax / sigmoid / grouped top-k routers, correction bias, per-expert load |
# | `03a_kernels.router` | `moe_lit.kernels.router` | every routing method in one Triton launch, and at decode the router GEMV before it in one more, checked against the torch routers |
# | `04_placement` | `moe_lit.placement` | linear and round-robin placement, `expert_map`, routing tables, EPLB replicas |
# | `05_formats` | `moe_lit.formats` | the Standard and BatchedExperts contracts and the reference MoE in both |
# | `06_kernels.batched` | `moe_lit.kernels.batched` | Triton batched-experts GEMM with fused SiLU-and-mul, tile tables, split-K and compact expert slots for small decode grids (shared by every grouped GEMM) |
# | `07_kernels.dispatch` | `moe_lit.kernels.dispatch` | Triton dispatch into per-expert slabs, the weighted combine (with the shared experts' output in its sum), local slots in one launch |
# | `08_kernels.contiguous` | `moe_lit.kernels.contiguous` | Triton `moe_align_block_size` and the fused-MoE GEMM over aligned blocks |
# | `09_quant` | `moe_lit.quant` | FP8 (tensor / channel / token / 128×128 block), MXFP4 and NVFP4 quantize and dequantize |
# | `09a_quant_weights` | `moe_lit.quant_weights` | the quantized expert-weight container, the mma128 FP4 layout the kernels read (re-laid at load), quantizing a layer's experts, test weights (torch only) |
# | `09b_kernels.quant_act` | `moe_lit.kernels.quant_act` | Triton FP8 activation quantizer (tensor / token / 1×128 group), padding rows skipped |
# | `09c_kernels.quant` | `moe_lit.kernels.quant` | FP8 w8a8 (1×128 activation groups) and FP4 w4a16 Triton GEMMs of both formats |
# | `09d_kernels.quant_experts` | `moe_lit.kernels.quant_experts` | quantized experts of both formats: both GEMMs, expert biases, the intermediate re-quantized |
# | `10_modular` | `moe_lit.modular` | prepare/finalize × experts composed only when formats match; shared experts once |
# | `11_oracle` | `moe_lit.oracle` | experts-backend selection from the prepare/finalize's format, with a reason per candidate |
# | `11a_weights` | `moe_lit.weights` | the weight-source protocol: random per expert, a mapping of tensors |
# | `11b_layouts` | `moe_lit.layouts` | each family's checkpoint key layout, which decoder layers are MoE, the quantization a config names |
# | `11c_checkpoint` | `moe_lit.checkpoint` | one MoE layer of a Hugging Face checkpoint: lazy safetensors reads in moe-lit's layout, FP8/MXFP4 codes |
# | `12_layer` | `moe_lit.layer` | `FusedMoE` (from any weight source or `from_pretrained`) and the emulated EP run |
# | `12b_integrations.transformers` | `moe_lit.integrations.transformers` | moe-lit as a transformers experts implementation (`experts_implementation="moe_lit"`) |
# | `12c_real_models` | `moe_lit.real_models` | loading a real model: key-layout table, parity with transformers for every family |
# | `13_dispatch_plan` | `moe_lit.dispatch_plan` | the plan of an EP dispatch: owner rank and slot per pair, send counts, slab rows, a figure |
# | `13a_transport` | `moe_lit.transport` | EP across processes on torch.distributed: all-gather/reduce-scatter and all-to-all prepare/finalize |
# | `13b_distributed` | `moe_lit.distributed` | the main job on N processes (`torchrun -m moe_lit.distributed`), checked against one process |
# | `13c_launch` | `moe_lit.launch` | start N processes in one torch.distributed group from Python; the multi-process tests |
# | `14_bench` | `moe_lit.bench` | both formats' GEMMs against torch peers and the measured roofline, quantized decode, tuning |
# | `14a_bench_layer` | `moe_lit.bench_layer` | the whole layer, eager and graph-replayed, against its floor and transformers' blocks |
# | `15_cli` | `moe_lit.cli` | the `moe-lit` command: `run`, `tables`, `explain`, `bench` |
# | `15a_entry` | `moe_lit.entry` | the console script's front door (`--version` without importing torch) |
# | `15b_report` | `moe_lit.report` | the report of `moe-lit run` as text: sections, abridged lists |
#
# ## Developing
#
# The notebooks in `nbs/` (jupytext percent files) are the source; `moe_lit/`, `tests/test_*.py` and this README are
# generated from them by `python .ci/regen.py`, and the test command fails when the generated files are out of date.
# Cells tagged `#| test NAME` are exported as pytest tests; cells tagged `#| gpu` run only with `bash .ci/test --gpu`
# on a machine with a CUDA GPU. One chapter's tests, without a GPU:
# `TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -m "not gpu" tests/test_transport.py` (the file is named by the
# chapter's module, dots as underscores: `06_kernels.batched` is `tests/test_kernels_batched.py`).
#
# Without a GPU the Triton kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`, set by the test command and by the `moe-lit` command; importing moe-lit never changes the environment), at
# small shapes. On a machine with a CUDA GPU, `bash .ci/gpu` runs the whole suite including the full-size `gpu` tests,
# a `compute-sanitizer` memcheck of the kernel tests, the DeepSeek-V3 EP8 job on the GPU and `moe-lit bench`
# (`bash .ci/gpu --tune` re-tunes the tile tables first); `bash .ci/gpu-multi` runs the distributed job over NCCL
# with one GPU per process. The committed H100 and H200 results are in `nbs/bench/`; `14a_bench_layer` lists every
# run of the layer benchmark.
#
# ## Across processes
#
# The same layer runs across real processes on torch.distributed (gloo on CPUs, NCCL with one GPU per process);
# the ranks gather the output, and rank 0 checks it against the single-process result:
#
# ```sh
# .venv/bin/torchrun --nproc-per-node 2 -m moe_lit.distributed --model qwen3-30b-a3b --all2all nixl_ep
# ```
#
# `torchrun --nproc-per-node 2 -m moe_lit.cli run --distributed ...` is the same job through `moe-lit run` (presets
# or a `--config`, one EP rank per process, on random weights; `--ep` must equal the number of processes (unset:
# that number) and
# `--all2all` to `allgather_reducescatter`; `--weights`, `--tp`, `--backend` and `--device` are refused there). `--quant` quantizes each rank's experts at load; with `--quant fp8` and Triton experts
# (`--experts triton` on a CPU; presets are bf16, a float32 `--config` needs `--dtype bf16`), NIXL EP, DeepEP
# low-latency and DeepEP high-throughput send each row as FP8 with its scales, about
# half the bytes, and the report's "on the wire" line says so. With a
# small `--config` (a config.json with hidden 64 and 4 experts, as in *Install and run*) the two processes finish in
# seconds on a CPU. Each process holds its
# own experts' weights, so DeepSeek-V3 needs about 12 GB per process at 2 processes.
