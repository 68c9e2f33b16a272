"""How much slot 1 can accept under sampling: its exact expected acceptance against a yardstick.

    .venv/bin/python examples/tiny_model/slot1_ceiling.py CHECKPOINT [CHECKPOINT ...]

At a context c the draft pass gives x1 ~ p(.|c) exactly, and slot 1 drafts the next token from q(.|c),
which cannot see x1. Lossless verification keeps it with probability sum_v min(p(v|c,x1), q(v)), so the
expected acceptance of slot 1 is E_{x1 ~ p}[1 - TV(p(.|c,x1), q)], computed here exactly over the top
x1 candidates (renormalized; they cover most of p's mass). The yardstick is the same quantity for q =
the marginal E_{x1}[p(.|c,x1)], the best a slot that does not see x1 can aim for by matching
distributions. Contexts: the card's held-out prompts cut at 8 lengths each; temperatures 0.2 and 1.0.
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdsat_card import heldout_prompts
from vllm_sdsat.config import SdsatConfig

TOP = 48


@torch.inference_mode()
def slot1_acceptance(model, cfg, contexts, temperatures=(0.2, 1.0)):
    sums = {t: torch.zeros(3) for t in temperatures}
    for c in contexts:
        logits = model(input_ids=torch.tensor([c + [cfg.adaptive_id(1)]])).logits[0].float()
        x1 = logits[-2].topk(TOP).indices  # the candidates for x1 (the most likely ones at any temperature)
        after = model(input_ids=torch.tensor([c + [t] for t in x1.tolist()])).logits[:, -1].float()
        for t in temperatures:
            p1, q = (logits[-2] / t).softmax(-1), (logits[-1] / t).softmax(-1)  # x1's distribution, slot 1's
            p2 = (after / t).softmax(-1)  # p(.|c, x1) for each candidate
            w = p1[x1] / p1[x1].sum()
            marginal = w @ p2
            sums[t] += torch.tensor([w @ torch.minimum(p2, q).sum(-1), w @ torch.minimum(p2, marginal).sum(-1),
                                     p1[x1].sum()])
    return {t: dict(zip(("slot1", "marginal", "top_mass"), [round(x, 3) for x in (v / len(contexts)).tolist()]))
            for t, v in sums.items()}


def main(*checkpoints):
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    contexts = [p[:n] for p in heldout_prompts(tokenizer) for n in range(64, 129, 9)]
    for path in checkpoints:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = SdsatConfig.from_pretrained(path)
        print(path, slot1_acceptance(model, cfg, contexts))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
