"""Measure the SDSAT tiny model in the real greedy loop and write its model card.

    .venv/bin/python examples/tiny_model/sdsat_card.py

Tokens per loop are measured with the reference decoder (vllm_sdsat.reference), greedy, fp32, on
held-out code prompts, against the model's own output (the only thing verification accepts), for
every K. Training figures come from finetune.py's eval.json and train_args.json (one record per stage).
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tqdm import tqdm

import build
from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.reference import sdsat_generate

MODEL = build.MODELS / "sdsat-tiny-code"
K_VALUES = range(2, 9)


def loop_stats(model, cfg, prompts, k, temperature=0.0, seeds=(None,), new_tokens=128):
    """The reference loop with k adaptive tokens over every prompt (and seed, when sampling): tokens per loop,
    acceptance of the adaptive drafts, and acceptance per adaptive position (averaged over runs)."""
    tokens = loops = accepted = drafted = 0
    per_pos = torch.zeros(k)
    for prompt in prompts:
        for seed in seeds:
            _, stats = sdsat_generate(model, prompt, cfg, k=k, max_new_tokens=new_tokens, eos_token_id=[],
                                      temperature=temperature, seed=seed)
            tokens, loops = tokens + stats.new_tokens, loops + stats.loops
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
            per_pos += torch.tensor(stats.acceptance_per_position)
    return {"tokens_per_loop": round(tokens / loops, 3), "acceptance": round(accepted / max(drafted, 1), 3),
            "acceptance_per_position": [round(v, 3) for v in (per_pos / (len(prompts) * len(seeds))).tolist()]}


def in_loop_tokens_per_loop(model, cfg, prompts, new_tokens=128):
    result = {}
    for K in tqdm(K_VALUES, desc="tokens per loop by K"):
        stats = loop_stats(model, cfg, prompts, K - 1, new_tokens=new_tokens)
        result[K] = {key: stats[key] for key in ("tokens_per_loop", "acceptance_per_position")}
    return result


def heldout_prompts(tokenizer, n_prompts=16, prompt_len=128) -> list[list[int]]:
    """The card's prompts: fixed windows of held-out stdlib files."""
    heldout = build.encode_corpus(tokenizer, build.source_files())["heldout"]
    return [w.tolist() for w in build.windows(heldout, n_prompts, prompt_len, torch.Generator().manual_seed(7))]


def main(n_prompts=16, prompt_len=128):
    cfg = SdsatConfig.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    loop = in_loop_tokens_per_loop(model, cfg, heldout_prompts(AutoTokenizer.from_pretrained(MODEL), n_prompts,
                                                               prompt_len))
    (MODEL / "in_loop.json").write_text(json.dumps(loop, indent=1) + "\n")
    write_card(cfg, loop, n_prompts, prompt_len)


def write_card(cfg, loop, n_prompts, prompt_len):
    ev = json.loads((MODEL / "eval.json").read_text())
    args = json.loads((MODEL / "train_args.json").read_text())
    base, tuned = ev["base"], ev["sdsat"]
    ratio = tuned["standard_loss"] / base["standard_loss"]
    rows = "\n".join(f"| {K} | {v['tokens_per_loop']:.2f} | {', '.join(f'{a:.2f}' for a in v['acceptance_per_position'])} |"
                     for K, v in loop.items())
    stages = [args]
    while "previous_stage" in stages[0]:
        stages.insert(0, stages[0]["previous_stage"])
    per_stage = lambda label, fn: f"| {label} | " + " | ".join(fn(a) for a in stages) + " |"  # noqa: E731
    stage_rows = "\n".join([
        "| | " + " | ".join(f"stage {n}" for n in range(1, len(stages) + 1)) + " |",
        "|---|" + "---|" * len(stages),
        per_stage("starts from", lambda a: "the previous stage" if a.get("init") else f"`{Path(a['base']).name}`"),
        per_stage("adaptive labels", lambda a: "self (the starting model's own greedy continuation, generated once "
                  "and cached)" if a["labels"] == "self" else "the data"),
        per_stage("self-contexts", lambda a: f"{a['self_contexts']:.0%} of sequences: {a['context_prompt_len']} data "
                  "tokens, then the starting model's own greedy continuation (no real-token loss there)"
                  if a.get("self_contexts") else "none"),
        per_stage("steps x batch x seq", lambda a: f"{a['max_steps']} x {a['batch_size']} x {a['seq_len']}"),
        per_stage("learning rate (cosine), seed", lambda a: f"{a['lr']}, {a['seed']}"),
        per_stage("time", lambda a: f"{a['train_minutes']:.1f} min of training, "
                  "plus generating contexts and labels"),
        per_stage("finetune.py options", lambda a: f"`{a['command']}`"),
    ])
    slots = lambda key: ", ".join(f"{v:.2f}" for v in tuned[key])  # noqa: E731
    text = f"""# sdsat-tiny-code

`tiny-code` fine-tuned with SDSAT adaptive tokens: the embedded default for the demo, tests and
benchmarks. Its `config.json` carries the `sdsat` block that vLLM reads:
`{json.dumps(cfg.to_dict())}`.

## Training

Loss = CE(real) + w CE(adaptive), with the spans appended after the real tokens under a 4D mask (real
tokens never see adaptive tokens). Adaptive ids {list(cfg.adaptive_token_ids)} (`<|adaptive_0..|>`,
one id per slot), L (max span) = {args['max_adaptive']}, Poisson lambda = {args['spans_per_seq']} spans
per {args['seq_len']} tokens, w = {args['adaptive_weight']}, bf16 autocast, 2-core AMD EPYC.

{stage_rows}

## Held-out code ({base['anchors'] // 4} windows of held-out stdlib files)

| | base `tiny-code` | `sdsat-tiny-code` |
|---|---|---|
| standard-token loss | {base['standard_loss']:.4f} | {tuned['standard_loss']:.4f} ({ratio:.3f}x base) |
| standard-token top-1 | {base['standard_top1']:.1%} | {tuned['standard_top1']:.1%} |

Adaptive-slot top-1 in the inference layout (`[prefix, A x k]`, plain causal mask), slots 1..{len(tuned['slot_top1_data'])},
over {tuned['anchors']} anchors:
- against the data: {slots('slot_top1_data')}
- against the model's own greedy continuation: {slots('slot_top1_greedy')}

## In the real greedy loop

Reference decoder, greedy, fp32, {n_prompts} held-out code prompts of {prompt_len} tokens, 128 new
tokens each, against the model's own output. Tokens per loop = tokens one draft+verify loop yields
(2 + accepted drafts; vLLM's "mean accepted length" for the same K). K = 1 exact draft + K-1 adaptive
tokens. Acceptance per position is over the adaptive drafts.

| K | tokens per loop | acceptance per adaptive position |
|---|---|---|
{rows}

Default K = {cfg.num_speculative_tokens} (L + 1: every trained slot; tokens per loop still grows up to it). Reproduce: run `.venv/bin/python examples/tiny_model/finetune.py`
with each stage's options above, in order, then `.venv/bin/python examples/tiny_model/sdsat_card.py`.
""" + variants_section(cfg.num_speculative_tokens)
    (MODEL / "README.md").write_text(text)
    print(text)


def variants_section(default_k: int) -> str:
    """The training variants measured by compare_training.py, when there are any."""
    path = Path(__file__).resolve().parent / "results" / "training_variants.json"
    if not path.exists():
        return ""
    runs = json.loads(path.read_text())
    ks = list(next(iter(runs.values()))["tokens_per_loop"])
    k = str(default_k)  # JSON keys are strings
    best = max(runs, key=lambda name: runs[name]["tokens_per_loop"][k])
    lowest = min(runs, key=lambda name: runs[name]["standard_loss"])
    rows = "\n".join(f"| {name} | `{r['command']}` | {r['standard_loss']:.4f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['slot_top1_greedy'][:4])} | "
                     + " | ".join(f"{r['tokens_per_loop'][K]:.2f}" for K in ks) + " |" for name, r in runs.items())
    return f"""
## Training variants

Fine-tunings measured like this card (`examples/tiny_model/compare_training.py`, raw numbers in
`examples/tiny_model/results/training_variants.json`). Variants from `tiny-code` share the steps,
batch, spans and seed and differ in the options shown; a variant with `--init` continues another
one. Slot top-1 is against the model's own greedy continuation on held-out code, slots 1-4; then
tokens per loop for each K.

| variant | finetune.py options | held-out standard loss | slot top-1 (own output) | {' | '.join(f'K={K}' for K in ks)} |
|---|---|---|---|{'---|' * len(ks)}
{rows}

At the default K = {k}, "{best}" gives the most tokens per loop ({runs[best]['tokens_per_loop'][k]:.2f});
"{lowest}" gives the lowest held-out standard-token loss (the base model's is
{next(iter(runs.values()))['base_standard_loss']:.4f}).
"""


if __name__ == "__main__":
    sys.exit(main())
