"""Hook: `{"method": "sdsat"}` / `{"model": "sdsat"}` in a speculative config.

Written against vLLM 0.32 (`EngineArgs.create_speculative_config`, `engine/arg_utils.py`).

`SpeculativeConfig.method` is a pydantic `Literal`, so "sdsat" cannot reach it. We translate before
validation: SDSAT runs as vLLM's `custom_class` method with our proposer class, which gives it what
SDSAT needs and nothing more: no draft model config of its own, no draft KV cache, the V1 model
runner on GPU. The resolved `sdsat` block (checkpoint block + user overrides) is stored on the
target's hf_config, which travels with the VllmConfig to every worker.
"""
from vllm.engine.arg_utils import EngineArgs

from vllm_sdsat.config import SdsatConfig, SdsatConfigError

PROPOSER_PATH = "vllm_sdsat.engine.proposer.SdsatProposer"
SDSAT_KEYS = ("adaptive_token_ids", "max_adaptive_tokens")
_original = EngineArgs.create_speculative_config


def is_sdsat(speculative_config) -> bool:
    """True for a resolved SpeculativeConfig (or None) that runs SDSAT."""
    return speculative_config is not None and speculative_config.model == PROPOSER_PATH


def _requested(args: EngineArgs) -> bool:
    spec = args.speculative_config or {}
    return "sdsat" in (spec.get("method"), spec.get("model"), args.spec_method, args.spec_model)


def resolve(spec: dict, target_model_config, target_parallel_config) -> tuple[dict, SdsatConfig]:
    """The custom_class speculative config and the SDSAT settings for a user's sdsat request."""
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    method, model = spec.pop("method", None), spec.pop("model", None)
    if method not in (None, "sdsat") or model not in (None, "sdsat"):
        raise SdsatConfigError(f"sdsat: conflicting speculative config method={method!r} model={model!r}; "
                               "SDSAT drafts with the target model itself, so give no draft model")
    if target_parallel_config.pipeline_parallel_size > 1:
        raise SdsatConfigError("sdsat: pipeline parallelism is not supported (the draft pass needs every layer "
                               "on one rank); use tensor parallelism instead")
    hf_config = target_model_config.hf_config
    block = dict(getattr(hf_config, "sdsat", None) or {})
    overrides = {k: spec.pop(k) for k in (*SDSAT_KEYS, "num_speculative_tokens") if spec.get(k) is not None}
    block.update(overrides)
    if "adaptive_token_ids" not in block:
        raise SdsatConfigError(
            f"sdsat: {target_model_config.model} has no 'sdsat' block in config.json and the speculative "
            "config gives no adaptive_token_ids. Fine-tune it with `vllm-sdsat train`, or pass "
            '{"method": "sdsat", "adaptive_token_ids": [...]}.')
    cfg = SdsatConfig.from_dict(block).check_vocab(target_model_config.get_vocab_size())
    hf_config.sdsat = cfg.to_dict()
    spec.update(method="custom_class", model=PROPOSER_PATH, num_speculative_tokens=cfg.num_speculative_tokens)
    return spec, cfg


def create_speculative_config(self: EngineArgs, target_model_config, target_parallel_config):
    if _requested(self):
        spec = dict(self.speculative_config or {})
        for key, value in (("method", self.spec_method), ("model", self.spec_model),
                           ("num_speculative_tokens", self.spec_tokens)):
            if value is not None:
                spec.setdefault(key, value)
        self.spec_method = self.spec_model = self.spec_tokens = None
        self.speculative_config, _ = resolve(spec, target_model_config, target_parallel_config)
    return _original(self, target_model_config, target_parallel_config)


def apply() -> None:
    EngineArgs.create_speculative_config = create_speculative_config
