"""Automatic K: how many drafts each request gets next step, chosen for the most tokens per second.

The rule, each step, for the requests the scheduler just scheduled:

    tokens of request r with k drafts      E_r(k) = 1 + sum_{j<=k} prod_{i<=j} p_r(i)
    step time                              T = a + b * verified tokens + c * draft-pass tokens + d * [any drafts]
    choose k_r in 0..K per request         maximising sum_r E_r(k_r) / T

p_r(i) is request r's acceptance rate at draft position i, given the drafts before it were accepted,
smoothed towards the rate of all requests at i (a new request takes theirs), so a T = 1.0 request
and a greedy one in the same batch get different k. The draft pass is as wide as the largest k_r,
and requests with k_r = 0 skip it. T is a least-squares fit over recent steps, timed by the
scheduler's own clock, so it measures this machine under this load. k = 0 for every request makes
the next step a plain decoding step. The rule can only learn what it tries, so every `PROBE_EVERY`
steps it flips once between drafting (at K) and not drafting.

Costs O(requests x K^2) numpy work per step, a few tens of microseconds at batch 64.
"""
from __future__ import annotations

import collections
import time

import numpy as np

PROBE_EVERY = 32      # steps between probes of the choice not taken
WARMUP_STEPS = 16     # steps timed before the cost fit is trusted (probes every 4 steps meanwhile)
SETTLE_STEPS = 4      # the engine's first steps, never timed: they include one-time set-up
PRIOR_WEIGHT = 2.0    # how many observations of all requests' acceptance a request's own estimate starts with
REQUEST_DECAY = 0.9   # per observation: a request's recent drafts count more than its old ones
GLOBAL_DECAY = 0.995


class Acceptance:
    """Per-position acceptance counts, per request and over all requests, with exponential forgetting."""

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.total = np.zeros((2, k_max))  # [reached, accepted] per position, all requests
        self.by_request: dict[str, np.ndarray] = {}

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        positions = np.arange(1, self.k_max + 1)
        step = np.stack([(positions <= min(num_accepted + 1, num_drafts)),
                         (positions <= min(num_accepted, num_drafts))]).astype(float)
        own = self.by_request.get(req_id)
        self.by_request[req_id] = step if own is None else own * REQUEST_DECAY + step
        self.total = self.total * GLOBAL_DECAY + step

    def forget(self, live: set[str]) -> None:
        self.by_request = {r: c for r, c in self.by_request.items() if r in live}

    def expected_tokens(self, req_ids: list[str]) -> np.ndarray:
        """E_r(k) for k = 0..K: [num requests, K + 1]."""
        reached, accepted = self.total
        prior = np.where(reached > 0, accepted / np.maximum(reached, 1e-9), 0.5)
        own = np.stack([self.by_request.get(r, np.zeros((2, self.k_max))) for r in req_ids])  # [n, 2, K]
        rate = (own[:, 1] + PRIOR_WEIGHT * prior) / (own[:, 0] + PRIOR_WEIGHT)
        return np.concatenate([np.ones((len(req_ids), 1)), 1 + np.cumsum(np.cumprod(rate, axis=1), axis=1)], axis=1)


class StepCost:
    """Least-squares fit of step seconds = a + b * verified tokens + c * draft tokens + d * [drafting],
    updated recursively with forgetting (recent steps weigh more)."""

    FORGET = 0.98
    SCALE = np.array([1.0, 1e-2, 1e-2, 1.0])  # tokens in hundreds: a well-conditioned fit

    def __init__(self):
        self.theta = np.zeros(4)
        self.cov = np.eye(4) * 1e3
        self.steps = 0

    def observe(self, verified: int, drafted: int, seconds: float) -> None:
        x = np.array([1.0, verified, drafted, float(drafted > 0)]) * self.SCALE
        gain = self.cov @ x / (self.FORGET + x @ self.cov @ x)
        self.theta = self.theta + gain * (seconds * 1e3 - x @ self.theta)  # in milliseconds
        self.cov = (self.cov - np.outer(gain, x @ self.cov)) / self.FORGET
        self.steps += 1

    def coefficients(self) -> tuple[float, float, float, float]:
        """(a, b, c, d) in ms and ms per token, clipped at 0: a fit to noise must not make tokens free."""
        a, b, c, d = np.maximum(self.theta * self.SCALE, 0.0)
        return max(a, 1e-3), max(b, 1e-6), c, d


def choose_num_drafts(expected: np.ndarray, cost: tuple[float, float, float, float], base_tokens: int
                      ) -> np.ndarray:
    """k per request (0..K) maximising sum E_r(k_r) / T, with `base_tokens` the step's tokens besides drafts.

    For each draft-pass width w, each request's best k <= w at the current tokens-per-ms rate lam is
    argmax_k E_r(k) - lam * (b * k + c * w * [k > 0]) (Dinkelbach's method); three rounds converge."""
    a, b, c, d = cost
    n, width = expected.shape[0], expected.shape[1] - 1
    best_k, best_rate = np.zeros(n, dtype=np.int64), n / (a + b * base_tokens)
    rows = np.arange(n)
    for w in range(1, width + 1):
        ks = np.arange(w + 1)
        lam = best_rate
        for _ in range(3):
            k = (expected[:, :w + 1] - lam * (b * ks + c * w * (ks > 0))).argmax(1)
            drafting = int((k > 0).sum())
            if not drafting:
                break
            lam = expected[rows, k].sum() / (a + b * (base_tokens + k.sum()) + c * w * drafting + d)
            if lam > best_rate:
                best_k, best_rate = k, lam
    return best_k


class AutoK:
    """The scheduler's controller: acceptance and step times in, drafts per request out."""

    def __init__(self, k_max: int, clock=time.perf_counter):
        self.k_max = k_max
        self.acceptance = Acceptance(k_max)
        self.cost = StepCost()
        self.clock = clock
        self.last: tuple[float, int, int] | None = None  # (time, verified tokens, draft tokens) of the last step
        self.decisions = 0
        self.drafting = True
        self.seen = 0
        self.recent: collections.deque[float] = collections.deque(maxlen=32)  # recent step seconds

    def observe_drafts(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        self.acceptance.observe(req_id, num_drafts, num_accepted)

    def plan(self, req_ids: list[str], verified_tokens: int, base_tokens: int) -> list[int]:
        """Drafts per request for the step after this one. `verified_tokens`: all tokens this step
        computes; `base_tokens`: those that are not drafts (what the next step costs besides drafts)."""
        now = self.clock()
        if self.last is not None:
            t0, verified, drafted = self.last
            seconds = now - t0
            self.seen += 1
            # Not steps: the engine's first ones (one-time kernel set-up) and gaps (the engine idle
            # between requests), which are far above the typical step.
            typical = np.median(self.recent) if len(self.recent) >= 4 else np.inf
            if self.seen > SETTLE_STEPS and seconds < 4 * typical:
                self.cost.observe(verified, drafted, seconds)
                self.recent.append(seconds)
        self.decisions += 1
        probe_every = 4 if self.cost.steps < WARMUP_STEPS else PROBE_EVERY
        if not req_ids:
            counts = np.zeros(0, dtype=np.int64)
        elif self.decisions % probe_every == 0:
            counts = np.full(len(req_ids), 0 if self.drafting else self.k_max)
        elif self.cost.steps < WARMUP_STEPS:
            counts = np.full(len(req_ids), self.k_max)
        else:
            counts = choose_num_drafts(self.acceptance.expected_tokens(req_ids), self.cost.coefficients(),
                                       base_tokens)
            self.drafting = bool(counts.any())
        self.last = (now, verified_tokens, int(counts.max(initial=0)) * int((counts > 0).sum()))
        return counts.tolist()
