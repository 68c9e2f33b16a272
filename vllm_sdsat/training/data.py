"""Adaptive spans: turn ordinary token sequences into SDSAT training batches.

A span of l adaptive tokens attached after real token x_i teaches its slot j (1..l) to predict
x_{i+1+j}, the token j+1 steps ahead (x_{i+1} is what x_i itself predicts). Slot j has position id
pos(x_i) + j, exactly where it sits at inference, when the drafter runs [.., x_i, A_1, .., A_k].

Layout ("sdsat"): spans are appended after the real tokens, and a 4D mask lets slot j see x_1..x_i
and slots 1..j of its own span; real tokens never see an adaptive token. The real tokens' logits are
then exactly those of the plain sequence, and each slot's logits exactly those of the inference
layout [x_1..x_i, A_1..A_j] under a plain causal mask (tests/test_data.py checks both).
Layout ("basic", the paper's inferior baseline): adaptive tokens replace real tokens in place under a
plain causal mask, so later real tokens do see them.

Cost: a sequence of n tokens grows to n + sum(l) tokens, about n + spans_per_seq * (L + 1) / 2, and
its mask holds (that length)^2 entries; attention runs with an explicit mask (no causal fast path).
"""
from __future__ import annotations

import numpy as np
import torch

from vllm_sdsat.config import SdsatConfigError

IGNORE = -100  # label of a position that has no loss
METHODS = ("sdsat", "basic")


def sample_anchors(rng: np.random.Generator, num_candidates: int, spans_per_seq: float) -> list[int]:
    """Poisson(spans_per_seq) distinct anchors drawn uniformly from 0..num_candidates-1, sorted."""
    count = min(int(rng.poisson(spans_per_seq)), max(num_candidates, 0))
    return sorted(rng.choice(num_candidates, size=count, replace=False).tolist()) if count else []


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (batch, 1, q, kv) mask (True = may attend) -> the additive float mask transformers reads.

    transformers (masking_utils) passes a 4D mask through untouched. sdpa accepts bool or float masks,
    but eager attention *adds* the mask to the scores, so a bool mask would be silently ignored there.
    A float mask of the model's dtype (0 or dtype-min) works for both, with or without autocast.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def forward_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """The model's keyword arguments for a collated batch (labels left out)."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": attention_bias(batch["attention_mask"], dtype)}


def sdsat_row(x: list[int], spans: list[tuple[int, list[int]]], slot_ids: list[int]) -> dict:
    """One sequence in the SDSAT layout: real tokens x, then each span (anchor i, labels) appended.

    Returned arrays, one entry per token: input_ids, position_ids, real_labels (x_{t+1}, or IGNORE),
    adaptive_labels, prefix_end (last real position the token may see), span (index or -1) and
    in_prefix (the token can be seen by later tokens through the prefix rule: real tokens only).
    """
    n = len(x)
    ids, pos, real, adap = list(x), list(range(n)), list(x[1:]) + [IGNORE], [IGNORE] * n
    prefix_end, span, in_prefix = list(range(n)), [-1] * n, [True] * n
    for k, (anchor, labels) in enumerate(spans):
        for j, label in enumerate(labels, start=1):
            ids.append(slot_ids[j - 1])
            pos.append(anchor + j)
            real.append(IGNORE)
            adap.append(label)
            prefix_end.append(anchor)
            span.append(k)
            in_prefix.append(False)
    return _row(ids, pos, real, adap, prefix_end, span, in_prefix)


def basic_row(x: list[int], spans: list[tuple[int, list[int]]], slot_ids: list[int]) -> dict:
    """One sequence in the "basic" layout: span (i, labels) overwrites x_{i+1}..x_{i+l} in place.

    Plain causal attention, so every later real token sees the adaptive tokens. Spans must not
    overlap and each anchor must stay a real token.
    """
    n = len(x)
    ids, real, adap = list(x), list(x[1:]) + [IGNORE], [IGNORE] * n
    for anchor, labels in spans:
        for j, label in enumerate(labels, start=1):
            ids[anchor + j], real[anchor + j], adap[anchor + j] = slot_ids[j - 1], IGNORE, label
    causal = list(range(n))
    return _row(ids, causal, real, adap, causal, [-1] * n, [True] * n)


def _row(*columns) -> dict:
    names = ("input_ids", "position_ids", "real_labels", "adaptive_labels", "prefix_end", "span", "in_prefix")
    return {name: np.asarray(col) for name, col in zip(names, columns)}


def collate_rows(rows: list[dict], pad_id: int) -> dict:
    """Right-pad rows to one length and build the 4D mask (batch, 1, T, T), True = may attend.

    Query q sees key k when k is in the prefix at or before q's prefix_end, or k is in q's own span at
    or before q's position; every token also sees itself (so padding rows are never empty).
    """
    T = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "position_ids": 0, "real_labels": IGNORE, "adaptive_labels": IGNORE,
            "prefix_end": -1, "span": -1, "in_prefix": False, "soft_temperature": 0.0}
    fill = {name: v for name, v in fill.items() if name in rows[0]}
    cols = {name: torch.as_tensor(np.stack([np.pad(r[name], (0, T - len(r[name])), constant_values=v)
                                            for r in rows])) for name, v in fill.items()}
    pos, end, span = cols["position_ids"], cols.pop("prefix_end"), cols.pop("span")
    sees_prefix = cols.pop("in_prefix")[:, None, :] & (pos[:, None, :] <= end[:, :, None])
    same_span = (span[:, :, None] >= 0) & (span[:, None, :] == span[:, :, None]) & (pos[:, None, :] <= pos[:, :, None])
    itself = torch.eye(T, dtype=torch.bool)
    cols["attention_mask"] = (sees_prefix | same_span | itself)[:, None]
    return {k: v if k == "attention_mask" else v.float() if v.is_floating_point() else v.long()
            for k, v in cols.items()}


class AdaptiveSpanCollator:
    """Collate examples {"input_ids": [...]} into SDSAT training batches with random adaptive spans.

    Per sequence: Poisson(spans_per_seq) distinct anchors, uniform over the positions whose next
    two tokens exist; lengths uniform in 1..max_adaptive, cut so that labels stay inside the sequence.
    Slot j (1-based) is input as adaptive_token_ids[min(j - 1, len - 1)] (one id repeated, or one id
    per slot), matching SdsatConfig.adaptive_id.

    Self-distilled examples also carry "anchors" and "greedy" (per anchor, the base model's greedy
    tokens x^_{i+2}..x^_{i+1+L}); their spans use those anchors and labels, only lengths are drawn.

    Examples with "real_until" (train.self_contexts) have data only in their first real_until tokens:
    the real-token loss covers just those (the model's own continuation is never a real label).
    With soft_targets, an adaptive token of a span that starts inside a sampled continuation (anchor
    a >= real_until - 1, "temperature" T > 0) gets no hard label but soft_temperature T: train.py
    trains it towards the model's own distribution at its position (the real token there), at T.

    Batch: input_ids, position_ids (B, T); attention_mask (B, 1, T, T) bool, see attention_bias();
    real_labels, adaptive_labels (B, T), explicit (already shifted), IGNORE where a position has no
    loss of that kind; soft_temperature (B, T) float, 0 where a position has no soft target. Examples
    with an "index" (train.py adds it) draw their spans from a generator
    seeded by (seed, epoch, index): the same spans whatever the ranks, workers or a resumption, and new
    ones each epoch (`epoch` is set by the trainer). Others share one seeded generator: use
    dataloader_num_workers=0 (the Trainer default) for reproducible, non-duplicated spans.
    """

    def __init__(self, adaptive_token_ids, max_adaptive: int, spans_per_seq: float = 8.0,
                 method: str = "sdsat", pad_id: int = 0, seed: int = 0, soft_targets: bool = False):
        if method not in METHODS:
            raise SdsatConfigError(f"sdsat: method must be one of {METHODS}, got {method!r}")
        if max_adaptive < 1:
            raise SdsatConfigError(f"sdsat: max_adaptive_tokens (L) must be >= 1, got {max_adaptive}")
        if spans_per_seq < 0:
            raise SdsatConfigError(f"sdsat: spans_per_seq must be >= 0, got {spans_per_seq}")
        ids = list(adaptive_token_ids)
        if not ids:
            raise SdsatConfigError("sdsat: adaptive_token_ids is empty; give at least one token id")
        self.slot_ids = [ids[min(j, len(ids) - 1)] for j in range(max_adaptive)]
        self.max_adaptive, self.spans_per_seq, self.method, self.pad_id = max_adaptive, spans_per_seq, method, pad_id
        self.seed, self.epoch, self.soft_targets = seed, 0, soft_targets
        self.rng = np.random.default_rng(seed)

    def __call__(self, examples: list[dict]) -> dict:
        build = sdsat_row if self.method == "sdsat" else basic_row
        rows = [build(list(ex["input_ids"]), self.spans(ex), self.slot_ids) for ex in examples]
        for ex, row in zip(examples, rows):
            n = len(ex["input_ids"])
            if "real_until" in ex:  # label of token t is x_{t+1}: keep it while x_{t+1} is data
                row["real_labels"][max(ex["real_until"] - 1, 0):n] = IGNORE
            soft = np.zeros(len(row["input_ids"]), dtype=bool)
            if self.soft_targets and ex.get("temperature", 0) > 0:  # spans inside a sampled continuation
                soft = ~row["in_prefix"] & (row["prefix_end"] >= ex["real_until"] - 1) & (row["position_ids"] < n)
                row["adaptive_labels"][soft] = IGNORE
            row["soft_temperature"] = np.where(soft, ex.get("temperature", 0.0), 0.0).astype(np.float32)
        return collate_rows(rows, self.pad_id)

    def spans(self, ex: dict) -> list[tuple[int, list[int]]]:
        """[(anchor i, labels of slots 1..l)] for one example."""
        x, L = list(ex["input_ids"]), self.max_adaptive
        rng = np.random.default_rng([self.seed, self.epoch, ex["index"]]) if "index" in ex else self.rng
        if len(x) < L + 2:
            raise SdsatConfigError(f"sdsat: a sequence of {len(x)} tokens is shorter than a span: it needs "
                                   f"at least L + 2 = {L + 2} tokens (raise the sequence length or lower L)")
        if "anchors" in ex:
            if self.method != "sdsat":
                raise SdsatConfigError("sdsat: self-distilled labels need method 'sdsat'")
            lengths = rng.integers(1, L + 1, size=len(ex["anchors"]))
            return [(a, list(g[:l])) for a, g, l in zip(ex["anchors"], ex["greedy"], lengths.tolist())]
        anchors = sample_anchors(rng, len(x) - 2, self.spans_per_seq)
        lengths = rng.integers(1, L + 1, size=len(anchors)).tolist()
        spans, free_from = [], 0
        for a, l in zip(anchors, lengths):
            l = min(l, len(x) - 2 - a)
            if self.method == "basic":  # in place: skip spans that would overwrite an earlier span
                if a < free_from:
                    continue
                free_from = a + l + 1
            spans.append((a, x[a + 2:a + 2 + l]))
        return spans
