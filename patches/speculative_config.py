"""Hook: `{"method": "sdsat"}` / `{"model": "sdsat"}` in a speculative config.

Written against vLLM 0.32 (`EngineArgs.create_speculative_config`, `engine/arg_utils.py`).

`SpeculativeConfig.method` is a pydantic `Literal`, so "sdsat" cannot reach it. We translate before
validation: SDSAT runs as vLLM's `custom_class` method with our proposer class, which gives it what
SDSAT needs and nothing more: no draft model config of its own, no draft KV cache, the V1 model
runner on GPU. The resolved `sdsat` block (checkpoint block + user overrides) is stored on the
target's hf_config, which travels with the VllmConfig to every worker.

`resolve` runs inside `EngineArgs.create_engine_config` (which calls `create_speculative_config` after
building the model and parallel configs and before the engine starts or any weights load), so what the
draft pass cannot do is refused there with one SdsatConfigError line; see `unsupported`. LoRA is read
from the EngineArgs (`enable_lora`), since its LoRAConfig is built after the speculative config.

`lookup` (hybrid drafting, `engine/lookup.py`) and vLLM's `prompt_lookup_min`/`prompt_lookup_max` go
into the `sdsat` block too (vLLM zeroes the latter for custom_class). Lookup drafts read each
request's tokens on the host after bookkeeping, which async scheduling leaves a step behind, so a
lookup with `async_scheduling=True` is refused here and `patches/async_scheduling.py` leaves it off.
"""
from vllm.engine.arg_utils import EngineArgs

from vllm_sdsat.config import LOOKUP_KEYS, SdsatConfig, SdsatConfigError

PROPOSER_PATH = "vllm_sdsat.engine.proposer.SdsatProposer"
SDSAT_KEYS = ("adaptive_token_ids", "max_adaptive_tokens")
_ANY_BATCH = 1 << 20  # a batch-size range end past any max_num_seqs (vLLM clips it)
_original = EngineArgs.create_speculative_config


def is_sdsat(speculative_config) -> bool:
    """True for a resolved SpeculativeConfig (or None) that runs SDSAT."""
    return speculative_config is not None and speculative_config.model == PROPOSER_PATH


def resolved_block(vllm_config) -> dict:
    """The SDSAT block `resolve` wrote into the target's hf_config ({} for other engines)."""
    return getattr(vllm_config.model_config.hf_config, "sdsat", None) or {}


def _requested(args: EngineArgs) -> bool:
    spec = args.speculative_config or {}
    return "sdsat" in (spec.get("method"), spec.get("model"), args.spec_method, args.spec_model)


def unsupported(model_config, parallel_config, enable_lora: bool = False) -> str | None:
    """Why the draft pass cannot serve this engine configuration, or None. Read from the configs alone
    (nothing is loaded), so the engine refuses before any model loads."""
    if parallel_config.pipeline_parallel_size > 1:
        return ("pipeline parallelism is not supported (the draft pass needs every layer on one rank); "
                "use tensor parallelism instead")
    cp = {"decode": parallel_config.decode_context_parallel_size,
          "prefill": parallel_config.prefill_context_parallel_size}
    if max(cp.values()) > 1:
        name = ", ".join(f"{k}_context_parallel_size={v}" for k, v in cp.items() if v > 1)
        return (f"context parallelism ({name}) is not supported (the draft pass writes its KV as one rank "
                "would); use tensor parallelism instead")
    if parallel_config.data_parallel_size > 1 and model_config.is_moe:
        return (f"data parallelism (data_parallel_size={parallel_config.data_parallel_size}) with an MoE model "
                "is not supported (idle DP ranks would not join the draft pass's expert collectives and the "
                "engine would hang); use tensor parallelism, or data parallelism with a dense model")
    if enable_lora:
        return ("LoRA adapters (enable_lora) are not supported (the draft pass runs without the request's "
                "adapter, so its drafts would come from the base model)")
    hf_text = model_config.hf_text_config
    layer_types = sorted(set(getattr(hf_text, "layer_types", None) or []))
    if model_config.is_hybrid or model_config.has_inner_state or model_config.is_attention_free:
        return ("hybrid or state-space models (mamba / linear-attention layers) are not supported (their "
                "recurrent state cannot be rolled back after the draft pass)")
    if len(layer_types) > 1:
        return (f"hybrid attention (layer_types {layer_types}: several KV cache groups) is not supported; "
                "the draft pass handles one group of full-attention layers")
    if getattr(hf_text, "attention_chunk_size", None):
        return ("chunked local attention (attention_chunk_size) is not supported (several KV cache groups)")
    if model_config.model_arch_config.per_layer_overrides is not None:
        return ("models whose layers differ in KV shape are not supported (several KV cache groups)")
    if model_config.is_encoder_decoder:
        return "encoder-decoder models are not supported (cross-attention is a second KV cache group)"
    if model_config.uses_mrope:
        return ("M-RoPE models (rope_parameters with mrope_section) are not supported (the draft pass gives "
                "adaptive tokens 1-D positions)")
    return None


def resolve(spec: dict, target_model_config, target_parallel_config, enable_lora: bool = False
            ) -> tuple[dict, SdsatConfig]:
    """The custom_class speculative config and the SDSAT settings for a user's sdsat request."""
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    method, model = spec.pop("method", None), spec.pop("model", None)
    if method not in (None, "sdsat") or model not in (None, "sdsat"):
        raise SdsatConfigError(f"sdsat: conflicting speculative config method={method!r} model={model!r}; "
                               "SDSAT drafts with the target model itself, so give no draft model")
    why = unsupported(target_model_config, target_parallel_config, enable_lora)
    if why:
        raise SdsatConfigError(f"sdsat: {why}")
    hf_config = target_model_config.hf_config
    overrides = {k: spec.pop(k) for k in (*SDSAT_KEYS, *LOOKUP_KEYS, "num_speculative_tokens") if k in spec}
    # K "auto" is the default, unless the user gives a K or vLLM's batch-size schedule of K.
    schedule = spec.get("num_speculative_tokens_per_batch_size")
    if overrides.get("num_speculative_tokens") is None and schedule is None:
        overrides["num_speculative_tokens"] = "auto"
    if overrides.get("num_speculative_tokens") == "auto" and schedule is not None:
        raise SdsatConfigError("sdsat: num_speculative_tokens 'auto' chooses K per step itself; give it no "
                               "num_speculative_tokens_per_batch_size (or give a fixed K with the schedule)")
    cfg = SdsatConfig.resolve(getattr(hf_config, "sdsat", None), overrides, target_model_config.get_vocab_size(),
                              source=str(target_model_config.model))
    if cfg.lookup == "suffix":
        raise SdsatConfigError(f"sdsat: {suffix_refusal()}")
    hf_config.sdsat = cfg.to_dict()
    if cfg.auto:  # vLLM's dynamic-K mode, with K at every batch size; patches/auto_k.py picks each step's K
        spec["num_speculative_tokens_per_batch_size"] = [(1, _ANY_BATCH, cfg.num_speculative_tokens)]
    spec.update(method="custom_class", model=PROPOSER_PATH, num_speculative_tokens=cfg.num_speculative_tokens)
    return spec, cfg


def suffix_refusal() -> str:
    """Why lookup 'suffix' cannot run: Arctic Inference's suffix tree is missing, or (when present) hybrid
    drafting with it is not built yet."""
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError as e:
        return (f"lookup 'suffix' needs Arctic Inference's suffix tree, which is not importable here ({e}); "
                "build it with `vllm-sdsat bench --build-suffix`, or use lookup 'ngram'")
    return "lookup 'suffix' is not implemented yet (Arctic Inference is importable); use lookup 'ngram'"


def create_speculative_config(self: EngineArgs, target_model_config, target_parallel_config):
    if _requested(self):
        spec = dict(self.speculative_config or {})
        for key, value in (("method", self.spec_method), ("model", self.spec_model),
                           ("num_speculative_tokens", self.spec_tokens)):
            if value is not None:
                spec.setdefault(key, value)
        self.spec_method = self.spec_model = self.spec_tokens = None
        self.speculative_config, cfg = resolve(spec, target_model_config, target_parallel_config,
                                                enable_lora=bool(self.enable_lora))
        if cfg.lookup != "none" and self.async_scheduling is True:
            raise SdsatConfigError(f"sdsat: lookup {cfg.lookup!r} reads each request's tokens on the host after the "
                                   "step, which async scheduling leaves a step behind; use async_scheduling=False "
                                   "(or leave it unset), or lookup 'none'")
    return _original(self, target_model_config, target_parallel_config)


def apply() -> None:
    EngineArgs.create_speculative_config = create_speculative_config
