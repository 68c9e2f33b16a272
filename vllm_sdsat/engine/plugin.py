"""The `vllm.general_plugins` entry point: vLLM calls `register()` once in every process it starts."""


def register() -> None:
    from vllm_sdsat.patches import apply_all

    apply_all()
