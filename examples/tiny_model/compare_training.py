"""Self-distilled vs data labels for the adaptive slots, at equal training settings.

The embedded sdsat-tiny-code was trained with `--labels self`. This script measures a twin trained
with `--labels data` (same steps, batch, spans, seed) in the real greedy loop, on the same held-out
prompts as its model card, and writes both side by side to results/labels_self_vs_data.json:

    .venv/bin/python examples/tiny_model/finetune.py --labels data --output /tmp/sdsat-data \\
        --seq-len 256 --spans-per-seq 24 --batch-size 12 --max-steps 600 --lr 5e-4
    .venv/bin/python examples/tiny_model/compare_labels.py /tmp/sdsat-data
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdsat_card import MODEL, in_loop_tokens_per_loop, heldout_prompts
from vllm_sdsat.config import SdsatConfig

OUT = Path(__file__).resolve().parent / "results" / "labels_self_vs_data.json"


def summary(model_dir: Path, loop: dict) -> dict:
    ev = json.loads((model_dir / "eval.json").read_text())
    return {"labels": json.loads((model_dir / "train_args.json").read_text())["labels"],
            "standard_loss": ev["sdsat"]["standard_loss"], "base_standard_loss": ev["base"]["standard_loss"],
            "slot_top1_greedy": ev["sdsat"]["slot_top1_greedy"], "slot_top1_data": ev["sdsat"]["slot_top1_data"],
            "tokens_per_loop": {int(k): v["tokens_per_loop"] for k, v in loop.items()}}


def main(data_model: str) -> None:
    data_dir = Path(data_model)
    model = AutoModelForCausalLM.from_pretrained(data_dir, dtype=torch.float32).eval()
    loop = in_loop_tokens_per_loop(model, SdsatConfig.from_pretrained(data_dir),
                                   heldout_prompts(AutoTokenizer.from_pretrained(data_dir)))
    result = {"self": summary(MODEL, json.loads((MODEL / "in_loop.json").read_text())),
              "data": summary(data_dir, loop)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for name, r in result.items():
        print(f"{name:5s} standard loss {r['standard_loss']:.4f} (base {r['base_standard_loss']:.4f}), "
              f"tokens per loop " + ", ".join(f"K={k}: {v:.2f}" for k, v in r["tokens_per_loop"].items()))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
