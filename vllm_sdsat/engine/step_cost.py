"""The step time of automatic K (auto_k.py): a fit of what a step costs from its tokens and whether it
drafts or verifies, and the drafts per request that make the most tokens per ms under it."""
from __future__ import annotations

import numpy as np

WARMUP_STEPS = 8  # steps timed per batch class before its cost fit is trusted (plain, then two widths)


class StepCost:
    """Least-squares fit of step ms = a + b * (verified + draft-pass tokens) + d * [draft pass]
    + e * [drafts verified], over exponentially forgotten steps (recent steps weigh more).

    A draft token and a verified token cost the same (both are tokens of a forward of the same model);
    with separate prices the two are collinear whenever every request drafts the step's width. The two
    fixed costs of drafting fall in different steps: the draft pass in the step that drafts, vLLM's
    speculative verification (rejection sampler, spec metadata, the draft round trip) in the next one.
    A plan that keeps drafting pays both every step; apart, they keep the step after a switch from
    being charged to the tokens.

    The fit solves the forgotten normal equations with a small ridge (when read, or every REFIT_EVERY
    steps, folding in the steps queued since), rather than updating recursively: where some feature
    never varies (batch 1 has one token count; plain steps never draft), recursive least squares with
    forgetting winds up its covariance and, thousands of steps on, drifts (measured: a plain step
    fitted at 4.7 ms against 2.2 ms timed)."""

    FORGET = 0.98
    RIDGE = 1e-3 * np.eye(4)
    SCALE = (1.0, 1e-2, 1.0, 1.0)  # tokens in hundreds: a well-conditioned fit
    REFIT_EVERY = 32  # steps queued between solves while nothing reads the fit: a solve costs about 0.2 ms
    #                   with cold caches, most of automatic K's cost on a plain step when it ran every 8

    def __init__(self):
        self._theta = (0.0,) * 4  # plain floats: the per-step outlier check reads them
        self.xx, self.xy = np.zeros((4, 4)), np.zeros(4)  # forgotten sums of x x^T and x * ms
        self.queued: list[tuple[float, ...]] = []  # (x..., ms) of steps not yet folded into the sums
        self.steps = self.outliers = 0

    @property
    def theta(self) -> np.ndarray:
        if self.queued:
            self._refit()
        return np.array(self._theta)

    def _refit(self) -> None:
        """Fold the queued steps into the sums, oldest first (each step forgets the ones before it),
        and solve."""
        rows = np.array(self.queued)
        x, ms = rows[:, :4], rows[:, 4]
        weights = self.FORGET ** np.arange(len(rows) - 1, -1, -1.0)
        self.xx = self.FORGET ** len(rows) * self.xx + (x.T * weights) @ x
        self.xy = self.FORGET ** len(rows) * self.xy + (x.T * weights) @ ms
        self.queued = []
        self._theta = tuple(np.linalg.solve(self.xx + self.RIDGE, self.xy).tolist())

    def observe(self, verified: int, drafted: int, verifying: bool, seconds: float) -> None:
        x = (1.0, (verified + drafted) * self.SCALE[1], float(drafted > 0), float(verifying))
        ms = seconds * 1e3
        # A fit up to REFIT_EVERY steps old tells a 3x outlier as well as a fresh one.
        predicted = sum(f * t for f, t in zip(x, self._theta))
        outlier = self.steps >= WARMUP_STEPS and ms > 3 * max(predicted, 1e-3)
        self.outliers = self.outliers + 1 if outlier else 0
        if 0 < self.outliers <= 2:
            return  # one-time set-up (kernels for a new shape), unless it persists: then the machine changed
        self.queued.append((*x, ms))
        self.steps += 1
        if len(self.queued) >= self.REFIT_EVERY or self.steps == WARMUP_STEPS:  # a fit for the outlier check
            self._refit()

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, d + e): ms, ms per token, and the fixed cost per step of drafting, clipped at 0: a fit
        to noise must not make tokens free."""
        a, b, d, e = np.maximum(self.theta * self.SCALE, 0.0).tolist()
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
