"""pytest set-up shared by the generated test files (hand-written; the test_*.py files are generated).

Without a CUDA device, Triton kernels must run in the interpreter: TRITON_INTERPRET has to be in the
environment before any module that *defines* a kernel is imported, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter hard-wires debug=False, which silences tl.device_assert and Triton's int32-overflow
    # sanitizer; switch both on so an offset that would wrap on the GPU fails the test here instead.
    import dataclasses
    import triton.runtime.interpreter as _ti
    _ti.interpreter_builder.options = dataclasses.replace(_ti.interpreter_builder.options, debug=True)


def pytest_collection_modifyitems(config, items):
    "Leave `gpu`-marked tests out on a machine without a GPU (they are full-size sweeps for the device)."
    if torch.cuda.is_available(): return
    kept = [it for it in items if "gpu" not in it.keywords]
    dropped = [it for it in items if "gpu" in it.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# fastcore's helpers are named test_*; generated files import them, so tell pytest they are not tests.
import fastcore.test as _ft
for _name in dir(_ft):
    if _name.startswith("test"): setattr(getattr(_ft, _name), "__test__", False)


def pytest_runtest_teardown(item, nextitem):
    """On a GPU, hand the blocks a test's tensors left in PyTorch's caching allocator back to the device after it: under
    `pytest -n 4` the workers share one card, and a worker that ran a full-size test otherwise keeps tens of GiB
    reserved while another worker's test runs out of memory (seen on an 80 GB card, never on a 141 GB one)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
