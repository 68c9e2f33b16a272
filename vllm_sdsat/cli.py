"""`vllm-sdsat` command line: one subcommand per module (train, generate, bench, demo)."""
import argparse
import importlib
import sys

from vllm_sdsat.config import SdsatConfigError

# subcommand -> module that defines add_cli(subparsers); imported only when that subcommand runs.
SUBCOMMANDS = {
    "train": ("vllm_sdsat.train", "fine-tune a Hugging Face causal LM with adaptive tokens"),
    "generate": ("vllm_sdsat.reference", "decode with the reference SDSAT loop (PyTorch/transformers)"),
    "bench": ("vllm_sdsat.bench", "benchmark SDSAT against vLLM's other speculative methods"),
    "demo": ("vllm_sdsat.demo", "SDSAT vs plain decoding speed on the embedded tiny model"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-sdsat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_cli(sub.add_parser(name, help=help_, description=help_))
        else:
            sub.add_parser(name, help=help_, add_help=False)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (SdsatConfigError, FileNotFoundError) as e:
        print(f"vllm-sdsat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
