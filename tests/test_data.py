"""Adaptive-span layout: exact labels/positions/mask rows, and logits equal to the plain and inference layouts."""
import numpy as np
import pytest
import torch

from vllm_sdsat.config import SdsatConfigError
from vllm_sdsat.training.data import (IGNORE, AdaptiveSpanCollator, attention_bias, basic_row, collate_rows, forward_inputs,
                             sdsat_row)

torch.set_num_threads(1)
A, B = 60, 61  # adaptive ids of the tiny vocabulary (slot 1 uses A, later slots B)


def test_hand_made_sdsat_row():
    x = [10, 11, 12, 13, 14, 15]
    row = sdsat_row(x, [(1, [13, 14]), (3, [15])], [A, B])
    assert row["input_ids"].tolist() == x + [A, B, A]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4]
    assert row["real_labels"].tolist() == [11, 12, 13, 14, 15, IGNORE, IGNORE, IGNORE, IGNORE]
    assert row["adaptive_labels"].tolist() == [IGNORE] * 6 + [13, 14, 15]
    mask = collate_rows([row], pad_id=0)["attention_mask"][0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0],  # slot 1 after x_1: sees x_0, x_1 and itself
        [1, 1, 0, 0, 0, 0, 1, 1, 0],  # slot 2: also slot 1 of its own span
        [1, 1, 1, 1, 0, 0, 0, 0, 1],  # slot 1 after x_3: not the other span
    ]


def test_hand_made_basic_row_and_padding():
    x = [10, 11, 12, 13, 14, 15]
    rows = [basic_row(x, [(1, [13, 14])], [A, B]), sdsat_row([20, 21, 22], [], [A])]
    batch = collate_rows(rows, pad_id=7)
    assert batch["input_ids"].tolist() == [[10, 11, A, B, 14, 15], [20, 21, 22, 7, 7, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]]
    assert batch["real_labels"].tolist() == [[11, 12, IGNORE, IGNORE, 15, IGNORE], [21, 22] + [IGNORE] * 4]
    assert batch["adaptive_labels"].tolist() == [[IGNORE, IGNORE, 13, 14, IGNORE, IGNORE], [IGNORE] * 6]
    mask = batch["attention_mask"][:, 0]
    assert torch.equal(mask[0], torch.tril(torch.ones(6, 6, dtype=torch.bool)))  # basic: plain causal
    assert mask[1].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                      [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]  # pads: themselves


def test_sampled_spans_stay_inside_and_follow_settings():
    L, lam, n = 4, 6.0, 40
    collate = AdaptiveSpanCollator([A, B], L, lam, seed=1)
    x = list(range(100, 100 + n))
    counts, lengths = [], []
    for _ in range(300):
        spans = collate.spans({"input_ids": x})
        counts.append(len(spans))
        for anchor, labels in spans:
            lengths.append(len(labels))
            assert 1 <= len(labels) <= L and labels == x[anchor + 2:anchor + 2 + len(labels)]
        assert len({a for a, _ in spans}) == len(spans)
    assert abs(np.mean(counts) - lam) < 0.5
    assert set(lengths) == set(range(1, L + 1))
    first, second = (AdaptiveSpanCollator([A, B], L, lam, seed=1)([{"input_ids": x}]) for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded: reproducible


def test_basic_spans_do_not_overlap():
    collate = AdaptiveSpanCollator([A], 5, 20.0, method="basic", seed=0)
    for _ in range(50):
        spans = collate.spans({"input_ids": list(range(30))})
        covered = [a + j for a, labels in spans for j in range(len(labels) + 1)]  # anchor + replaced tokens
        assert len(covered) == len(set(covered))


def test_self_distilled_example_uses_its_anchors_and_labels():
    collate = AdaptiveSpanCollator([A, B], 3, 5.0, seed=0)
    ex = {"input_ids": [10, 11, 12, 13, 14], "anchors": [1, 4], "greedy": [[31, 32, 33], [41, 42, 43]]}
    spans = collate.spans(ex)
    assert [a for a, _ in spans] == [1, 4]
    assert spans[0][1] == [31, 32, 33][:len(spans[0][1])] and spans[1][1] == [41, 42, 43][:len(spans[1][1])]
    batch = collate([ex])
    assert batch["real_labels"][0, :5].tolist() == [11, 12, 13, 14, IGNORE]  # real CE on all data


def random_batch(method, seed=0):
    """Two random sequences of different lengths (so the batch is padded), their spans, and the batch."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(10, 60, size=n).tolist() for n in (24, 17)]
    collate = AdaptiveSpanCollator([A, B], 4, 6.0, method=method, pad_id=1, seed=seed)
    spans = [collate.spans({"input_ids": x}) for x in seqs]
    build = sdsat_row if method == "sdsat" else basic_row
    return seqs, spans, collate_rows([build(x, s, collate.slot_ids) for x, s in zip(seqs, spans)], pad_id=1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_real_logits_unchanged_by_spans(random_llama, attn):
    model = random_llama(heads=4, init=0.2, attn_implementation=attn)  # init 0.2: context matters
    seqs, _, batch = random_batch("sdsat")
    assert (batch["adaptive_labels"] != IGNORE).sum() > 4
    with torch.no_grad():
        logits = model(**forward_inputs(batch, torch.float32)).logits
        for b, x in enumerate(seqs):
            plain = model(input_ids=torch.tensor([x])).logits[0]
            torch.testing.assert_close(logits[b, :len(x)], plain, atol=1e-5, rtol=1e-5)
        # sensitivity: the basic layout does change the real tokens after a span
        seqs, _, basic = random_batch("basic")
        logits = model(**forward_inputs(basic, torch.float32)).logits
        plain = model(input_ids=torch.tensor([seqs[0]])).logits[0]
        assert (logits[0, :len(seqs[0])] - plain).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_adaptive_logits_equal_inference_layout(random_llama, attn):
    """Slot j after x_i in training == last position of [x_0..x_i, A_1..A_j] under a plain causal mask."""
    model = random_llama(heads=4, init=0.2, attn_implementation=attn)
    seqs, spans, batch = random_batch("sdsat", seed=3)
    with torch.no_grad():
        logits = model(**forward_inputs(batch, torch.float32)).logits
        # the 4D mask is really applied: the same layout under a plain causal mask gives other slot logits
        causal = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        checked, differs = 0, 0
        for b, x in enumerate(seqs):
            t = len(x)  # spans follow the real tokens in order
            for anchor, labels in spans[b]:
                for j in range(1, len(labels) + 1):
                    slots = batch["input_ids"][b, t - j + 1:t + 1].tolist()
                    ref = model(input_ids=torch.tensor([x[:anchor + 1] + slots])).logits[0, -1]
                    torch.testing.assert_close(logits[b, t], ref, atol=1e-5, rtol=1e-5)
                    assert batch["adaptive_labels"][b, t] == x[anchor + 1 + j]
                    differs += bool((causal[b, t] - ref).abs().max() > 1e-3)
                    checked += 1
                    t += 1
    assert checked > 8 and differs == checked


def test_eager_needs_float_mask(random_llama):
    """Why attention_bias exists: eager attention adds the mask, so a bool mask would be ignored."""
    model = random_llama(heads=4, init=0.2, attn_implementation="eager")
    _, _, batch = random_batch("sdsat")
    with torch.no_grad():
        as_bool = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        attention_mask=batch["attention_mask"]).logits
        as_bias = model(**forward_inputs(batch, torch.float32)).logits
    assert (as_bool - as_bias).abs().max() > 1e-2
    bias = attention_bias(torch.tensor([[[[True, False]]]]), torch.bfloat16)
    assert bias.tolist() == [[[[0.0, torch.finfo(torch.bfloat16).min]]]]


def test_bad_inputs():
    with pytest.raises(SdsatConfigError, match="L"):
        AdaptiveSpanCollator([A], 0)
    with pytest.raises(SdsatConfigError, match="method"):
        AdaptiveSpanCollator([A], 3, method="other")
    with pytest.raises(SdsatConfigError, match="empty"):
        AdaptiveSpanCollator([], 3)
    with pytest.raises(SdsatConfigError, match="shorter than a span"):
        AdaptiveSpanCollator([A], 5)([{"input_ids": list(range(6))}])
    with pytest.raises(SdsatConfigError, match="method 'sdsat'"):
        example = {"input_ids": list(range(9)), "anchors": [1], "greedy": [[5, 6]]}
        AdaptiveSpanCollator([A], 2, method="basic")([example])


def test_indexed_examples_have_spans_fixed_by_seed_epoch_and_index():
    """With an "index" (train.py adds one), an example's spans depend on (seed, epoch, index) only: not on what
    the collator drew before, so a resumed run or another rank draws the same; a new epoch draws new ones."""
    rows = [{"input_ids": list(range(10, 40)), "index": i} for i in range(6)]
    fresh = AdaptiveSpanCollator([A, B], 3, 4.0, seed=7)
    used = AdaptiveSpanCollator([A, B], 3, 4.0, seed=7)
    used(rows[:3])  # advance its own generator
    assert [used.spans(r) for r in rows[3:]] == [fresh.spans(r) for r in rows[3:]]
    assert len({str(fresh.spans(r)) for r in rows}) > 1  # the index matters
    fresh.epoch = 1
    assert [fresh.spans(r) for r in rows] != [used.spans(r) for r in rows]
