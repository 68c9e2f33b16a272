"""Write held-out code prompts for `vllm-sdsat bench --prompts-file`: not HumanEval-shaped.

The prompts are the model card's held-out split (`sdsat_card.heldout_prompts`): fixed windows of
stdlib files that no training run saw, decoded to text. Mid-file windows of many kinds (functions,
classes, tests, data tables), so a speed measured on them is not tuned to HumanEval's docstrings.

    python examples/tiny_model/heldout_prompts.py --count 32 --tokens 128 --output runs/heldout_prompts.json
    vllm-sdsat bench --prompts-file runs/heldout_prompts.json --prompts 32 ...
"""
import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from sdsat_card import MODEL, heldout_prompts

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--output", default="runs/heldout_prompts.json")
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    texts = [tokenizer.decode(ids) for ids in heldout_prompts(tokenizer, args.count, args.tokens)]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(texts, indent=1) + "\n")
    print(f"{len(texts)} prompts of {args.tokens} tokens -> {args.output}")
