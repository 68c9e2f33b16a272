"""Held-out quality of an SDSAT checkpoint: standard-token loss and adaptive-slot accuracy.

Slots are scored in the inference layout, [x_1..x_i, A_1..A_k] under a plain causal mask, exactly as
the drafter runs them, against (a) the data and (b) the model's own greedy continuation, which is
what greedy verification accepts. `accepted` (leading slots that match the greedy continuation)
estimates the drafts accepted per loop; the loop then yields 2 + accepted tokens (SDSAT.md). The
context here is data, not the model's own output, so this is an estimate: measure the real loop too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vllm_sdsat.config import SdsatConfig
from vllm_sdsat.training.self_distill import greedy_at_anchors


@torch.inference_mode()
def standard_loss(model, sequences: torch.Tensor, batch_size: int = 8) -> tuple[float, float]:
    """Mean next-token cross-entropy and top-1 accuracy of a plain forward over (N, n) sequences."""
    loss, hits, count = 0.0, 0, 0
    for rows in sequences.split(batch_size):
        rows = rows.to(model.device)
        logits = model(input_ids=rows).logits[:, :-1].float()
        loss += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        hits += (logits.argmax(-1) == rows[:, 1:]).sum().item()
        count += rows[:, 1:].numel()
    return loss / count, hits / count


@torch.inference_mode()
def draft_slots(model, prompts: list[list[int]], k: int, batch_size: int = 8) -> torch.Tensor:
    """(P, k) argmax at the last k positions of each prompt, run as a plain causal batch.

    Prompts are right-padded: causal attention keeps the padding invisible to the real positions.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        width = max(len(p) for p in group)
        rows = torch.tensor([p + [0] * (width - len(p)) for p in group], device=model.device)
        logits = model(input_ids=rows).logits
        out += [logits[b, len(p) - k:len(p)].argmax(-1) for b, p in enumerate(group)]
    return torch.stack(out).cpu()


def evaluate(model, sequences: torch.Tensor, sdsat: SdsatConfig, slots: int | None = None, anchors_per_seq: int = 4,
             batch_size: int = 8, seed: int = 0) -> dict:
    """Standard-token loss/top-1 on (N, n) held-out sequences, and per-slot top-1 of the k adaptive slots.

    k = slots or K - 1 (the adaptive tokens the vLLM drafter appends). Anchors are uniform positions
    whose next k + 1 data tokens exist, `anchors_per_seq` per sequence.
    Cost: one forward over the sequences, one forward of up to n + k tokens per anchor, and a greedy
    decode of k + 1 tokens per anchor (greedy_at_anchors).
    """
    k = slots or sdsat.num_speculative_tokens - 1
    n = sequences.shape[1]
    loss, top1 = standard_loss(model, sequences, batch_size)
    rng = np.random.default_rng(seed)
    anchors = [sorted(rng.choice(n - k - 1, size=anchors_per_seq, replace=False).tolist()) for _ in sequences]
    greedy = []
    for start in range(0, len(sequences), batch_size):
        greedy += greedy_at_anchors(model, sequences[start:start + batch_size], anchors[start:start + batch_size], k)
    prompts, truth, own = [], [], []
    for x, row_anchors, row_greedy in zip(sequences.tolist(), anchors, greedy):
        for a, g in zip(row_anchors, row_greedy):
            prompts.append(x[:a + 1] + sdsat.adaptive_ids(k))
            truth.append(x[a + 2:a + 2 + k])
            own.append(g[1:])
    drafts = draft_slots(model, prompts, k, batch_size)
    match_data = drafts == torch.tensor(truth)
    match_greedy = drafts == torch.tensor(own)
    accepted = match_greedy.int().cumprod(dim=1).sum(dim=1).float().mean().item()
    return {"standard_loss": round(loss, 4), "standard_top1": round(top1, 4), "anchors": len(prompts),
            "slot_top1_data": [round(v, 4) for v in match_data.float().mean(0).tolist()],
            "slot_top1_greedy": [round(v, 4) for v in match_greedy.float().mean(0).tolist()],
            "accepted": round(accepted, 4), "tokens_per_loop": round(2 + accepted, 4)}
