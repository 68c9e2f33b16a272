"""Automatic K: how many drafts each request gets next step, chosen for the most tokens per second.

Two questions, answered each step for the requests the scheduler just scheduled, per class of batch:
its size (1, 2-3, 4-7, ...) and whether any of its requests samples. Sampling changes both sides of
the trade: adaptive drafts are accepted far less often (T = 1.0 against greedy), and a sampled step that
verifies K drafts per request pays top-k/top-p and rejection sampling on K + 1 rows each. What a class
learnt of greedy batches says little about sampled ones, so each regime learns its own.

1. *Draft at all?* By measurement. A drafting mode's speedup S is the tokens made in steps that
   verify or make its drafts, over the tokens plain decoding makes in the same time (a plain step of n
   requests costs what the class's recent plain steps cost, fitted as a + b * n). The class runs the
   mode of highest S, plain decoding's being 1. Every other mode is now and then probed for a few
   steps, spaced so that a probe's expected loss stays under 1% of the class's time. The modes are
   plain and drafting (adaptive drafts), and in hybrid engines (`lookup: "ngram"`) two more: lookup
   drafts alone, where rows whose text repeats take a lookup draft and the rest none, with no draft
   pass; and hybrid, where those rows take the lookup draft and the rest adaptive drafts. Hybrid pays
   where repeats are accepted (greedy), drafting where they are not (T = 1.0: 0.03-0.05 per token).
2. *How many drafts per request?* By a model. While drafting:

       tokens of request r with k drafts      E_r(k) = 1 + sum_{j<=k} prod_{i<=j} p_r(i)
       step time                              T = a + b * (verified + draft-pass tokens) + d * [draft pass]
       choose k_r in 0..K per request         maximising sum_r E_r(k_r) / T, some k_r > 0

   p_r(i) is request r's acceptance rate at draft position i, given the drafts before it were accepted,
   smoothed towards the rate of all requests of its kind (greedy or sampling) at i (a new request takes
   theirs; that rate is smoothed towards the one at i - 1, so positions no longer drafted are tried
   again), so a T = 1.0 request and a greedy one in the same batch get different k. It counts adaptive
   drafts only: in hybrid engines a row with k_r > 0 and a lookup match takes its lookup draft (up to K)
   instead, so k_r prices the adaptive draft. T is a least-squares fit over recent steps, timed by the
   scheduler's own clock. The draft pass is as wide as the largest k_r, and requests with k_r = 0 skip it.

The model alone once decided question 1 too, and in vLLM it was wrong both ways (drafting at batch 16
where that lost 10%, plain at batch 1 greedy on half the steps): a step's fixed costs are not
additive (a step that verifies and drafts pays vLLM's speculative path once), and its acceptance
estimates are noisy where the margin is thin. A measured speedup needs no model of either.

Costs, per step: a few dict and float operations while not drafting (a plain step's plan takes about 39
microseconds in the engine), a 4 x 4 solve every 32 steps, O(requests x K^2) numpy work every few steps
while drafting.
"""
from __future__ import annotations

import time

import numpy as np

from vllm_sdsat.engine.step_cost import StepCost, best_drafting_plan

PROBE_BUDGET = 0.01   # at most this fraction of a class's time spent losing in probes of the mode not taken
PROBE_STEPS = 3       # steps per probe; a probe of drafting also times the step that verifies its drafts
PROBE_SPACING = (8, 400)  # bounds on the time between probes, in probe lengths
SWITCH_AT = 1.02      # another mode must beat the current one by this factor: a little hysteresis
SPEEDUP_DECAY = 0.95  # per step that drafts or verifies: how fast the measured speedup forgets
REPLAN_EVERY = 4      # steps a drafting plan is kept while the batch stays the same
SETTLE_STEPS = 4      # the engine's first steps, never timed: they include one-time set-up
PRIOR_WEIGHT = 2.0    # how many observations of all requests' acceptance a request's own estimate starts with
REQUEST_DECAY = 0.9   # per observation: a request's recent drafts count more than its old ones
GLOBAL_DECAY = 0.995
POSITION_PRIOR = 2.0  # observations of the position before it that a position's rate starts from


class Acceptance:
    """Per-position acceptance counts, per request and over all requests of each kind (greedy, sampling),
    with exponential forgetting.

    Observations arrive one request at a time from the scheduler; they are queued and folded in with a
    few array operations per step, so the cost per step hardly grows with the batch."""

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.total = np.zeros((2, 2, k_max))  # [greedy, sampling] x [reached, accepted] per position
        self.rows: dict[str, int] = {}  # request -> its row of `counts`; row 0 stays zero (no history)
        self.counts = np.zeros((64, 2, k_max))
        self.pending: list[tuple[str, int, int, bool]] = []
        self.pending_ids: set[str] = set()
        positions = np.arange(1, k_max + 1)
        drafts, accepted = np.meshgrid(np.arange(k_max + 1), np.arange(k_max + 1), indexing="ij")
        # [drafts, accepted, (reached, accepted), position]: what one observation adds
        self.table = np.stack([positions <= np.minimum(accepted + 1, drafts)[..., None],
                               positions <= np.minimum(accepted, drafts)[..., None]], axis=2).astype(float)

    def observe(self, req_id: str, num_drafts: int, num_accepted: int, sampled: bool = False) -> None:
        if req_id in self.pending_ids:
            self._flush()  # a second observation of a request folds in after its first
        self.pending_ids.add(req_id)
        self.pending.append((req_id, min(num_drafts, self.k_max), min(num_accepted, num_drafts, self.k_max), sampled))

    def own(self, req_id: str) -> np.ndarray:
        """[reached, accepted] per position of one request's drafts (decayed counts)."""
        self._flush()
        return self.counts[self.rows.get(req_id, 0)]

    def _flush(self) -> None:
        if not self.pending:
            return
        req_ids, drafts, accepted, sampled = zip(*self.pending)
        self.pending, self.pending_ids = [], set()
        rows = np.array([self.rows.get(r) or self._new_row(r) for r in req_ids])
        steps = self.table[list(drafts), list(accepted)]  # [m, 2, K]
        self.counts[rows] = self.counts[rows] * REQUEST_DECAY + steps  # a request observes once per step
        for kind in (False, True):
            mine = np.array(sampled) == kind
            self.total[int(kind)] = self.total[int(kind)] * GLOBAL_DECAY ** mine.sum() + steps[mine].sum(0)

    def _new_row(self, req_id: str) -> int:
        row = len(self.rows) + 1
        if row == len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        self.rows[req_id] = row
        return row

    def forget(self, live: set[str]) -> None:
        self._flush()
        kept = [(r, i) for r, i in self.rows.items() if r in live]
        self.counts = np.concatenate([self.counts[:1], self.counts[[i for _, i in kept]],
                                      np.zeros((len(self.counts) - 1 - len(kept), 2, self.k_max))])
        self.rows = {r: n for n, (r, _) in enumerate(kept, start=1)}

    def kind_rates(self) -> np.ndarray:
        """[kind, K]: the rate of all requests of each kind at each position (1/2 at the first without
        data), each after the first shrunk towards the rate before it by POSITION_PRIOR observations. A
        position that plans stop reaching thus drifts back to its neighbour's rate as its counts decay, and
        is tried again; judged by its last few drafts alone (one rejection), plans at batch 1 stayed at
        k = 1-2 where k = K paid."""
        self._flush()
        rates = []
        for (reached, *deeper_reached), (accepted, *deeper_accepted) in self.total.tolist():  # plain floats
            rate = accepted / reached if reached > 0 else 0.5
            row = [rate]
            for n, a in zip(deeper_reached, deeper_accepted):
                rate = (a + POSITION_PRIOR * rate) / (n + POSITION_PRIOR)
                row.append(rate)
            rates.append(row)
        return np.array(rates)

    def expected_tokens(self, req_ids: list[str], sampled: list[bool] | None = None) -> np.ndarray:
        """E_r(k) for k = 0..K: [num requests, K + 1]. `sampled`: which requests sample (default none)."""
        self._flush()
        kinds = np.zeros(len(req_ids), dtype=int) if sampled is None else np.array(sampled, dtype=int)
        prior = self.kind_rates()[kinds]
        own = self.counts[[self.rows.get(r, 0) for r in req_ids]]  # [n, 2, K]
        rate = (own[:, 1] + PRIOR_WEIGHT * prior) / (own[:, 0] + PRIOR_WEIGHT)
        return np.concatenate([np.ones((len(req_ids), 1)), 1 + np.cumsum(np.cumprod(rate, axis=1), axis=1)], axis=1)


PLAIN, LOOKUP, HYBRID, DRAFTING = "plain", "lookup", "hybrid", "drafting"  # LOOKUP, HYBRID: hybrid engines


class SizeClass:
    """What automatic K knows of batches of one class (a power of two of requests, greedy or sampling):
    the step-cost fit that prices drafts, what a plain step costs, and each drafting mode's measured
    speedup over it."""

    def __init__(self, modes: tuple[str, ...]):
        self.cost = StepCost()   # every timed step: prices widths
        self.plain = StepCost()  # plain steps only: a + b * requests
        # Per drafting mode, decayed over steps that verify or make its drafts: [tokens made, what
        # plain decoding would have made in their time].
        self.made = {mode: [0.0, 0.0] for mode in modes}
        self.ms = {mode: 1.0 for mode in (PLAIN, *modes)}  # recent ms per step in each mode
        self.ms_since = dict.fromkeys(self.ms, 0.0)        # class time since each mode last ran
        self.mode = PLAIN
        self.probe: tuple[str, int] | None = None          # (mode, steps left)

    def speedup(self, mode: str) -> float | None:
        if mode == PLAIN:
            return 1.0
        made, plain_made = self.made[mode]
        return made / plain_made if plain_made else None

    def observe(self, requests: int, verified: int, drafted: int, verifying: bool, mode: str,
                verified_mode: str | None, made: float | None, seconds: float) -> None:
        """One timed step of `mode`, which verified drafts of `verified_mode` and made `made` tokens in
        `seconds` (see `AutoK._time_step`). It counts towards the speedup of the mode whose drafts it
        verified, or, verifying none, of its own: the first step of a run of drafting makes no more
        tokens than a plain step and pays a draft pass, the cost of switching, which a mode that is
        switched to often must carry. Steps of the warm-up count too, at their fixed widths: a first
        estimate that the mode's own steps soon replace. Without it a class probed drafting right after
        its warm-up, which in sampling batches of 32-63 requests cost 12% of a run."""
        self.cost.observe(verified, drafted, verifying, seconds)
        ms = seconds * 1e3
        if mode == PLAIN and not verifying:
            self.plain.observe(requests, 0, False, seconds)
        elif made is not None and self.plain.steps >= 2 and (counted := verified_mode if verifying else mode) in self.made:
            a, b, _ = self.plain.coefficients()
            totals = self.made[counted]
            totals[0] = totals[0] * SPEEDUP_DECAY + made
            totals[1] = totals[1] * SPEEDUP_DECAY + ms * requests / (a + b * requests)
        if mode != PLAIN or not verifying:
            self.ms[mode] = 0.8 * self.ms[mode] + 0.2 * ms
        for other in self.ms_since:
            self.ms_since[other] = 0.0 if other == mode else self.ms_since[other] + ms

    def next_mode(self) -> str:
        """The next step's mode: the one of best measured speedup (the current one unless another beats
        it by SWITCH_AT), or a probe of another. A mode is probed when the class has run without it for
        long enough that a probe's expected loss, |S_best - S_mode| / S_best of its time, stays under
        PROBE_BUDGET; at once when it has never been measured."""
        if self.probe is not None:
            mode, left = self.probe
            self.probe = (mode, left - 1) if left > 1 else None
            return mode
        if self.plain.steps < 2:  # no yardstick yet: time plain steps first
            self.mode = PLAIN
            return PLAIN
        speedups = {mode: self.speedup(mode) for mode in self.ms}
        current = speedups[self.mode] or 0.0
        best = max((m for m in speedups if speedups[m] is not None), key=lambda m: speedups[m])
        if speedups[best] > current * SWITCH_AT:
            self.mode = best
        lead = speedups[self.mode]
        for mode, speedup in speedups.items():
            if mode == self.mode:
                continue
            spacing = 0.0 if speedup is None else min(max(abs(lead - speedup) / lead / PROBE_BUDGET, PROBE_SPACING[0]),
                                                      PROBE_SPACING[1])
            if self.ms_since[mode] >= spacing * (PROBE_STEPS + 1) * self.ms[mode]:  # + 1: switching back
                self.probe = (mode, PROBE_STEPS - 1)
                return mode
        return self.mode


class AutoK:
    """The scheduler's controller: acceptance and step times in, drafts per request out. With `lookup`
    (hybrid drafting) LOOKUP and HYBRID compete too (`lookup_only`, `takes_lookup` after `plan`)."""

    def __init__(self, k_max: int, lookup: bool = False, clock=time.perf_counter):
        self.k_max = k_max
        self.modes = (LOOKUP, HYBRID, DRAFTING) if lookup else (DRAFTING,)
        self.warmup_mode = HYBRID if lookup else DRAFTING
        self.acceptance = Acceptance(k_max)
        self.classes: dict[tuple[int, bool], SizeClass] = {}
        self.clock = clock
        self.last: tuple | None = None  # what `_time_step` needs of the last step: (time, request ids,
        #                                 whether any sampled, decode only, verified tokens, draft
        #                                 tokens, whether it verified drafts, its mode, the mode of the
        #                                 drafts it verified, tokens it was expected to make)
        self.mode, self.expected = PLAIN, 0.0  # the last plan's mode, and tokens expected of its step
        self.accepted = 0  # drafts accepted since the last plan
        self.decisions = self.seen = 0
        # Warm-up widths: plain first (the yardstick of the speedups), then drafting at two widths, so
        # that every coefficient of the cost fit is seen. Narrow when sampling, where a wide drafting
        # step costs many plain ones and is seldom worth it.
        wide = (k_max, (k_max + 1) // 2)
        self.warmup = {sampled: (0, 0, 0, w, w, narrow, narrow, 0)
                       for sampled, (w, narrow) in ((False, wide), (True, (min(k_max, 2), 1)))}
        self.drafting_plan: tuple | None = None  # (requests, replan at, drafts, expected tokens)

    @property
    def lookup_only(self) -> bool:
        """Whether the last plan's drafts are lookup drafts alone (rows without a match draft nothing)."""
        return self.mode == LOOKUP

    @property
    def takes_lookup(self) -> bool:
        """Whether rows with a lookup match take it in the last plan's step."""
        return self.mode in (LOOKUP, HYBRID)

    def observe_drafts(self, req_id: str, num_drafts: int, num_accepted: int, sampled: bool = False,
                       lookup: bool = False) -> None:
        """One request's verified drafts. Lookup drafts count as tokens made, but not towards the acceptance
        that prices adaptive drafts: where the text repeats they are accepted twice as often."""
        if not lookup:
            self.acceptance.observe(req_id, num_drafts, num_accepted, sampled)
        self.accepted += min(num_accepted, num_drafts)

    def plan(self, req_ids: list[str], verified_tokens: int, base_tokens: int,
             sampled: list[bool] | None = None) -> list[int]:
        """Drafts per request for the step after this one. `verified_tokens`: all tokens this step
        computes; `base_tokens`: those that are not drafts (what the next step costs besides drafts);
        `sampled`: which requests sample rather than decode greedily (default: none)."""
        now = self.clock()
        if self.last is not None:
            self._time_step(now - self.last[0], req_ids, *self.last[1:])
        self.accepted = 0
        self.decisions += 1
        n = len(req_ids)
        any_sampled = bool(sampled) and any(sampled)
        size = self._class(n, any_sampled) if n else None
        mode, expected = PLAIN, float(n)
        warmup = self.warmup[any_sampled]
        # Plain lists, not arrays: after a forward the caches are cold, and each numpy call then costs
        # several microseconds (a plain step's plan was 81 us in the engine, 15 us in a loop of its own).
        if size is None:
            counts = []
        elif size.cost.steps < len(warmup):
            counts = [warmup[size.cost.steps]] * n
            mode = self.warmup_mode if counts[0] else PLAIN
            expected = float(self.acceptance.expected_tokens(req_ids, sampled)[:, counts[0]].sum())
        else:
            mode = size.next_mode()
            if mode == LOOKUP:
                counts = [self.k_max] * n  # rows with a lookup match take up to K; the rest none
            elif mode in (HYBRID, DRAFTING):
                if (self.drafting_plan is None or self.drafting_plan[0] != req_ids
                        or self.decisions >= self.drafting_plan[1]):
                    tokens = self.acceptance.expected_tokens(req_ids, sampled)
                    drafts, _ = best_drafting_plan(tokens, size.cost.coefficients(), base_tokens)
                    self.drafting_plan = (req_ids, self.decisions + REPLAN_EVERY, drafts.tolist(),
                                          float(tokens[np.arange(n), drafts].sum()))
                _, _, counts, expected = self.drafting_plan
            else:
                counts = [0] * n
        draft_pass_tokens = 0 if mode == LOOKUP else max(counts, default=0) * sum(k > 0 for k in counts)
        self.last = (now, req_ids, any_sampled, base_tokens == n, verified_tokens, draft_pass_tokens,
                     verified_tokens > base_tokens, mode, self.mode, self.expected)
        self.mode, self.expected = mode, expected
        return list(counts)

    def _class(self, num_requests: int, sampled: bool) -> SizeClass:
        """The state for batches of about this size, greedy or sampling. One line cannot fit step time
        from 1 to 1000 tokens (a forward of a few tokens costs nearly what one token costs; past some
        size, cost grows with tokens), nor does drafting pay the same at every size, so each
        power-of-two class has its own."""
        key = (num_requests.bit_length(), sampled)
        if key not in self.classes:
            self.classes[key] = SizeClass(self.modes)
        return self.classes[key]

    def _time_step(self, seconds: float, next_req_ids: list[str], req_ids: list[str], sampled: bool, decode_only: bool,
                   verified: int, drafted: int, verifying: bool, mode: str, verified_mode: str,
                   expected: float) -> None:
        """Time the last step, if it was a step of decodes alone (prefill tokens cost otherwise) and the
        engine went on with some of its requests (otherwise it may have been idle before this one).
        Its tokens: those it made, or below 4 requests, where one request's luck is most of the count,
        those expected from the measured acceptance of the adaptive drafts it verified (lookup drafts,
        whose rows and lengths only the workers know, are always counted). Where tokens would be
        estimated, warm-up steps are not counted (None): the model has hardly seen the class's drafts."""
        self.seen += 1
        if self.seen > SETTLE_STEPS and decode_only and not set(req_ids).isdisjoint(next_req_ids):
            n = len(req_ids)
            size = self._class(n, sampled)
            estimated = LOOKUP not in self.modes and n < 4
            if estimated and size.cost.steps < len(self.warmup[sampled]):
                made = None
            else:
                made = expected if estimated and verified_mode == DRAFTING else n + self.accepted
            size.observe(len(req_ids), verified, drafted, verifying, mode, verified_mode, made, seconds)
