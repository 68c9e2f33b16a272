"""Hook: a synchronous SDSAT step is one call from the engine core to the workers, not three.

Written against vLLM 0.32 (`GPUModelRunner.execute_model`, `sample_tokens`, `v1/worker/gpu_model_runner.py`;
`Scheduler.update_from_output`, `v1/core/sched/scheduler.py`; `EngineCore.step` and `post_step`,
`v1/engine/core.py`).

With synchronous scheduling (vLLM's CPU platform, and `async_scheduling=False` anywhere) the engine core
calls the workers three times a step, and each call is a round trip between processes:
- `execute_model` runs the forward and returns None, so that the engine core can compute the grammar
  bitmask of structured-output requests meanwhile;
- `sample_tokens` then samples, verifies, drafts and returns the step's output;
- after updating the requests, `take_draft_token_ids` fetches the drafts it could have had with the output.
At batch 1 the worker sat idle 0.3 ms before the second call and 0.4-0.6 ms before the third
(`vllm-sdsat profile`, docs/performance.md). In SDSAT engines a step with no structured-output request
now samples inside `execute_model` (there is no grammar to wait for; the engine core then skips its
`sample_tokens` call), and the output carries the drafts (`DraftTokenIds`, or None for "no drafts"),
which the scheduler keeps from `update_from_output` and `post_step` hands to `update_draft_token_ids`
in the same order as before, without a call. A step that made no drafts, such as a plain step of
automatic K (`patches/plain_steps.py`), needs no call for them either.
"""
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.core import EngineCore
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sdsat.patches.draft_pass import sdsat_target

DRAFTS = "sdsat_drafts"  # on a ModelRunnerOutput (from the workers), then on the Scheduler until post_step
_NOT_SENT = object()


def _synchronous_sdsat(runner: GPUModelRunner) -> bool:
    return not runner.use_async_scheduling and sdsat_target(runner) is not None


def _samples_at_once(execute_model):
    def wrapper(self: GPUModelRunner, scheduler_output, *args, **kwargs):
        output = execute_model(self, scheduler_output, *args, **kwargs)
        if (output is None and self.execute_model_state is not None and _synchronous_sdsat(self)
                and not scheduler_output.has_structured_output_requests):
            return self.sample_tokens(None)
        return output
    return wrapper


def _with_drafts(sample_tokens):
    def wrapper(self: GPUModelRunner, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        if type(output) is ModelRunnerOutput and output is not EMPTY_MODEL_RUNNER_OUTPUT and _synchronous_sdsat(self):
            setattr(output, DRAFTS, self.take_draft_token_ids())
        return output
    return wrapper


def _keeps_drafts(update_from_output):
    def wrapper(self: Scheduler, scheduler_output, model_runner_output):
        setattr(self, DRAFTS, getattr(model_runner_output, DRAFTS, _NOT_SENT))
        return update_from_output(self, scheduler_output, model_runner_output)
    return wrapper


def _takes_kept_drafts(post_step):
    def wrapper(self: EngineCore, model_executed: bool) -> None:
        drafts = self.scheduler.__dict__.pop(DRAFTS, _NOT_SENT)
        if drafts is _NOT_SENT:  # not an SDSAT engine, or async scheduling: vLLM's own path
            return post_step(self, model_executed)
        if drafts is not None and model_executed:
            self.scheduler.update_draft_token_ids(drafts)
    setattr(wrapper, DRAFTS, True)
    return wrapper


def apply() -> None:
    if getattr(EngineCore.post_step, DRAFTS, False):  # applied already in this process
        return
    # Wrapped when applied, not when imported: `patches/plain_steps.py` replaces both runner methods too.
    GPUModelRunner.execute_model = _samples_at_once(GPUModelRunner.execute_model)
    GPUModelRunner.sample_tokens = _with_drafts(GPUModelRunner.sample_tokens)
    Scheduler.update_from_output = _keeps_drafts(Scheduler.update_from_output)
    EngineCore.post_step = _takes_kept_drafts(EngineCore.post_step)
