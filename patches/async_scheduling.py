"""Hook: async scheduling stays on for SDSAT.

Written against vLLM 0.32 (the async-scheduling gate in `VllmConfig.__post_init__`, `config/vllm.py`,
and `CpuPlatform.check_and_update_config`, `platforms/cpu.py`).

With async scheduling the engine schedules step N+1 while step N runs. vLLM allows it only for
drafters on its on-device draft path (EAGLE/MTP, draft model, GPU n-gram, DSpark, DFlash): for any
other method `async_scheduling=None` becomes False and an explicit True raises. SDSAT runs as
`custom_class` but drafts on the device like a draft model (`patches/draft_pass.py`), so while an
SDSAT config is built the gate's list of on-device methods includes `custom_class`. The gate's other
conditions still apply, and `async_scheduling=False` still turns it off. With a `lookup` (hybrid
drafting) SDSAT drafts partly on the host after bookkeeping, so vLLM's gate applies unchanged (off).

The CPU platform then turns async scheduling off for every model ("not required on CPU"), and by
default SDSAT follows it: measured at batch 1 on 2 cores, async scheduling makes SDSAT slower there
(103 vs 111 tok/s). An explicit `async_scheduling=True` is kept for SDSAT on CPU (the CPU worker runs
vLLM's async machinery with no-op streams and events), which is how the tests run the async path.
"""
from typing import Literal, get_args

from vllm.config import VllmConfig
from vllm.config import vllm as vllm_config_module
from vllm.platforms import current_platform

from vllm_sdsat.patches.speculative_config import is_sdsat, resolved_block

_original_post_init = VllmConfig.__post_init__
_ON_DEVICE_METHODS = vllm_config_module.NgramGPUTypes  # one of the two method lists the gate reads
_explicitly_on = False  # while an SDSAT config is built: did the user ask for async scheduling?


def __post_init__(self: VllmConfig) -> None:
    global _explicitly_on
    if not is_sdsat(self.speculative_config) or resolved_block(self).get("lookup", "none") != "none":  # lookup drafts are host-side, like ngram's
        return _original_post_init(self)
    _explicitly_on = self.scheduler_config.async_scheduling is True
    vllm_config_module.NgramGPUTypes = Literal[(*get_args(_ON_DEVICE_METHODS), "custom_class")]
    try:
        return _original_post_init(self)
    finally:
        vllm_config_module.NgramGPUTypes = _ON_DEVICE_METHODS
        _explicitly_on = False


def apply() -> None:
    VllmConfig.__post_init__ = __post_init__
    if current_platform.is_cpu():
        from vllm.platforms.cpu import CpuPlatform

        original = CpuPlatform.check_and_update_config.__func__

        def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
            original(cls, vllm_config)
            if _explicitly_on and is_sdsat(vllm_config.speculative_config):
                vllm_config.scheduler_config.async_scheduling = True

        CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
