"""Automatic K: how many drafts each request gets next step, chosen for the most tokens per second.

The rule, each step, for the requests the scheduler just scheduled:

    tokens of request r with k drafts      E_r(k) = 1 + sum_{j<=k} prod_{i<=j} p_r(i)
    step time                              T = a + b * (verified + draft-pass tokens) + d * [draft pass]
    choose k_r in 0..K per request         maximising sum_r E_r(k_r) / T

p_r(i) is request r's acceptance rate at draft position i, given the drafts before it were accepted,
smoothed towards the rate of all requests at i (a new request takes theirs), so a T = 1.0 request
and a greedy one in the same batch get different k. The draft pass is as wide as the largest k_r,
and requests with k_r = 0 skip it. T is a least-squares fit over recent steps, timed by the
scheduler's own clock, so it measures this machine under this load. k = 0 for every request makes
the next step a plain decoding step. The rule can only learn what it tries, so now and then it takes
the better plan of the other kind (drafting or not) for one step, as rarely as keeps the expected
loss of these probes under 1% of the tokens (every 16 to 256 steps).

Costs O(requests x K^2) numpy work every few steps: about 25 microseconds per step on average.
"""
from __future__ import annotations

import time

import numpy as np

PROBE_BUDGET = 0.01   # at most this fraction of the tokens spent on probes of the choice not taken
PROBE_MIN, PROBE_MAX = 16, 256  # steps between probes
WARMUP_STEPS = 8      # steps timed per batch-size class before its cost fit is trusted (widths K, 0, K/2)
REPLAN_EVERY = 4      # steps a choice is kept while the batch stays the same
# Drafting must beat plain decoding by this factor in the fit. The fit is per step; it does not see what
# drafting costs outside its steps (in a static batch, requests that accept less finish later, and the
# batch's last steps run nearly empty), and measured in vLLM it drafted where that lost 10-25%.
DRAFT_MARGIN = 1.15
SETTLE_STEPS = 4      # the engine's first steps, never timed: they include one-time set-up
PRIOR_WEIGHT = 2.0    # how many observations of all requests' acceptance a request's own estimate starts with
REQUEST_DECAY = 0.9   # per observation: a request's recent drafts count more than its old ones
GLOBAL_DECAY = 0.995


class Acceptance:
    """Per-position acceptance counts, per request and over all requests, with exponential forgetting.

    Observations arrive one request at a time from the scheduler; they are queued and folded in with a
    few array operations per step, so the cost per step hardly grows with the batch."""

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.total = np.zeros((2, k_max))  # [reached, accepted] per position, all requests
        self.rows: dict[str, int] = {}  # request -> its row of `counts`; row 0 stays zero (no history)
        self.counts = np.zeros((64, 2, k_max))
        self.pending: list[tuple[str, int, int]] = []
        self.pending_ids: set[str] = set()
        positions = np.arange(1, k_max + 1)
        drafts, accepted = np.meshgrid(np.arange(k_max + 1), np.arange(k_max + 1), indexing="ij")
        # [drafts, accepted, (reached, accepted), position]: what one observation adds
        self.table = np.stack([positions <= np.minimum(accepted + 1, drafts)[..., None],
                               positions <= np.minimum(accepted, drafts)[..., None]], axis=2).astype(float)

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        if req_id in self.pending_ids:
            self._flush()  # a second observation of a request folds in after its first
        self.pending_ids.add(req_id)
        self.pending.append((req_id, min(num_drafts, self.k_max), min(num_accepted, num_drafts, self.k_max)))

    def own(self, req_id: str) -> np.ndarray:
        """[reached, accepted] per position of one request's drafts (decayed counts)."""
        self._flush()
        return self.counts[self.rows.get(req_id, 0)]

    def _flush(self) -> None:
        if not self.pending:
            return
        req_ids, drafts, accepted = zip(*self.pending)
        self.pending, self.pending_ids = [], set()
        rows = np.array([self.rows.get(r) or self._new_row(r) for r in req_ids])
        steps = self.table[list(drafts), list(accepted)]  # [m, 2, K]
        self.counts[rows] = self.counts[rows] * REQUEST_DECAY + steps  # a request observes once per step
        self.total = self.total * GLOBAL_DECAY ** len(rows) + steps.sum(0)

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

    def expected_tokens(self, req_ids: list[str]) -> np.ndarray:
        """E_r(k) for k = 0..K: [num requests, K + 1]."""
        self._flush()
        reached, accepted = self.total
        prior = np.where(reached > 0, accepted / np.maximum(reached, 1e-9), 0.5)
        own = self.counts[[self.rows.get(r, 0) for r in req_ids]]  # [n, 2, K]
        rate = (own[:, 1] + PRIOR_WEIGHT * prior) / (own[:, 0] + PRIOR_WEIGHT)
        return np.concatenate([np.ones((len(req_ids), 1)), 1 + np.cumsum(np.cumprod(rate, axis=1), axis=1)], axis=1)


class StepCost:
    """Least-squares fit of step ms = a + b * (verified + draft-pass tokens) + d * [draft pass]
    + e * [drafts verified], updated recursively with forgetting (recent steps weigh more).

    A draft token and a verified token cost the same (both are tokens of a forward of the same model);
    with separate prices the two are collinear whenever every request drafts the step's width. The two
    fixed costs of drafting fall in different steps: the draft pass in the step that drafts, vLLM's
    speculative verification (rejection sampler, spec metadata, the draft round trip) in the next one.
    A plan that keeps drafting pays both every step; apart, they keep the step after a switch from
    being charged to the tokens."""

    FORGET = 0.98
    SCALE = np.array([1.0, 1e-2, 1.0, 1.0])  # tokens in hundreds: a well-conditioned fit

    def __init__(self):
        self.theta = np.zeros(4)
        self.cov = np.eye(4) * 1e3
        self.steps = self.outliers = 0

    def observe(self, verified: int, drafted: int, verifying: bool, seconds: float) -> None:
        x = np.array([1.0, verified + drafted, float(drafted > 0), float(verifying)]) * self.SCALE
        outlier = self.steps >= WARMUP_STEPS and seconds * 1e3 > 3 * max(x @ self.theta, 1e-3)
        self.outliers = self.outliers + 1 if outlier else 0
        if 0 < self.outliers <= 2:
            return  # one-time set-up (kernels for a new shape), unless it persists: then the machine changed
        gain = self.cov @ x / (self.FORGET + x @ self.cov @ x)
        self.theta = self.theta + gain * (seconds * 1e3 - x @ self.theta)  # in milliseconds
        self.cov = (self.cov - np.outer(gain, x @ self.cov)) / self.FORGET
        self.steps += 1

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, d + e): ms, ms per token, and the fixed cost per step of drafting, clipped at 0: a fit
        to noise must not make tokens free."""
        a, b, d, e = np.maximum(self.theta * self.SCALE, 0.0)
        return max(a, 1e-3), max(b, 1e-6), d + e


def step_ms(cost: tuple[float, float, float], base_tokens: int, k: np.ndarray) -> np.ndarray:
    """Predicted ms of a step whose requests get drafts `k` (the last axis; any leading axes are
    other plans): they are verified next step, and the draft pass (as wide as the largest k, over the
    rows with k > 0) runs in this one."""
    a, b, d = cost
    drafting = (k > 0).sum(-1)
    return a + b * (base_tokens + k.sum(-1) + k.max(-1, initial=0) * drafting) + d * (drafting > 0)


def best_drafting_plan(expected: np.ndarray, cost: tuple[float, float, float], base_tokens: int
                       ) -> tuple[np.ndarray, float]:
    """The k per request (0..K, some k > 0) with the most expected tokens per ms, and that rate.

    For every draft-pass width w at once, each request's best k <= w at that width's current rate lam is
    argmax_k E_r(k) - lam * b * (k + w * [k > 0]) (Dinkelbach's method); three rounds converge."""
    b = cost[1]
    n, k_max = expected.shape[0], expected.shape[1] - 1
    ks = np.arange(k_max + 1)
    widths = np.arange(1, k_max + 1)[:, None]                                    # [W, 1]
    price = np.where(ks <= widths, b * (ks + widths * (ks > 0)), np.inf)        # [W, K+1]; k > w not allowed
    gainers = expected[:, 1:].argmax(0)            # per width: the request that gains most from drafting
    lam = np.full(k_max, n / step_ms(cost, base_tokens, np.zeros(n)))
    best_k, best_rate = np.full(n, k_max), expected[:, k_max].sum() / step_ms(cost, base_tokens, np.full(n, k_max))
    for _ in range(3):
        k = (expected[None] - lam[:, None, None] * price[:, None, :]).argmax(2)  # [W, n]
        idle = ~k.any(1)
        k[idle, gainers[idle]] = widths[idle, 0]   # a drafting plan drafts at least one request
        lam = expected[np.arange(n), k].sum(1) / step_ms(cost, base_tokens, k)
        w = lam.argmax()
        if lam[w] > best_rate:
            best_k, best_rate = k[w], lam[w]
    return best_k, float(best_rate)


class AutoK:
    """The scheduler's controller: acceptance and step times in, drafts per request out."""

    def __init__(self, k_max: int, clock=time.perf_counter):
        self.k_max = k_max
        self.acceptance = Acceptance(k_max)
        self.costs: dict[int, StepCost] = {}  # per batch-size class (1, 2-3, 4-7, ...): local fits
        self.clock = clock
        self.last: tuple | None = None  # (time, request ids, decode only, verified tokens, draft tokens,
        #                                  whether it verified drafts) of the last step
        self.decisions = self.seen = self.since_probe = 0
        # Warm-up widths: drafting and not, at two widths, so that every coefficient of the fit is seen.
        self.warmup = (k_max, k_max, 0, 0, (k_max + 1) // 2, (k_max + 1) // 2)
        self.choice: tuple[list[str], int, np.ndarray, np.ndarray, float] | None = None

    def observe_drafts(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        self.acceptance.observe(req_id, num_drafts, num_accepted)

    def plan(self, req_ids: list[str], verified_tokens: int, base_tokens: int) -> list[int]:
        """Drafts per request for the step after this one. `verified_tokens`: all tokens this step
        computes; `base_tokens`: those that are not drafts (what the next step costs besides drafts)."""
        now = self.clock()
        if self.last is not None:
            self._time_step(now - self.last[0], req_ids, *self.last[1:])
        self.decisions += 1
        self.since_probe += 1
        if not req_ids:
            counts = np.zeros(0, dtype=np.int64)
        elif (cost := self._cost(len(req_ids))).steps < WARMUP_STEPS:
            counts = np.full(len(req_ids), self.warmup[cost.steps % len(self.warmup)])
        else:
            if self.choice is None or self.choice[0] != req_ids or self.decisions >= self.choice[1]:
                self.choice = (req_ids, self.decisions + REPLAN_EVERY, *self._choose(req_ids, base_tokens))
            _, _, counts, other, interval = self.choice
            if self.since_probe >= interval:
                counts, self.since_probe = other, 0
        self.last = (now, req_ids, base_tokens == len(req_ids), verified_tokens,
                     int(counts.max(initial=0)) * int((counts > 0).sum()), verified_tokens > base_tokens)
        return counts.tolist()

    def _cost(self, num_requests: int) -> StepCost:
        """The step-cost fit for batches of about this size. One line cannot fit step time from 1 to
        1000 tokens (a forward of a few tokens costs nearly what one token costs; past some size,
        cost grows with tokens), so each power-of-two class of batch size has its own."""
        size_class = num_requests.bit_length()
        if size_class not in self.costs:
            self.costs[size_class] = StepCost()
        return self.costs[size_class]

    def _time_step(self, seconds: float, next_req_ids: list[str], req_ids: list[str], decode_only: bool,
                   verified: int, drafted: int, verifying: bool) -> None:
        """Time the last step, if it was a step of decodes alone (prefill tokens cost otherwise) and the
        engine went on with some of its requests (otherwise it may have been idle before this one)."""
        self.seen += 1
        if self.seen > SETTLE_STEPS and decode_only and not set(req_ids).isdisjoint(next_req_ids):
            self._cost(len(req_ids)).observe(verified, drafted, verifying, seconds)

    def _choose(self, req_ids: list[str], base_tokens: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(the better plan, the better plan of the other kind (drafting or not), steps between probes)."""
        n = len(req_ids)
        cost = self._cost(n).coefficients()
        drafts, drafting_rate = best_drafting_plan(self.acceptance.expected_tokens(req_ids), cost, base_tokens)
        plain_rate = n / step_ms(cost, base_tokens, np.zeros(n))
        plain = np.zeros(n, dtype=np.int64)
        best, other = (drafts, plain) if drafting_rate > DRAFT_MARGIN * plain_rate else (plain, drafts)
        # A probe of the other plan loses (1 - its rate / the best rate) of a step's tokens if the fit is
        # right: probe rarely enough that this stays under PROBE_BUDGET of the tokens.
        loss = 1 - min(drafting_rate, plain_rate) / max(drafting_rate, plain_rate)
        return best, other, float(np.clip(loss / PROBE_BUDGET, PROBE_MIN, PROBE_MAX))
