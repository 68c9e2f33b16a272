"""The `sdsat` block contract and the YAML presets."""
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
