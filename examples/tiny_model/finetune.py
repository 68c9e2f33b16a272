"""Fine-tune the tiny code model with SDSAT: examples/models/tiny-code -> examples/models/sdsat-tiny-code.

    .venv/bin/python examples/tiny_model/finetune.py                  # defaults: see --help
    .venv/bin/python examples/tiny_model/finetune.py --repeated --max-steps 500 --adaptive-weight 0.5

1. Writes the text of build.py's training files (never held-out files, never HumanEval) to
   build/finetune_train.jsonl, once.
2. Runs `vllm-sdsat train` on it. Options this script does not define (--adaptive-weight,
   --training-arg KEY=VALUE, ...) go to the trainer unchanged.
3. Evaluates the base and the fine-tuned model on held-out code (vllm_sdsat.training.evaluate) and writes
   eval.json into the output directory.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402  (examples/tiny_model is not a package)

from vllm_sdsat.training import train  # noqa: E402
from vllm_sdsat.config import SdsatConfig  # noqa: E402
from vllm_sdsat.training.evaluate import evaluate  # noqa: E402

TRAIN_JSONL = build.WORK / "finetune_train.jsonl"


def write_train_jsonl(path: Path = TRAIN_JSONL) -> Path:
    """One {"text": ...} record per training file of the corpus split (held-out files excluded), once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for _, p in build.source_files():
                if not build.is_heldout(p) and (text := build.read(p)):
                    f.write(json.dumps({"text": text}) + "\n")
        tmp.rename(path)
    return path


def heldout_sequences(tokenizer, count: int, seq_len: int) -> torch.Tensor:
    """`count` fixed random windows of held-out stdlib code (build.py's held-out split)."""
    data = build.encode_corpus(tokenizer, build.source_files())["heldout"]
    return build.windows(data, count, seq_len, torch.Generator().manual_seed(1234))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(build.MODELS / "tiny-code"))
    ap.add_argument("--init", help="start from this checkpoint instead of --base (a second stage); it also "
                    "makes the self-distilled labels and contexts. --base stays the evaluation's reference")
    ap.add_argument("--output", default=str(build.MODELS / "sdsat-tiny-code"))
    ap.add_argument("--repeated", action="store_true", help="one adaptive id (2) for every slot instead of 2..7")
    ap.add_argument("--max-adaptive", type=int, default=6, metavar="L")
    ap.add_argument("--labels", choices=["self", "data"], default="self")
    ap.add_argument("--self-contexts", type=float, default=0.0, metavar="F",
                    help="fraction of sequences continued by the base model's own greedy output (--labels self)")
    ap.add_argument("--context-prompt-len", type=int, default=128, help="data tokens before that continuation")
    ap.add_argument("--spans-per-seq", type=float, default=16.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows for the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    args, trainer_extra = ap.parse_known_args()
    torch.set_num_threads(os.cpu_count())

    ids = ["2"] if args.repeated else [str(i) for i in range(2, 2 + args.max_adaptive)]
    argv = ["--model", args.init or args.base, "--data", str(write_train_jsonl()), "--output", args.output,
            "--adaptive-token-ids", *ids, "--max-adaptive", str(args.max_adaptive), "--labels", args.labels,
            "--self-contexts", str(args.self_contexts), "--context-prompt-len", str(args.context_prompt_len),
            "--spans-per-seq", str(args.spans_per_seq), "--seq-len", str(args.seq_len),
            "--max-steps", str(args.max_steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
            "--cache-dir", str(build.WORK / "cache"), "--seed", str(args.seed),
            *([] if args.no_bf16 else ["--bf16"]), *trainer_extra]
    print("vllm-sdsat train " + " ".join(argv), file=sys.stderr)
    train_args = train.parse_args(argv)
    out = train.run(train_args)
    log = json.loads((Path(out) / "train_log.json").read_text())
    record = vars(args) | {"adaptive_weight": train_args.adaptive_weight, "command": " ".join(sys.argv[1:]),
                           "train_minutes": round(next(e for e in log if "train_runtime" in e)["train_runtime"] / 60, 1)}
    if args.init:  # the first stage's record travels with the checkpoint
        record["previous_stage"] = json.loads((Path(args.init) / "train_args.json").read_text())
    (Path(out) / "train_args.json").write_text(json.dumps(record, indent=1) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(out)
    sequences = heldout_sequences(tokenizer, args.eval_sequences, args.seq_len)
    sdsat = SdsatConfig.from_pretrained(out)
    report = {}
    for name, path in [("base", args.base), ("sdsat", out)]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        report[name] = evaluate(model, sequences, sdsat, seed=args.seed)
        print(name, json.dumps(report[name]))
    (Path(out) / "eval.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
