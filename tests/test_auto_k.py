"""The automatic-K rule (vllm_sdsat/engine/auto_k.py) on its own; tests/test_vllm.py runs it in vLLM."""
import itertools

import numpy as np
import pytest

from vllm_sdsat.engine.auto_k import (DRAFTING, PLAIN, POSITION_PRIOR, PROBE_BUDGET, PROBE_STEPS, Acceptance, AutoK,
                                      SizeClass)
from vllm_sdsat.engine.step_cost import StepCost, best_drafting_plan, step_ms

K = 4


def expected_from_rates(rates) -> np.ndarray:
    rates = np.asarray(rates, dtype=float)
    return np.concatenate([np.ones((len(rates), 1)), 1 + np.cumsum(np.cumprod(rates, axis=1), axis=1)], axis=1)


def rate(expected, k, cost, base):
    """Expected tokens per ms of a plan, written out from the rule's definition."""
    a, b, d = cost
    k = np.asarray(k)
    drafting = int((k > 0).sum())
    time = a + b * (base + k.sum() + k.max(initial=0) * drafting) + (d if drafting else 0)
    return expected[np.arange(len(k)), k].sum() / time


def choose(expected, cost, base):
    """The rule's choice: the best drafting plan, or no drafts where that is faster."""
    k, drafting_rate = best_drafting_plan(expected, cost, base)
    return k if drafting_rate > len(k) / step_ms(cost, base, np.zeros(len(k))) else np.zeros_like(k)


def test_acceptance_counts_positions_reached_and_accepted():
    acc = Acceptance(K)
    acc.observe("r", num_drafts=4, num_accepted=2)  # positions 1, 2 accepted, 3 rejected, 4 never reached
    own = acc.own("r")
    assert own[0].tolist() == [1, 1, 1, 0] and own[1].tolist() == [1, 1, 0, 0]
    # A request with no history takes all requests' rates, each position's after the first shrunk towards
    # the rate at the one before by POSITION_PRIOR observations: position 4 has no data.
    r1 = 1.0
    r2 = (1 + POSITION_PRIOR * r1) / (1 + POSITION_PRIOR)
    r3 = (0 + POSITION_PRIOR * r2) / (1 + POSITION_PRIOR)
    rates = [r1, r2, r3, r3]
    assert np.allclose(acc.kind_rates()[0], rates)
    assert np.allclose(acc.expected_tokens(["new"])[0], [1, *(1 + np.cumsum(np.cumprod(rates)))])


def test_a_position_that_plans_stop_reaching_drifts_back_to_the_rate_before_it():
    """One old rejection at position 3, then 1000 steps of two drafts, both accepted: position 3 is not
    judged by that one draft for ever (its rate was 0, and plans never drafted past 2 again)."""
    acc = Acceptance(K)
    acc.observe("r", 4, 2)
    for _ in range(1000):  # one request, one observation per step: each folds in the one before
        acc.observe("s", 2, 2)
    rates = acc.kind_rates()[0]
    assert rates[1] > 0.99 and rates[2] > 0.9 and rates[3] > 0.9


def test_a_request_with_history_keeps_its_own_rate():
    acc = Acceptance(K)
    for _ in range(30):
        acc.observe("good", 4, 4)
        acc.observe("bad", 4, 0)
    good, bad = acc.expected_tokens(["good", "bad"])
    assert good[-1] > 4.5 and bad[-1] < 1.5


def test_forgetting_finished_requests_keeps_the_live_ones():
    acc = Acceptance(K)
    for i in range(100):  # more requests than the first allocation of rows
        acc.observe(f"r{i}", 4, i % 5)
    live = ["r3", "r99"]
    before = acc.expected_tokens(live)
    acc.forget(set(live))
    assert sorted(acc.rows) == live and np.allclose(acc.expected_tokens(live), before)
    assert not acc.own("r4").any()


@pytest.mark.parametrize("cost, expected_k", [
    ((10.0, 0.01, 0.1), K),  # tokens nearly free next to the fixed step cost: draft all K
    ((1.0, 1.0, 5.0), 0),    # every token costs as much as a step: never draft
])
def test_choice_follows_the_cost_of_tokens(cost, expected_k):
    expected = expected_from_rates([[0.9] * K] * 3)
    assert choose(expected, cost, 3).tolist() == [expected_k] * 3


def test_requests_that_accept_more_get_more_drafts():
    expected = expected_from_rates([[0.95] * K, [0.2] * K])
    k_good, k_bad = choose(expected, (2.0, 0.15, 0.5), 2)
    assert k_good > k_bad


@pytest.mark.parametrize("seed", range(20))
def test_choice_is_close_to_the_best_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 3
    expected = expected_from_rates(rng.uniform(0.1, 1.0, size=(n, K)))
    cost = tuple(rng.uniform(0.05, 3.0, size=3))
    chosen, predicted = best_drafting_plan(expected, cost, n)
    assert chosen.any() and np.isclose(predicted, rate(expected, chosen, cost, n))
    best = max(rate(expected, k, cost, n) for k in itertools.product(range(K + 1), repeat=n) if any(k))
    assert rate(expected, chosen, cost, n) >= 0.97 * best


def test_lookup_drafts_count_as_tokens_but_do_not_price_adaptive_drafts():
    """Hybrid engines: a request's lookup drafts (accepted far more often where the text repeats) must not
    raise the acceptance that sets how many adaptive drafts it gets; they still count as tokens made."""
    auto = AutoK(K)
    auto.observe_drafts("r", K, 1)
    before = auto.acceptance.expected_tokens(["r"])
    auto.accepted = 0
    for _ in range(20):
        auto.observe_drafts("r", K, K, lookup=True)
    assert np.array_equal(auto.acceptance.expected_tokens(["r"]), before)
    assert auto.accepted == 20 * K


def test_step_cost_fit_recovers_the_machine():
    rng = np.random.default_rng(0)
    # ms, ms per token (verified or drafted), ms per draft pass, ms per step that verifies drafts
    truth = np.array([5.0, 0.2, 3.0, 1.0])
    fit = StepCost()
    for _ in range(400):
        verified, drafted = int(rng.integers(1, 300)), int(rng.integers(0, 2)) * int(rng.integers(1, 200))
        verifying = bool(rng.integers(0, 2))
        ms = truth @ [1, verified + drafted, drafted > 0, verifying] * rng.uniform(0.97, 1.03)
        fit.observe(verified, drafted, verifying, ms / 1e3)
    assert np.allclose(np.maximum(fit.theta * fit.SCALE, 0), truth, rtol=0.15, atol=0.3)
    assert np.allclose(fit.coefficients(), [5.0, 0.2, 4.0], rtol=0.15, atol=0.3)  # drafting pays both fixed costs


def test_step_cost_fit_keeps_steps_that_follow_the_warm_up():
    """Steps are checked against the fit for 3x outliers from the warm-up's end on: that fit must exist
    by then (a fit of zeros took every step for an outlier and dropped two)."""
    fit = StepCost()
    for _ in range(12):
        fit.observe(1, 0, False, 2.2e-3)
    assert fit.steps == 12 and fit.outliers == 0


def test_step_cost_fit_holds_where_features_never_vary():
    """Batch 1's plain steps: one token count, never a draft pass, thousands of steps. The fit must stay
    at the time measured (recursive least squares with forgetting winds up here and drifts away)."""
    rng = np.random.default_rng(0)
    fit = StepCost()
    for _ in range(5000):
        fit.observe(1, 0, False, rng.normal(2.2, 0.3) / 1e3)
    a, b, _ = fit.coefficients()
    assert a + b == pytest.approx(2.2, rel=0.1)


def test_a_class_without_timed_plain_steps_times_some_before_drafting():
    """Drafting's speedup is measured against plain steps: a class that has timed none (its warm-up
    steps were all prefills or gaps) runs plain until it has, instead of probing drafting for ever."""
    size = SizeClass((DRAFTING,))
    assert [size.next_mode() for _ in range(5)] == [PLAIN] * 5
    for _ in range(2):
        size.observe(8, 8, 0, False, PLAIN, PLAIN, 8, 0.004)
    assert size.next_mode() == DRAFTING  # never measured: probed at once


class Machine:
    """A fake engine: step time from given coefficients [a, b, d] (ms, per token, per draft pass) or a
    function of (verified, drafted, verifying), every draft of every request accepted with probability
    `accept`, the clock advanced by each step's cost. With `lookup_accept` (a hybrid engine) the first
    `matched` requests have a lookup match: they take K lookup drafts, accepted with that probability,
    where the plan's mode takes lookup drafts, and skip the draft pass."""

    def __init__(self, cost, accept, n=4, seed=0, lookup_accept=None, sampled=False, matched=None):
        self.cost, self.accept, self.n, self.lookup_accept = cost, accept, n, lookup_accept
        self.matched = n if matched is None else matched
        self.sampled = sampled  # whether the requests sample (a batch of one kind)
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.tokens = 0
        self.auto = AutoK(K, lookup=lookup_accept is not None, clock=lambda: self.now)

    def step_ms(self, verified: int, drafted: int, verifying: bool) -> float:
        if callable(self.cost):
            return self.cost(verified, drafted, verifying)
        return np.array(self.cost) @ [1, verified + drafted, drafted > 0]

    def run(self, steps: int) -> list[list[int]]:
        req_ids = [f"r{i}" for i in range(self.n)]
        drafts, lookup = [0] * self.n, [False] * self.n
        plans = []
        for _ in range(steps):  # as in vLLM: schedule (and plan), run the step, then report its acceptance
            verified = self.n + sum(drafts)  # this step verifies the last plan's drafts
            plan = self.auto.plan(req_ids, verified, self.n, sampled=[self.sampled] * self.n)
            plans.append(plan)
            takes_lookup = self.lookup_accept is not None and self.auto.takes_lookup
            adaptive = [0 if (takes_lookup and i < self.matched) or self.auto.lookup_only else k
                        for i, k in enumerate(plan)]
            draft_pass = max(adaptive) * sum(k > 0 for k in adaptive)
            self.now += self.step_ms(verified, draft_pass, any(drafts)) / 1e3
            self.tokens += self.n
            for r, k, looked_up in zip(req_ids, drafts, lookup):
                if k:
                    trials = self.rng.random(k) < (self.lookup_accept if looked_up else self.accept)
                    accepted = k if trials.all() else int(np.argmin(trials))  # up to the first rejection
                    self.auto.observe_drafts(r, k, accepted, self.sampled, lookup=looked_up)
                    self.tokens += accepted
            lookup = [bool(k) and takes_lookup and i < self.matched for i, k in enumerate(plan)]
            drafts = [K if looked_up else k for k, looked_up in zip(adaptive, lookup)]
        return plans

    def rate(self, steps: int) -> float:
        """Tokens per ms over the next `steps` steps."""
        start_time, start_tokens = self.now, self.tokens
        self.run(steps)
        return (self.tokens - start_tokens) / (self.now - start_time) / 1e3


def test_greedy_and_sampling_batches_learn_apart():
    """Greedy batches gain from drafting (acceptance 0.9), sampling ones lose (0.2, and a sampled token
    costs 6x to verify). After a long greedy phase, sampling batches of the same size neither inherit
    its speedup nor its warm-up widths: they draft at most 2 while warming up, then only in probes; and
    back to greedy, drafting resumes at once, with no second warm-up."""
    greedy_cost, sampled_cost = [2.0, 0.05, 0.5], [2.0, 0.3, 0.5]
    machine = Machine(cost=greedy_cost, accept=0.9)
    machine.run(600)
    assert sum(any(p) for p in machine.run(200)) >= 0.9 * 200
    machine.cost, machine.accept, machine.sampled = sampled_cost, 0.2, True
    sampled_plans = machine.run(400)
    assert max(max(p) for p in sampled_plans[:8]) <= 2  # narrow warm-up widths
    assert sum(any(p) for p in sampled_plans[8:]) <= 0.05 * len(sampled_plans)
    fresh = Acceptance(K)  # a new sampling request takes the sampling requests' rates, not the greedy ones'
    fresh.total = machine.auto.acceptance.total
    new_sampled, new_greedy = fresh.expected_tokens(["new", "new"], sampled=[True, False])
    assert new_sampled[2] < 1.5 < new_greedy[2]
    machine.cost, machine.accept, machine.sampled = greedy_cost, 0.9, False
    assert sum(any(p) for p in machine.run(20)) >= 20 - PROBE_STEPS - 1  # a probe of plain steps at most


def test_a_warm_up_that_shows_drafting_losing_is_not_followed_by_a_probe():
    """From 4 requests up, warm-up steps count towards drafting's measured speedup: where drafting
    loses badly, the class runs plain after its warm-up instead of probing drafting at once."""
    machine = Machine(cost=[2.0, 0.5, 2.0], accept=0.2, n=8)
    drafting = [i for i, plan in enumerate(machine.run(40)) if any(plan)]
    assert drafting == list(range(drafting[0], drafting[0] + 4))  # the warm-up's 4 drafting steps alone


def test_auto_k_never_drafts_where_drafting_costs_more_than_it_gives():
    machine = Machine(cost=[1.0, 2.0, 2.0], accept=0.6)
    machine.run(100)
    steady = machine.run(500)
    assert sum(any(p) for p in steady) <= 0.05 * len(steady)  # probes only
    plain_rate = 4 / (1.0 + 2.0 * 4)  # tokens per ms without drafts
    assert machine.rate(3000) >= (1 - 2 * PROBE_BUDGET) * plain_rate  # 27 s: probes come every ~8 s


def test_auto_k_drafts_all_k_where_drafts_are_cheap_and_accepted():
    plans = Machine(cost=[20.0, 0.05, 1.0], accept=0.95).run(600)
    steady = plans[100:]
    assert sum(p == [K] * 4 for p in steady) >= len(steady) * 0.97


def test_auto_k_drafts_all_k_at_batch_1_where_later_drafts_are_accepted_less_often():
    """Batch 1, tokens nearly free, every draft accepted with 0.6: the K-th draft still adds 0.6^K tokens
    for next to nothing. Plans once stayed at k = 1-2 here: a deep position's last drafts had been
    rejected, and a plan that never drafts it never learns otherwise."""
    for seed in range(3):
        steady = Machine(cost=[8.0, 0.03, 3.0], accept=0.6, n=1, seed=seed).run(2000)[500:]
        assert sum(p == [K] for p in steady) >= 0.95 * len(steady)


def test_auto_k_follows_the_machine_when_drafting_stops_paying():
    machine = Machine(cost=[20.0, 0.05, 1.0], accept=0.95)
    machine.run(300)
    machine.cost = [1.0, 2.0, 2.0]  # e.g. the batch grew on a machine where tokens cost
    plans = machine.run(1200)[-400:]
    assert sum(any(p) for p in plans) <= 0.05 * len(plans)


def test_auto_k_drafts_by_measured_speedup_where_fixed_costs_do_not_add_up():
    """vLLM's speculative path costs the same in a step that drafts, verifies, or both: a cost the
    linear step model (draft pass + verification, added) gets wrong. Drafting every step wins here by
    1.34x (E(4) = 3.36 tokens in 5 ms against 1 in 2 ms); measured, it is found. Not in every run: a
    probe of 3 steps, one of them the switch, judged on a few drafts' acceptance, can fall under 1x, and
    the next one comes much later (a quarter to a third of seeds ran plain throughout), so the median of
    five runs."""
    rates = []
    for seed in range(5):
        machine = Machine(cost=lambda verified, drafted, verifying: 2.0 + 3.0 * (drafted > 0 or verifying),
                          accept=0.8, n=1, seed=seed)
        machine.run(300)
        rates.append(machine.rate(1000))
    assert np.median(rates) >= 1.2 * 1 / 2.0  # tokens per ms of plain decoding: 1 per 2 ms; probes cost some


def test_hybrid_auto_k_takes_lookup_drafts_alone_where_they_pay_and_adaptive_ones_do_not():
    """Hybrid drafting: lookup drafts cost only their verification and are accepted at 0.9; adaptive
    drafts need the draft pass and are accepted at 0.5. Lookup mode (1.5x plain) beats both."""
    machine = Machine(cost=[1.0, 0.2, 2.0], accept=0.5, lookup_accept=0.9)
    machine.run(300)
    plain_rate = 4 / (1.0 + 0.2 * 4)
    assert machine.rate(1000) >= 1.35 * plain_rate
    assert machine.auto.classes[3, False].mode == "lookup"


def test_hybrid_auto_k_leaves_lookup_drafts_that_are_not_accepted():
    """Half the rows have a lookup match, but their lookup drafts are accepted at 0.05 (sampling at
    T = 1.0 does that); adaptive drafts at 0.8, worth drafting. The rows with a match then take adaptive
    drafts too: the drafting mode, measured faster than the hybrid one."""
    machine = Machine(cost=[2.0, 0.05, 1.0], accept=0.8, lookup_accept=0.05, matched=2)
    machine.run(600)
    modes, plan = [], machine.auto.plan
    machine.auto.plan = lambda *args, **kwargs: (plan(*args, **kwargs), modes.append(machine.auto.mode))[0]
    machine.run(400)
    assert modes.count(DRAFTING) >= 0.9 * len(modes), {m: modes.count(m) for m in set(modes)}


def test_auto_k_fits_each_batch_size_on_its_own():
    """A machine where a forward of up to 16 tokens costs what one token costs, and more cost 0.3 ms
    each: drafting pays alone, not at batch 16. The batch alternates between the two, as static
    batches do when they drain."""
    machine = Machine(cost=lambda verified, drafted, verifying: 2.0 + 0.3 * max(0, verified - 16) + 0.3 * drafted,
                      accept=0.95, n=1)
    drafting_in_batch = full_k_alone = 0
    for cycle in range(15):
        machine.n = 16
        batch = machine.run(40)
        machine.n = 1
        alone = machine.run(40)
        if cycle >= 5:
            drafting_in_batch += sum(any(p) for p in batch)
            full_k_alone += sum(p == [K] for p in alone)
    assert full_k_alone >= 0.95 * 400 and drafting_in_batch <= 0.05 * 400


def test_steps_across_an_idle_gap_or_with_prefill_are_not_timed():
    now = [0.0]
    auto = AutoK(K, clock=lambda: now[0])
    for step in range(20):
        ids = [f"batch{step // 5}"]  # a new request every 5 steps, after the last one finished
        now[0] += 100.0 if step % 5 == 0 else 0.002
        auto.plan(ids, 1 + 100 * (step % 5 == 1), 1 + 100 * (step % 5 == 1))  # and a 100-token prefill
    # Step s is timed when step s + 1 starts: not the first 4 (settling), prefills, or steps before a gap.
    expected = [s for s in range(4, 19) if s % 5 not in (1, 4)]
    assert sum(c.cost.steps for c in auto.classes.values()) == len(expected)
