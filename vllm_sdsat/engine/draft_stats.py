"""Counts of SDSAT's drafts by kind, lookup or adaptive (hybrid drafting), for a log line and the bench.

Per proposing step: the rows that took each kind and their draft tokens, whether the draft pass ran,
and whether the step's drafts were lookup only, adaptive only or mixed. Per verification (the next
step): draft tokens verified and accepted per kind, read from the host lists of sampled tokens, which
vLLM fills only without async scheduling (with it, acceptance per kind stays 0; vLLM's own metrics
still count all drafts). Every `LOG_EVERY_S` seconds with new drafts, the driver worker logs one line.

Cost: a few dict operations per batch row and step, on the host.
"""
import time

from vllm.logger import init_logger

logger = init_logger(__name__)

KINDS = ("lookup", "adaptive")
LOG_EVERY_S = 10.0


class DraftStats:
    def __init__(self, clock=time.monotonic):
        # drafts: rows given a draft; tokens: draft tokens made; verified/checked: draft tokens/drafts verified
        self.kinds = {kind: dict(drafts=0, tokens=0, checked=0, verified=0, accepted=0) for kind in KINDS}
        self.steps = dict(lookup=0, adaptive=0, mixed=0)  # steps that drafted, by the kinds they drafted
        self.draft_passes = 0
        self.pending: dict[str, str] = {}  # request id -> kind of the drafts it is about to verify
        self.clock = clock
        self.logged_at, self.logged_drafts = clock(), 0

    def verified(self, req_ids: list[str], num_draft_tokens: list[int], sampled: list[list[int]]) -> None:
        """The last step's drafts, verified in this step: a row that sampled n tokens accepted n - 1 drafts."""
        for req_id, drafted, tokens in zip(req_ids, num_draft_tokens, sampled):
            kind = self.pending.get(req_id)
            if kind and drafted and tokens:
                counts = self.kinds[kind]
                counts["checked"] += 1
                counts["verified"] += drafted
                counts["accepted"] += len(tokens) - 1

    def drafted(self, drafts: dict[str, tuple[str, int]], draft_pass: bool) -> None:
        """This step's drafts: request id -> (kind, draft tokens); `draft_pass`: the adaptive pass ran."""
        self.pending = {req_id: kind for req_id, (kind, n) in drafts.items() if n}
        for kind, n in drafts.values():
            if n:
                self.kinds[kind]["drafts"] += 1
                self.kinds[kind]["tokens"] += n
        made = set(self.pending.values())
        if made:
            self.steps["mixed" if len(made) > 1 else made.pop()] += 1
        self.draft_passes += draft_pass

    def summary(self) -> dict:
        """Counts plus, per kind, acceptance rate (accepted / verified tokens) and acceptance length
        (1 + accepted per verified draft)."""
        kinds = {kind: c | {"acceptance_rate": c["accepted"] / c["verified"] if c["verified"] else None,
                            "acceptance_length": 1 + c["accepted"] / c["checked"] if c["checked"] else None}
                 for kind, c in self.kinds.items()}
        return {"kinds": kinds, "steps": dict(self.steps), "draft_passes": self.draft_passes}

    def line(self) -> str:
        parts = []
        for kind, c in self.summary()["kinds"].items():
            rate = "n/a" if c["acceptance_rate"] is None else f"{c['acceptance_rate']:.1%}"
            length = "n/a" if c["acceptance_length"] is None else f"{c['acceptance_length']:.2f}"
            parts.append(f"{kind} {c['drafts']} drafts ({c['tokens']} tokens), acceptance {rate}, "
                         f"accepted length {length}")
        steps = ", ".join(f"{k} {v}" for k, v in self.steps.items())
        return f"SDSAT drafts: {'; '.join(parts)}; steps {steps}; draft passes {self.draft_passes}"

    def maybe_log(self) -> None:
        drafts = sum(c["drafts"] for c in self.kinds.values())
        now = self.clock()
        if drafts > self.logged_drafts and now - self.logged_at >= LOG_EVERY_S:
            logger.info(self.line())
            self.logged_at, self.logged_drafts = now, drafts
