# %%
#| default_exp entry

# %% [markdown]
# # The command's front door
# > moe-lit --version answers at once, without importing torch; every other command goes to moe_lit.cli.

# %%
#| export
from __future__ import annotations
import sys

# %%
#| hide
import subprocess
from fastcore.test import test_eq

# %% [markdown]
# The console script `moe-lit` points here. The commands of `15_cli` need torch and the package's tables for their
# argument choices (model presets, backends, quantization schemes), and importing torch alone takes one to two
# seconds; `--version` needs none of that, so it is answered before anything heavy is imported.

# %%
#| export
def main(argv: list[str] | None = None) -> int:
    "The `moe-lit` console script: `--version` answered from the package alone; anything else is `moe_lit.cli.main`."
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--version"]:
        from moe_lit import __version__
        print(f"moe-lit {__version__}")
        return 0
    from moe_lit.cli import main as cli_main
    return cli_main(args)

# %%
#| test version_without_torch
code = "import sys, moe_lit.entry as e; e.main(['--version']); assert 'torch' not in sys.modules, 'torch imported'"
out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
test_eq((out.returncode, out.stderr), (0, ""))
assert out.stdout.startswith("moe-lit "), out.stdout
