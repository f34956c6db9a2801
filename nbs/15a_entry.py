# %%
#| default_exp entry

# %% [markdown]
# # The command's front door
# > moe-lit --version answers at once, without importing torch; every other command goes to moe_lit.cli.

# %%
#| export
from __future__ import annotations
import argparse, sys

# %%
#| hide
import os, subprocess
from fastcore.test import test_eq

# %% [markdown]
# The console script `moe-lit` points here. The commands of `15_cli` need torch and the package's tables for their
# argument choices (model presets, backends, quantization schemes), and importing torch alone takes one to two
# seconds. The command's skeleton — its name, `--version`, the four subcommands and what each does — needs none of
# that: it lives here, `15_cli` adds each subcommand's options to it, and `moe-lit --version` and `moe-lit --help` are
# answered before anything heavy is imported.

# %%
#| export
COMMANDS = {   # subcommand -> what it does (the top-level help)
    "run": "build a model's MoE layer on a deployment and report every decision and check",
    "tables": "print the placement and routing tables of a deployment",
    "explain": "the resolved properties and the oracle's decision table for a deployment",
    "bench": "benchmark the experts GEMMs of both formats (with --layer, the whole layer) against peers and the roofline (GPU)",
}

EXIT_STATUS = ("exit status: 0 when every check passes, 1 when a check of run fails, 2 on bad input (also a model "
               "too large for this machine's memory, or bench without a CUDA GPU), 141 on a closed output pipe")

class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    "Help with each option's default, except where it is None: those options say in their text what unset means."
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

def command_parser() -> tuple[argparse.ArgumentParser, dict]:
    """`(parser, {subcommand: its parser})`: the `moe-lit` command with its subcommands and none of their options.
    Raises nothing itself; the parser it returns raises SystemExit(2) for a bad command line and SystemExit(0) after
    `--help` or `--version`, as argparse does. Source: argparse's subcommands (`add_subparsers`)."""
    from moe_lit import __version__
    fmt = _DefaultsHelp
    ap = argparse.ArgumentParser(prog="moe-lit", description="Mixture-of-Experts layers with expert parallelism.",
                                 epilog=EXIT_STATUS, formatter_class=fmt, allow_abbrev=False)   # a flag is spelled out: --config is not
                                                                            # taken for bench's --config-dir
    ap.add_argument("--version", action="version", version=f"moe-lit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    return ap, {name: sub.add_parser(name, help=text, epilog=EXIT_STATUS, formatter_class=fmt, allow_abbrev=False)
                for name, text in COMMANDS.items()}

def main(argv: list[str] | None = None) -> int:
    """The `moe-lit` console script: `--version` and `--help` from the skeleton alone; anything else is
    `moe_lit.cli.main`. Returns 0 after `--version`/`--help`, 2 for a bad `MOE_LIT_*` environment switch (one line on
    stderr); other ValueErrors from importing `moe_lit.cli` propagate, and a bad command line is argparse's
    SystemExit(2) from `moe_lit.cli.main`. Source: argparse, and the console-script entry point of the package."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["--version"], ["--help"], ["-h"]):
        try: command_parser()[0].parse_args(args)       # prints, then exits
        except SystemExit as e: return e.code
    try: from moe_lit.cli import main as cli_main
    except ValueError as e:             # a moe-lit environment switch read when its module is imported (`env_choice`)
        if not str(e).startswith("MOE_LIT_"): raise
        prog = "moe-lit" + (f" {args[0]}" if args and args[0] in COMMANDS else "")
        print(f"{prog}: error: {e}", file=sys.stderr)      # as argparse words a bad flag: one line, status 2
        return 2
    return cli_main(args)

# %%
#| test version_without_torch
code = "import sys, moe_lit.entry as e; sys.exit(e.main(['tables']))"      # a switch read at import: named, no traceback
out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "MOE_LIT_LAUNCH_PLAN": "2"})
test_eq((out.returncode, out.stderr.count("\n")), (2, 1))
assert out.stderr.startswith("moe-lit tables: error: MOE_LIT_LAUNCH_PLAN: expected '0' or '1', got '2'"), out.stderr
for flag, want in (("--version", "moe-lit "), ("--help", "usage: moe-lit")):
    code = f"import sys, moe_lit.entry as e; e.main([{flag!r}]); assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    test_eq((out.returncode, out.stderr), (0, ""))
    assert out.stdout.startswith(want) and (flag == "--version" or all(c in out.stdout for c in COMMANDS)), out.stdout
