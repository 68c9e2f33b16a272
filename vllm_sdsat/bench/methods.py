"""The methods a benchmark run compares, and the engine spec (speculative_config) of each; checked before
any engine starts."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vllm_sdsat.bench.suffix import suffix_status
from vllm_sdsat.config import SdsatConfig, SdsatConfigError
from vllm_sdsat.paths import CACHE_DIR, DRAFTER_MODEL

METHODS = ("none", "sdsat", "hybrid", "ngram", "suffix", "draft_model", "pard")
HYBRID = {"lookup": "ngram"}  # hybrid: sdsat with lookup drafts (vllm_sdsat/engine/lookup.py), same K values

NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
NOT_RUNNABLE = {
    "eagle": "needs an EAGLE head trained for this target model; none exists for it",
    "eagle3": "needs an EAGLE-3 head trained for this target model; none exists for it",
    "medusa": "needs Medusa heads trained for this target model; none exist for it",
    "mlp_speculator": "needs an MLP speculator trained for this target model; none exists for it",
    "mtp": "needs the model's own multi-token-prediction layers (DeepSeek/Qwen3-Next/GLM/...); Llama has none",
    "dflash": "needs a trained DFlash block-diffusion drafter for this target model",
    "dspark": "needs a trained DSpark drafter for this target model",
    "ngram_gpu": "the GPU n-gram kernel; this benchmark runs n-gram through `ngram`, which works on every device",
    "extract_hidden_states": "not a drafter (it exports hidden states for training EAGLE heads)",
    "custom_class": "a hook for user-written drafters; SDSAT itself runs through it",
}


@dataclass
class EngineSpec:
    """One engine of the run: a method at one K, with the speculative_config handed to vllm.LLM."""
    method: str
    k: int | None
    speculative_config: dict | None
    label: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.label:
            self.label = self.method if self.k is None else f"{self.method} K={self.k}"


def parse_list(text: str | None, kind=str, what: str = "list") -> list:
    if text is None:
        return []
    try:
        return [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: expected comma-separated {kind.__name__} values") from None


def int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def parse_methods(text: str) -> list[str]:
    methods = []
    for m in parse_list(text, str, "--methods"):
        m = m.lower().replace("-", "_")
        m = {"plain": "none", "pard": "pard", "draft": "draft_model", "sdsat+ngram": "hybrid"}.get(m, m)
        if m in NOT_RUNNABLE:
            raise ValueError(f"method {m!r} cannot run here: {NOT_RUNNABLE[m]}. Choose from {', '.join(METHODS)}")
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m not in methods:
            methods.append(m)
    if not methods:
        raise ValueError("no methods given; choose from " + ", ".join(METHODS))
    return methods


def pard_copy(model: str | Path, mask_token_id: int, cache_dir: Path = CACHE_DIR) -> Path:
    """A PARD view of `model` under cache_dir: every file symlinked, except config.json, which gains
    "pard_token": mask_token_id (read by vLLM's parallel drafting) and loses the sdsat block."""
    src = Path(model).resolve()
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:10]
    dst = cache_dir / "pard" / f"{src.name}-{digest}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("sdsat", None)
    cfg["pard_token"] = int(mask_token_id)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def build_specs(methods: list[str], model: str, ks: list[int] | None = None, baseline_ks: list[int] | None = None,
                drafter: str | None = None, adaptive_token_ids: list[int] | None = None,
                pard_token: int | None = None, cache_dir: Path = CACHE_DIR,
                suffix_global_cache: bool = False) -> tuple[list[EngineSpec], dict]:
    """Engine specs for the run, in order (none first), and {method: reason} for methods skipped.

    Raises SdsatConfigError / ValueError / FileNotFoundError for bad input; starts no engine.
    """
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model} (expected a Hugging Face folder with config.json)")
    overrides = {"adaptive_token_ids": adaptive_token_ids} if adaptive_token_ids else {}
    sdsat_cfg = None
    self_drafting = "sdsat" in methods or "hybrid" in methods
    if self_drafting or ("pard" in methods and pard_token is None):
        try:
            sdsat_cfg = SdsatConfig.from_pretrained(model, **overrides)
        except SdsatConfigError as e:
            if self_drafting:
                raise
            raise SdsatConfigError(f"pard needs a mask token: {e} Or give --pard-token.") from None
    default_k = sdsat_cfg.num_speculative_tokens if sdsat_cfg else 4
    ks = ks or (list(range(2, sdsat_cfg.max_adaptive_tokens + 2)) if sdsat_cfg else [default_k])
    baseline_ks = baseline_ks or [default_k]
    for k in (*(k for k in ks if k != "auto"), *baseline_ks):
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
    specs, skipped = [], {}
    for method in sorted(methods, key=METHODS.index):
        if method == "none":
            specs.append(EngineSpec("none", None, None))
        elif method in ("sdsat", "hybrid"):
            extra = {**overrides, **(HYBRID if method == "hybrid" else {})}
            for k in ks:
                if k == "auto":  # K per request and step, at most the checkpoint's: plotted as dynamic
                    spec = {"method": "sdsat", "num_speculative_tokens": "auto", **extra}
                    specs.append(EngineSpec(method, None, spec, label=f"{method} K=auto",
                                            notes={"sdsat": sdsat_cfg.to_dict()}))
                    continue
                cfg = SdsatConfig.from_pretrained(model, num_speculative_tokens=k, **extra)
                spec = {"method": "sdsat", "num_speculative_tokens": cfg.num_speculative_tokens, **extra}
                specs.append(EngineSpec(method, k, spec, notes={"sdsat": cfg.to_dict()}))
        elif method == "ngram":
            specs += [EngineSpec("ngram", k, {"method": "ngram", "num_speculative_tokens": k, **NGRAM_LOOKUP})
                      for k in baseline_ks]
        elif method == "suffix":
            ok, how = suffix_status(cache_dir)
            if ok:  # K is dynamic per step, up to the tree depth (vLLM's default 24)
                # By default only per-prompt trees: the global tree caches past responses, and this benchmark
                # re-runs the same prompts (warm-up, repeats, every batch size), which it would then replay.
                spec = {"method": "suffix"} if suffix_global_cache else {
                    "method": "suffix", "suffix_decoding_max_cached_requests": 0}
                specs.append(EngineSpec("suffix", None, spec, label="suffix (global cache)" if suffix_global_cache
                                        else "suffix", notes={"arctic_inference": how}))
            else:
                skipped["suffix"] = how
        elif method == "draft_model":
            drafter = drafter or str(DRAFTER_MODEL)
            if not (Path(drafter) / "config.json").is_file():
                raise FileNotFoundError(f"draft_model: no drafter at {drafter} (give --drafter PATH, a small model "
                                        "with the target's tokenizer)")
            specs += [EngineSpec("draft_model", k, {"method": "draft_model", "model": str(drafter),
                                                    "num_speculative_tokens": k}, notes={"drafter": str(drafter)})
                      for k in baseline_ks]
        elif method == "pard":
            mask = pard_token if pard_token is not None else sdsat_cfg.adaptive_id(0)
            copy = pard_copy(model, mask, cache_dir)
            specs += [EngineSpec("pard", k, {"method": "draft_model", "model": str(copy), "parallel_drafting": True,
                                             "num_speculative_tokens": k}, notes={"pard_token": mask})
                      for k in baseline_ks]
    return specs, skipped
