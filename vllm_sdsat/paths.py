"""Where things live: the repository's embedded models and vllm-sdsat's one cache directory."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "examples" / "models"
EMBEDDED_MODEL = MODELS / "sdsat-tiny-code"
BASE_MODEL = MODELS / "tiny-code"
DRAFTER_MODEL = MODELS / "tiny-code-drafter"
# $VLLM_SDSAT_CACHE, else $XDG_CACHE_HOME/vllm-sdsat, else ~/.cache/vllm-sdsat: self-distillation labels,
# PARD views of checkpoints, the suffix-tree build.
CACHE_DIR = Path(os.environ.get("VLLM_SDSAT_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-sdsat").expanduser()
