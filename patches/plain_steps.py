"""Hook: a step with no drafts to verify and none to make runs as a plain decoding step.

Written against vLLM 0.32 (`GPUModelRunner.execute_model` and `sample_tokens`,
`v1/worker/gpu_model_runner.py`).

With speculative decoding on, vLLM treats every step as speculative: it builds spec-decode metadata
and runs the rejection sampler even when no request has drafts, and the engine core asks the workers
for drafts after every step. With automatic K or a batch-size schedule, SDSAT has many steps of
width 0, and these cost 2.5 ms against 1.9 ms for a plain engine's step (batch 1, docs/performance.md).
Without async scheduling, a step that verifies no drafts and drafts none now runs vLLM's plain path:
the runner's speculative config is hidden for that step (plain sampler, no spec metadata, no draft
proposal); its output tells the engine core that there are no drafts (`patches/one_call_steps.py`), so
no call for them follows. Under async scheduling every step keeps the speculative path,
whose placeholders and valid-count hand-over the next step reads.
"""
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sdsat.patches.draft_pass import sdsat_target

_original_execute = GPUModelRunner.execute_model
_original_sample = GPUModelRunner.sample_tokens
_HIDDEN = "_sdsat_hidden_speculative_config"  # set between a plain step's execute_model and sample_tokens


def is_plain_step(runner: GPUModelRunner, scheduler_output) -> bool:
    return (not runner.use_async_scheduling and scheduler_output.num_spec_tokens_to_schedule == 0
            and not scheduler_output.scheduled_spec_decode_tokens and sdsat_target(runner) is not None)


def execute_model(self: GPUModelRunner, scheduler_output, *args, **kwargs):
    if not is_plain_step(self, scheduler_output):
        return _original_execute(self, scheduler_output, *args, **kwargs)
    spec, self.speculative_config = self.speculative_config, None
    output = None
    try:
        output = _original_execute(self, scheduler_output, *args, **kwargs)
    finally:
        if output is None:  # sample_tokens finishes the step
            setattr(self, _HIDDEN, spec)
        else:
            self.speculative_config = spec
    return output


def sample_tokens(self: GPUModelRunner, *args, **kwargs):
    spec = self.__dict__.pop(_HIDDEN, None)
    try:
        return _original_sample(self, *args, **kwargs)
    finally:
        if spec is not None:
            self.speculative_config = spec


def apply() -> None:
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
