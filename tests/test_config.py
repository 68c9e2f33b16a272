"""The `sdsat` block contract and the YAML presets."""
import importlib.util
import json

import pytest

from conftest import REPO
from vllm_sdsat.config import SdsatConfig, SdsatConfigError, load_preset


def test_defaults_and_slots():
    cfg = SdsatConfig.from_dict({"adaptive_token_ids": 32011, "max_adaptive_tokens": 5})
    assert cfg.num_speculative_tokens == 6 and cfg.adaptive_ids(3) == [32011] * 3
    distinct = SdsatConfig((2, 3, 4), 3)
    assert distinct.adaptive_ids(5) == [2, 3, 4, 4, 4]


@pytest.mark.parametrize("block, message", [
    ({"adaptive_token_ids": []}, "empty"),
    ({"adaptive_token_ids": [2], "max_adaptive_tokens": 0}, "must be >= 1"),
    ({"adaptive_token_ids": [2], "num_speculative_tokens": 1}, "must be in 2..16"),
    ({"adaptive_token_ids": [2], "num_speculative_tokens": 17}, "must be in 2..16"),
    ({"adaptive_token_ids": [2], "typo": 1}, "unknown keys"),
])
def test_bad_blocks(block, message):
    with pytest.raises(SdsatConfigError, match=message):
        SdsatConfig.from_dict(block)


@pytest.mark.parametrize("extra, message", [
    ({"lookup": "ngarm"}, "lookup must be one of 'none', 'ngram', 'suffix'"),
    ({"lookup": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "1 <= prompt_lookup_min <= prompt_lookup_max"),
    ({"lookup": "ngram", "prompt_lookup_max": 0}, "1 <= prompt_lookup_min"),
    ({"lookup": "ngram", "prompt_lookup_min": "3"}, "must be integers"),
    ({"prompt_lookup_min": 2}, "given without lookup"),
])
def test_bad_lookup_settings(extra, message):
    with pytest.raises(SdsatConfigError, match=message):
        SdsatConfig.from_dict({"adaptive_token_ids": [2], **extra})


def test_lookup_settings_round_trip():
    cfg = SdsatConfig.from_dict({"adaptive_token_ids": [2], "max_adaptive_tokens": 6, "lookup": "ngram",
                                 "prompt_lookup_min": 7})
    assert (cfg.lookup, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == ("ngram", 7, 7)  # max follows a larger min
    assert SdsatConfig.from_dict(cfg.to_dict()) == cfg
    assert set(SdsatConfig((2,), 1).to_dict()) == {"adaptive_token_ids", "max_adaptive_tokens",
                                                  "num_speculative_tokens"}  # 'none': the trainer's block


def test_round_trip_through_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(SdsatConfigError, match="no 'sdsat' block"):
        SdsatConfig.from_pretrained(tmp_path)
    SdsatConfig((5, 6), 2, 3).write_into(tmp_path)
    assert SdsatConfig.from_pretrained(tmp_path) == SdsatConfig((5, 6), 2, 3)
    assert SdsatConfig.from_pretrained(tmp_path, num_speculative_tokens=2).num_speculative_tokens == 2
    with pytest.raises(SdsatConfigError, match="outside the model's vocabulary"):
        SdsatConfig.from_pretrained(tmp_path, adaptive_token_ids=[100])


@pytest.mark.parametrize("name, model, ids, k", [
    ("codellama-7b-sdsat-l5.yaml", "CodeLlama-7b-sdsat-L5", [32011], 6),
    ("codellama-13b-sdsat-l7.yaml", "CodeLlama-13b-sdsat-L7", [32011], 8),
])
def test_public_presets(name, model, ids, k):
    got_model, spec = load_preset(REPO / "configs" / name)
    assert got_model == model and spec["adaptive_token_ids"] == ids and spec["num_speculative_tokens"] == k


def test_tiny_preset_matches_embedded_checkpoint():
    model, spec = load_preset(REPO / "configs" / "tiny-code.yaml")
    path = REPO / model
    if not (path / "config.json").is_file():
        pytest.skip(f"{model} is not built")
    block = SdsatConfig.from_pretrained(path)
    assert list(block.adaptive_token_ids) == spec["adaptive_token_ids"]
    assert block.max_adaptive_tokens == spec["max_adaptive_tokens"]


# ------------------------------------------------------------------ one rule: SdsatConfig.resolve
def test_resolve_block_overrides_and_vocab():
    block = {"adaptive_token_ids": [5, 6], "max_adaptive_tokens": 4, "num_speculative_tokens": 5}
    assert SdsatConfig.resolve(block, {}, 100) == SdsatConfig((5, 6), 4, 5)
    assert SdsatConfig.resolve(block, {"num_speculative_tokens": 3, "max_adaptive_tokens": None}, 100) \
        == SdsatConfig((5, 6), 4, 3)  # None means "not given"
    assert SdsatConfig.resolve(None, {"adaptive_token_ids": [9]}, None) == SdsatConfig((9,), 1, 2)
    with pytest.raises(SdsatConfigError, match="my/model has no 'sdsat' block"):
        SdsatConfig.resolve({"max_adaptive_tokens": 3}, {"num_speculative_tokens": 3}, 100, source="my/model")
    with pytest.raises(SdsatConfigError, match=r"\[100\] are outside the model's vocabulary \(size 100\)"):
        SdsatConfig.resolve(block, {"adaptive_token_ids": [100]}, 100)


def test_k_beyond_trained_slots_is_refused():
    assert SdsatConfig((2,), 5, 6).num_speculative_tokens == 6  # K = L + 1: every trained slot
    with pytest.raises(SdsatConfigError, match=r"K=7\) is larger than max_adaptive_tokens \(L=5\) \+ 1: adaptive "
                                               r"slots past L were never trained"):
        SdsatConfig.resolve({"adaptive_token_ids": [2], "max_adaptive_tokens": 5}, {"num_speculative_tokens": 7})


# ------------------------------------------------ start-up refusals, from the engine config alone
# EngineArgs.create_engine_config() builds the VllmConfig and returns; it starts no engine process and loads
# no weights (vllm/engine/arg_utils.py: the engine core starts in LLMEngine.from_engine_args). The model
# folders below hold a config.json and a tokenizer only, no weights: a config that loaded a model would fail.
EMBEDDED = REPO / "examples" / "models" / "sdsat-tiny-code"
SMALL = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=512)
MROPE = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}


def config_only_model(path, hf_config):
    """A model folder with config.json (with an sdsat block), the embedded tokenizer and no weights."""
    import shutil
    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / name, path / name)
    hf_config.sdsat = {"adaptive_token_ids": [2, 3], "max_adaptive_tokens": 3}
    hf_config.save_pretrained(path)
    return path


def engine_config(model, spec=None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=str(model), speculative_config=spec or {"method": "sdsat"}, max_model_len=256,
                      dtype="float32", **kwargs).create_engine_config()


def hf_config(kind):
    import transformers as T
    return {
        "dense": lambda: T.LlamaConfig(architectures=["LlamaForCausalLM"], **SMALL),
        "moe": lambda: T.MixtralConfig(architectures=["MixtralForCausalLM"], num_local_experts=4,
                                       num_experts_per_tok=2, **SMALL),
        "sliding+full": lambda: T.Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], head_dim=32, sliding_window=64,
                                                   layer_types=["sliding_attention", "full_attention"], **SMALL),
        "conv+attention": lambda: T.Lfm2Config(architectures=["Lfm2ForCausalLM"],
                                               layer_types=["conv", "full_attention"], **SMALL),
        "mamba": lambda: T.MambaConfig(architectures=["MambaForCausalLM"], vocab_size=4096, hidden_size=64,
                                       num_hidden_layers=2),
        "mrope": lambda: T.LlamaConfig(architectures=["LlamaForCausalLM"], rope_parameters=MROPE, **SMALL),
    }[kind]()


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@needs_vllm
def test_supported_configs_start(tmp_path):
    config = engine_config(EMBEDDED)
    assert config.speculative_config.num_speculative_tokens == 7
    assert config.model_config.hf_config.sdsat["max_adaptive_tokens"] == 6
    assert engine_config(EMBEDDED, tensor_parallel_size=2).parallel_config.world_size == 2
    dense = config_only_model(tmp_path / "dense", hf_config("dense"))
    assert engine_config(dense, data_parallel_size=2).parallel_config.data_parallel_size == 2  # DP is fine when dense
    moe = config_only_model(tmp_path / "moe", hf_config("moe"))
    assert engine_config(moe).model_config.is_moe  # MoE is fine without DP


@pytest.mark.parametrize("kind, kwargs, message", [
    ("dense", {"enable_lora": True}, r"LoRA adapters \(enable_lora\) are not supported"),
    ("dense", {"pipeline_parallel_size": 2}, "pipeline parallelism is not supported"),
    ("dense", {"prefill_context_parallel_size": 2}, r"context parallelism \(prefill_context_parallel_size=2\)"),
    ("dense", {"decode_context_parallel_size": 2, "tensor_parallel_size": 2},
     r"context parallelism \(decode_context_parallel_size=2\)"),
    ("moe", {"data_parallel_size": 2}, r"data parallelism \(data_parallel_size=2\) with an MoE model"),
    ("sliding+full", {}, r"hybrid attention \(layer_types \['full_attention', 'sliding_attention'\]"),
    ("conv+attention", {}, "hybrid or state-space models"),
    ("mamba", {}, "hybrid or state-space models"),
    ("mrope", {}, "M-RoPE models"),
    ("dense", {"spec": {"method": "sdsat", "num_speculative_tokens": 5}},
     r"num_speculative_tokens \(K=5\) is larger than max_adaptive_tokens \(L=3\) \+ 1"),
])
@needs_vllm
def test_unsupported_setups_are_refused_at_startup(tmp_path, kind, kwargs, message):
    model = config_only_model(tmp_path / kind, hf_config(kind))
    with pytest.raises(SdsatConfigError, match="^sdsat: " + message):
        engine_config(model, **kwargs)


@needs_vllm
def test_real_mrope_config_is_detected():
    """The M-RoPE check is vLLM's own uses_mrope, which sees a real Qwen2-VL config (that model cannot build an
    engine config here: its image processor needs torchvision)."""
    import transformers as T
    from vllm.transformers_utils.config import uses_mrope
    assert uses_mrope(T.Qwen2VLConfig(text_config=dict(SMALL, rope_parameters=MROPE)))
    assert not uses_mrope(T.Qwen2VLConfig(text_config=dict(SMALL)))


def test_k_auto_is_the_default_and_a_fixed_k_stays_fixed(tmp_path):
    model = config_only_model(tmp_path / "m", hf_config("dense"))

    def resolved(spec):
        config = engine_config(model, spec)
        return (config.model_config.hf_config.sdsat.get("auto", False),
                config.speculative_config.num_speculative_tokens_per_batch_size)

    assert resolved({"method": "sdsat"}) == (True, [(1, 1 << 20, 4)])  # K: L + 1 = 4 at every batch size
    assert resolved({"method": "sdsat", "num_speculative_tokens": "auto"}) == (True, [(1, 1 << 20, 4)])
    assert resolved({"method": "sdsat", "num_speculative_tokens": 3}) == (False, None)
    assert resolved({"method": "sdsat", "num_speculative_tokens": 3,
                     "num_speculative_tokens_per_batch_size": [(1, 8, 2)]}) == (False, [(1, 8, 2)])
    with pytest.raises(SdsatConfigError, match="auto"):
        engine_config(model, {"method": "sdsat", "num_speculative_tokens": "auto",
                              "num_speculative_tokens_per_batch_size": [(1, 8, 2)]})
    with pytest.raises(SdsatConfigError, match="integer or 'auto'"):
        SdsatConfig.from_dict({"adaptive_token_ids": [2], "num_speculative_tokens": "seven"})
