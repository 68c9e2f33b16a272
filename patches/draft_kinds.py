"""Hook: the scheduler learns which requests took lookup drafts (hybrid drafting), so that automatic K
prices adaptive drafts by their own acceptance.

Written against vLLM 0.32 (`GPUModelRunner.take_draft_token_ids`, `v1/worker/gpu_model_runner.py`;
`Scheduler.update_draft_token_ids`, `v1/core/sched/scheduler.py`).

The workers choose between a lookup and an adaptive draft per row after the step (`patches/draft_pass.py`);
the scheduler sees only the drafts. Counting both kinds as one request's acceptance overrated adaptive
drafts: on HumanEval at batch 1 greedy, lookup drafts were accepted at 0.64 per token and adaptive ones
at 0.32, yet automatic K gave adaptive rows 6.9 drafts on average. Here the drafts' `DraftTokenIds`
carries the lookup rows' request ids (an attribute, pickled with it to the engine core), and the
scheduler keeps them until those drafts are verified, where `patches/auto_k.py` reads them.
"""
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

LOOKUP_REQ_IDS = "sdsat_lookup_req_ids"  # on the runner (set by patches/draft_pass.py), DraftTokenIds, Scheduler
_original_take = GPUModelRunner.take_draft_token_ids
_original_update = Scheduler.update_draft_token_ids


def take_draft_token_ids(self: GPUModelRunner):
    drafts = _original_take(self)
    if drafts is not None:
        setattr(drafts, LOOKUP_REQ_IDS, getattr(self, LOOKUP_REQ_IDS, frozenset()))
    return drafts


def update_draft_token_ids(self: Scheduler, draft_token_ids) -> None:
    setattr(self, LOOKUP_REQ_IDS, getattr(draft_token_ids, LOOKUP_REQ_IDS, frozenset()))
    _original_update(self, draft_token_ids)


def lookup_req_ids(scheduler: Scheduler) -> frozenset:
    """Requests whose drafts now being verified are lookup drafts."""
    return getattr(scheduler, LOOKUP_REQ_IDS, frozenset())


def apply() -> None:
    GPUModelRunner.take_draft_token_ids = take_draft_token_ids
    Scheduler.update_draft_token_ids = update_draft_token_ids
