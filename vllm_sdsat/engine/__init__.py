"""The vLLM side of SDSAT: the self-drafting proposer and the plugin entry point. The hooks into vLLM's
internals that it relies on live in `patches/` (installed as `vllm_sdsat.patches`)."""
