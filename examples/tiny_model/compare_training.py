"""Training variants of sdsat-tiny-code, measured like its model card.

Each variant is a finetune.py run from tiny-code that differs from the others in one option (same
steps, batch, spans, seed), or one that continues another with --init. This script measures a
variant's checkpoint in the real greedy loop, on the card's held-out prompts, and stores it under a
name in results/training_variants.json, next to the variants measured before:

    .venv/bin/python examples/tiny_model/finetune.py --labels data --output /tmp/sdsat-data \\
        --seq-len 256 --spans-per-seq 24 --batch-size 12 --max-steps 600 --lr 5e-4
    .venv/bin/python examples/tiny_model/compare_training.py "data labels" /tmp/sdsat-data

sdsat_card.py renders the file as a table on the model card.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdsat_card import in_loop_tokens_per_loop, heldout_prompts
from vllm_sdsat.config import SdsatConfig

OUT = Path(__file__).resolve().parent / "results" / "training_variants.json"


def summary(model_dir: Path, loop: dict) -> dict:
    ev = json.loads((model_dir / "eval.json").read_text())
    args = json.loads((model_dir / "train_args.json").read_text())
    return {"command": args["command"], "standard_loss": ev["sdsat"]["standard_loss"],
            "base_standard_loss": ev["base"]["standard_loss"],
            "slot_top1_greedy": ev["sdsat"]["slot_top1_greedy"], "slot_top1_data": ev["sdsat"]["slot_top1_data"],
            "tokens_per_loop": {int(k): v["tokens_per_loop"] for k, v in loop.items()}}


def main(name: str, model_dir: str) -> None:
    path = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loop = in_loop_tokens_per_loop(model, SdsatConfig.from_pretrained(path),
                                   heldout_prompts(AutoTokenizer.from_pretrained(path)))
    variants = json.loads(OUT.read_text()) if OUT.exists() else {}
    variants[name] = summary(path, loop)
    OUT.write_text(json.dumps(variants, indent=1) + "\n")
    for key, r in variants.items():
        print(f"{key:32s} standard loss {r['standard_loss']:.4f} (base {r['base_standard_loss']:.4f}), "
              f"tokens per loop " + ", ".join(f"K={k}: {v:.2f}" for k, v in r["tokens_per_loop"].items()))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
