"""`vllm-sdsat` command line: one subcommand per part (train, generate, bench, demo, profile).

By default a command shows only progress bars and its result; the logs of vLLM engines and native
libraries go to a file whose path is printed if the command fails. `--verbose` shows them instead.
"""
import argparse
import importlib
import sys
import traceback

from vllm_sdsat.config import SdsatConfigError
from vllm_sdsat.console import console, quiet

# subcommand -> module that defines add_cli(subparsers); imported only when that subcommand runs.
SUBCOMMANDS = {
    "train": ("vllm_sdsat.training.train", "fine-tune a Hugging Face causal LM with adaptive tokens"),
    "generate": ("vllm_sdsat.reference", "decode with the reference SDSAT loop (PyTorch/transformers)"),
    "bench": ("vllm_sdsat.bench.cli", "benchmark SDSAT against vLLM's other speculative methods"),
    "demo": ("vllm_sdsat.bench.demo", "SDSAT vs plain decoding speed on the embedded tiny model"),
    "profile": ("vllm_sdsat.bench.profile", "ms per engine step by component (runner phases, engine core)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-sdsat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_) in SUBCOMMANDS.items():
        if name == chosen:
            command = sub.add_parser(name, help=help_, description=help_)
            command.add_argument("--verbose", action="store_true",
                                 help="show engine and library logs instead of writing them to a log file")
            importlib.import_module(module).add_cli(command)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    args = parser.parse_args(argv)
    with quiet(args.command, args.verbose):
        try:
            return args.func(args) or 0
        except (SdsatConfigError, FileNotFoundError) as e:
            console.error(f"vllm-sdsat {args.command}: error: {e}", show_log=False)
            return 2
        except Exception as e:  # noqa: BLE001 - one line on the screen, the traceback in the log
            if args.verbose:
                raise
            traceback.print_exc()
            first_line = (str(e).strip().splitlines() or [""])[0]
            console.error(f"vllm-sdsat {args.command}: error: {type(e).__name__}: {first_line}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
