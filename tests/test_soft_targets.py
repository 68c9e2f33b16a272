"""Sampled self-contexts and soft targets (issue #15): continuation sampling, the collator's soft spans, the KL loss."""
import pytest
import torch
from datasets import Dataset

from vllm_sdsat.training.data import IGNORE, AdaptiveSpanCollator
from vllm_sdsat.training.self_distill import continuation, pick, self_contexts
from vllm_sdsat.training.train import soft_target_loss

torch.set_num_threads(1)


def generate(model, prompt, steps):
    return model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[0]


def test_temperature_zero_reproduces_greedy_and_sampled_rows_differ(random_llama, tmp_path):
    model = random_llama(init=0.2)
    rows = torch.randint(10, 60, (8, 16), generator=torch.Generator().manual_seed(3)).tolist()
    data = Dataset.from_dict({"input_ids": rows})
    greedy = self_contexts(data, model, 1.0, 6, 0, tmp_path / "greedy.arrow", batch_size=3, temperatures=(0.0,))
    for x, r in zip(rows, greedy):
        assert r["input_ids"] == generate(model, x[:6], 10).tolist() and r["temperature"] == 0
    mixed = self_contexts(data, model, 1.0, 6, 0, tmp_path / "mixed.arrow", batch_size=3, temperatures=(0.0, 1.0))
    assert {r["temperature"] for r in mixed} == {0.0, 1.0}
    for r, g in zip(mixed, greedy):
        assert r["real_until"] == 6 and r["input_ids"][:6] == g["input_ids"][:6]
        assert (r["input_ids"] == g["input_ids"]) == (r["temperature"] == 0)  # 10 sampled tokens all greedy: unlikely
    again = self_contexts(data, model, 1.0, 6, 0, tmp_path / "again.arrow", batch_size=5, temperatures=(0.0, 1.0))
    assert again["input_ids"] == mixed["input_ids"]  # per-row seeds: batching does not change the draws


def test_pick_follows_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    assert (pick(logits, torch.zeros(4000), gens) == 0).all()
    counts = torch.bincount(pick(logits, torch.full((4000,), 0.5), gens), minlength=4).float()
    expected = 4000 * (logits[0] / 0.5).softmax(-1)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    t1 = torch.bincount(pick(logits, torch.ones(4000), gens), minlength=4).float()
    assert t1[1] > 2 * counts[1]  # T = 1 is flatter than T = 0.5


def test_continuation_rows_are_greedy_where_their_temperature_is_zero(random_llama):
    model = random_llama(init=0.2)
    prompts = torch.randint(10, 60, (3, 5), generator=torch.Generator().manual_seed(1))
    out = continuation(model, prompts, 8, torch.tensor([0.0, 1.0, 0.0]))
    for b in (0, 2):
        assert out[b].tolist() == generate(model, prompts[b].tolist(), 8)[5:].tolist()
    assert out[1].tolist() != generate(model, prompts[1].tolist(), 8)[5:].tolist()


def logits_with_slots(V=16, n=6, slots=((2, 1), (2, 2), (4, 1)), seed=0):
    """Random logits for n real tokens and adaptive tokens appended at the given (anchor, j); their position ids."""
    torch.manual_seed(seed)
    logits = torch.randn(1, n + len(slots), V)
    position_ids = torch.tensor([list(range(n)) + [a + j for a, j in slots]])
    return logits, position_ids


def test_soft_target_loss_is_zero_when_the_slot_matches_the_model_and_positive_otherwise():
    logits, pos = logits_with_slots()
    temperature = torch.tensor([[0.0] * 6 + [1.0, 0.5, 0.0]])
    assert soft_target_loss(logits, pos, temperature).item() > 0.05
    for i in (6, 7):  # the slots at positions 3 and 4 copy the real tokens' logits there
        logits[0, i] = logits[0, pos[0, i]]
    assert soft_target_loss(logits, pos, temperature).item() == pytest.approx(0, abs=1e-6)
    assert soft_target_loss(logits, pos, torch.zeros_like(temperature)).item() == 0  # no soft token: no loss


def test_soft_target_loss_is_the_mean_kl_at_the_temperature_and_only_moves_the_slots():
    logits, pos = logits_with_slots()
    logits.requires_grad_(True)
    temperature = torch.tensor([[0.0] * 6 + [1.0, 0.5, 0.0]])
    loss = soft_target_loss(logits, pos, temperature)
    expected = 0
    for i, t in ((6, 1.0), (7, 0.5)):
        p = (logits[0, pos[0, i]] / t).softmax(-1)
        q = (logits[0, i] / t).softmax(-1)
        expected += (p * (p.log() - q.log())).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert (logits.grad[0, :6] == 0).all() and (logits.grad[0, 8] == 0).all()  # target detached, hard slot untouched
    assert (logits.grad[0, 6:8] != 0).any(dim=-1).all()


def test_collator_gives_soft_targets_to_spans_inside_a_sampled_continuation():
    x = list(range(10, 30))  # 20 tokens, data until 8
    ex = {"input_ids": x, "index": 0, "real_until": 8, "temperature": 0.5, "anchors": [3, 7, 12, 17],
          "greedy": [[90 + a, 91 + a, 92 + a] for a in (3, 7, 12, 17)]}
    collator = AdaptiveSpanCollator([2], 3, seed=1, soft_targets=True)
    batch = collator([ex])
    adaptive = batch["position_ids"][0, 20:]
    anchors = torch.tensor([a for a, labels in collator.spans(ex) for _ in labels])
    soft = batch["soft_temperature"][0, 20:]
    assert len(anchors) == len(adaptive) > 4
    expect_soft = (anchors >= 7) & (adaptive < 20)  # x_{a+1} generated; a real token at the slot's position
    assert expect_soft.any() and (~expect_soft).any()
    assert torch.equal(soft > 0, expect_soft) and (soft[expect_soft] == 0.5).all()
    assert torch.equal(batch["adaptive_labels"][0, 20:] == IGNORE, expect_soft)
    assert (batch["soft_temperature"][0, :20] == 0).all()
    greedy_context = collator([{**ex, "temperature": 0.0}])
    soft_off = AdaptiveSpanCollator([2], 3, seed=1)([ex])
    for plain in (greedy_context, soft_off):  # only hard labels
        assert (plain["soft_temperature"] == 0).all() and (plain["adaptive_labels"][0, 20:] != IGNORE).all()
