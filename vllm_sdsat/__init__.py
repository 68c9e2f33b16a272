"""vllm-sdsat: SDSAT self-drafting speculative decoding for vLLM, plus its trainer and reference decoder."""
from vllm_sdsat.config import SdsatConfig, SdsatConfigError

__version__ = "0.1.0"
__all__ = ["SdsatConfig", "SdsatConfigError", "__version__"]
