"""Hook: automatic K in the scheduler, per request and step (`vllm_sdsat/engine/auto_k.py` has the rule).

Written against vLLM 0.32 (`Scheduler.schedule` and `Scheduler.make_spec_decoding_stats`,
`v1/core/sched/scheduler.py`; the placeholders `AsyncScheduler._update_after_schedule` sets inside
`schedule`, `v1/core/sched/async_scheduler.py`).

With K "auto" (SDSAT's default) the speculative config carries a batch-size schedule of K at every
size (`patches/speculative_config.py`), which puts vLLM's scheduler in its dynamic-K mode: no
padding of decodes to a uniform K, and a `num_spec_tokens_to_schedule` per step that the workers
draft. After each `schedule`, `AutoK` picks each scheduled request's drafts for the next step (told which
requests sample, from their sampling params):
- the scheduler output carries them to the workers as `sdsat_num_drafts` (request id -> k), and
  `num_spec_tokens_to_schedule` becomes their maximum, the width of the draft pass; in hybrid engines
  `sdsat_lookup_only` says the step takes lookup drafts alone (no draft pass), and `sdsat_takes_lookup`
  whether rows with a lookup match take it (automatic K's lookup and hybrid modes) or adaptive drafts;
- under async scheduling each request's placeholders are cut to its own k, so the next step
  verifies only those (without async, the workers hand back exactly k drafts per request).
Each request's drafted and accepted counts reach `AutoK` through `make_spec_decoding_stats`, which
`update_from_output` calls per request, with whether they were lookup drafts (`patches/draft_kinds.py`).
vLLM turns dynamic K off for data parallelism, and so does
this hook (it runs only where the scheduler has a dynamic-K lookup).
"""
from vllm.sampling_params import SamplingType
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_sdsat.engine.auto_k import AutoK
from vllm_sdsat.patches.draft_kinds import lookup_req_ids
from vllm_sdsat.patches.speculative_config import is_sdsat, resolved_block

NUM_DRAFTS = "sdsat_num_drafts"  # SchedulerOutput attributes read by patches/draft_pass.py
LOOKUP_ONLY = "sdsat_lookup_only"  # hybrid engines: this step's drafts are lookup drafts alone
TAKES_LOOKUP = "sdsat_takes_lookup"  # hybrid engines: rows with a lookup match take it this step
_FORGET_EVERY = 256  # steps between dropping the acceptance history of finished requests
_original_schedule = Scheduler.schedule
_original_stats = Scheduler.make_spec_decoding_stats


def _controller(scheduler: Scheduler) -> AutoK | None:
    if not hasattr(scheduler, "_sdsat_auto_k"):
        config = scheduler.vllm_config
        block = resolved_block(config) if is_sdsat(config.speculative_config) else {}
        auto = scheduler.dynamic_sd_lookup is not None and block.get("auto", False)
        scheduler._sdsat_auto_k = (AutoK(scheduler.num_spec_tokens, lookup=block.get("lookup", "none") != "none")
                                   if auto else None)
    return scheduler._sdsat_auto_k


def _samples(request) -> bool:
    params = request.sampling_params
    return params is not None and params.sampling_type != SamplingType.GREEDY


def schedule(self: Scheduler, *args, **kwargs):
    output = _original_schedule(self, *args, **kwargs)
    auto = _controller(self)
    if auto is None:
        return output
    req_ids = [r for r in output.num_scheduled_tokens if not self.requests[r].is_prefill_chunk]
    num_spec = sum(len(t) for t in output.scheduled_spec_decode_tokens.values())
    counts = dict(zip(req_ids, auto.plan(req_ids, output.total_num_scheduled_tokens,
                                         output.total_num_scheduled_tokens - num_spec,
                                         [_samples(self.requests[r]) for r in req_ids])))
    setattr(output, NUM_DRAFTS, counts)
    setattr(output, LOOKUP_ONLY, auto.lookup_only)
    setattr(output, TAKES_LOOKUP, auto.takes_lookup)
    output.num_spec_tokens_to_schedule = max(counts.values(), default=0)
    if isinstance(self, AsyncScheduler):
        for req_id, k in counts.items():
            self.requests[req_id].spec_token_ids = [-1] * k
    if auto.decisions % _FORGET_EVERY == 0:
        auto.acceptance.forget(set(self.requests))
    return output


def make_spec_decoding_stats(self: Scheduler, spec_decoding_stats, num_draft_tokens: int, num_accepted_tokens: int,
                             num_invalid_spec_tokens, request_id: str):
    auto = _controller(self)
    if auto is not None and num_draft_tokens:
        request = self.requests.get(request_id)
        auto.observe_drafts(request_id, num_draft_tokens, num_accepted_tokens, request is not None and _samples(request),
                            lookup=request_id in lookup_req_ids(self))
    return _original_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                           num_invalid_spec_tokens, request_id)


def apply() -> None:
    Scheduler.schedule = schedule
    Scheduler.make_spec_decoding_stats = make_spec_decoding_stats
