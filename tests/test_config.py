"""Typed config: presets as data, YAML/JSON files, ``base:`` extension,
``--set`` overrides, and errors that name the offending key."""
from __future__ import annotations

import json

import pytest
import yaml

from models.config import (
    ConfigError,
    LLMConfig,
    ModelConfig,
    VisionConfig,
    config_from_dict,
    list_presets,
    load_config,
)


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return load_config("tiny")


def test_presets_listed():
    names = list_presets()
    assert "tiny" in names and "phi3-mini" in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["tiny", "phi3-mini"])
def test_presets_load_and_validate(name):
    cfg = load_config(name)
    assert isinstance(cfg, ModelConfig) and cfg.name == name
    assert isinstance(cfg.vision, VisionConfig) and isinstance(cfg.llm, LLMConfig)
    assert cfg.validate() is cfg


def test_preset_contents(tiny):
    assert tiny.vision.pretrained is None and tiny.vision.model_config is not None
    assert tiny.llm.random_init["hidden_size"] == 256
    assert tiny.tokenizer.build == {"vocab_size": 2048, "tool_corpus": False}
    assert tiny.speech.language == "en"
    mini = load_config("phi3-mini")
    assert mini.llm.load_in_4bit is True and mini.llm.random_init is None
    assert mini.vision.model == "ViT-L-14-336" and mini.vision.pretrained == "openai"
    assert isinstance(mini.speech.max_seconds, float)  # YAML 600 -> float field


def test_yaml_and_json_files_load_equal(tiny, tmp_path):
    data = tiny.to_dict()
    data["llm"]["lora"]["r"] = 4
    data["name"] = "from-file"
    y = tmp_path / "cfg.yaml"
    y.write_text(yaml.safe_dump(data))
    j = tmp_path / "cfg.json"
    j.write_text(json.dumps(data))
    from_yaml, from_json = load_config(y), load_config(str(j))
    assert from_yaml == from_json
    assert from_yaml.llm.lora.r == 4 and from_yaml.name == "from-file"
    assert from_yaml.vision == tiny.vision and from_yaml.speech == tiny.speech


def test_file_extends_a_preset(tiny, tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: tiny\nname: mine\nllm:\n  lora:\n    r: 8\n")
    cfg = load_config(f)
    assert cfg.llm.lora.r == 8 and cfg.name == "mine"
    expected = tiny.to_dict()
    expected["llm"]["lora"]["r"] = 8
    expected["name"] = "mine"
    assert cfg.to_dict() == expected  # every other key is the preset's


def test_file_extends_a_preset_then_overrides(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"base": "phi3-mini", "speech": {"model": "base"}}))
    cfg = load_config(f, ["llm.lora.r=2"])
    assert cfg.speech.model == "base" and cfg.llm.lora.r == 2
    assert cfg.llm.load_in_4bit is True and cfg.name == "phi3-mini"


def test_overrides_apply(tiny):
    cfg = load_config("tiny", ["llm.lora.r=8", "speech.language=null", "llm.random_init={hidden_size: 128}"])
    assert cfg.llm.lora.r == 8
    assert cfg.speech.language is None
    # mappings merge key by key: one value changes, the others stay
    assert cfg.llm.random_init["hidden_size"] == 128 and cfg.llm.random_init["num_hidden_layers"] == 2
    replaced = load_config("tiny", ["llm.random_init=null", "llm.random_init={hidden_size: 128}"])
    assert replaced.llm.random_init == {"hidden_size": 128}  # null first replaces the whole mapping
    dotted = load_config("tiny", ["llm.random_init.hidden_size=64"])
    assert dotted.llm.random_init["hidden_size"] == 64 and dotted.llm.random_init["intermediate_size"] == 688
    # untouched siblings keep the preset's values
    assert cfg.llm.lora.alpha == tiny.llm.lora.alpha
    assert cfg.llm.lora.target_modules == tiny.llm.lora.target_modules
    assert cfg.vision == tiny.vision


def test_override_value_types():
    cfg = load_config("tiny", [
        "speech.temperature=1",  # int accepted for a float field, stored as float
        "llm.lora.target_modules=[qkv_proj]",
        "llm.load_in_4bit=true",
        "speech.language='no'",  # quoted: the string, not YAML's boolean
        "tokenizer.system_prompt=a=b",  # only the first '=' splits
        "speech.beam_size=",  # empty value -> null
    ])
    assert cfg.speech.temperature == 1.0 and isinstance(cfg.speech.temperature, float)
    assert cfg.llm.lora.target_modules == ["qkv_proj"]
    assert cfg.llm.load_in_4bit is True
    assert cfg.speech.language == "no"
    assert cfg.tokenizer.system_prompt == "a=b"
    assert cfg.speech.beam_size is None


def test_overrides_apply_in_order():
    cfg = load_config("tiny", ["llm.lora.r=8", "llm.lora.r=2"])
    assert cfg.llm.lora.r == 2


def _config_error(*args) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    return str(info.value)


def test_unknown_key():
    msg = _config_error("tiny", ["vision.tokn_mode=x"])
    assert "unknown key" in msg and "vision.tokn_mode" in msg
    assert "token_mode" in msg.split("valid keys", 1)[1]  # suggests the real keys


def test_unknown_top_level_key():
    msg = _config_error("tiny", ["visoin.model=x"])
    assert "unknown key" in msg and "visoin" in msg


def test_wrong_type():
    msg = _config_error("tiny", ["llm.lora.r=abc"])
    assert "llm.lora.r" in msg and "wrong type" in msg and "'abc'" in msg


@pytest.mark.parametrize("item,key", [
    ("llm.lora.r=true", "llm.lora.r"),  # bool is not an int
    ("llm.lora.r=2.5", "llm.lora.r"),
    ("llm.lora.target_modules=qkv_proj", "llm.lora.target_modules"),
    ("speech.language=no", "speech.language"),  # unquoted YAML 1.1 'no' is False
    ("llm.lora=8", "llm.lora"),
])
def test_wrong_type_variants(item, key):
    msg = _config_error("tiny", [item])
    assert key in msg


def test_bad_choice():
    msg = _config_error("tiny", ["vision.token_mode=grid"])
    assert "vision.token_mode" in msg and "'grid'" in msg and "'patches'" in msg and "'pooled'" in msg


@pytest.mark.parametrize("item,key", [
    ("projector.kind=conv", "projector.kind"),
    ("llm.dtype=float8", "llm.dtype"),
    ("vision.patch_pool=0", "vision.patch_pool"),
    ("llm.lora.r=0", "llm.lora.r"),
    ("tokenizer.max_length=8", "tokenizer.max_length"),
])
def test_validation_errors_name_the_key(item, key):
    assert key in _config_error("tiny", [item])


def test_pooled_mode_ignores_patch_pool():
    from models.vision import vision_spec

    cfg = load_config("tiny", ["vision.token_mode=pooled"])
    assert cfg.vision.patch_pool == 2  # the preset's, irrelevant to one pooled vector
    assert vision_spec(cfg.vision)["num_tokens"] == 1
    assert "patch_pool" in _config_error("tiny", ["vision.patch_pool=0"])


def test_malformed_override():
    msg = _config_error("tiny", ["llm.lora.r"])
    assert "llm.lora.r" in msg and "key.sub=value" in msg


def test_unknown_preset():
    msg = _config_error("nosuch")
    assert "unknown preset 'nosuch'" in msg
    assert "tiny" in msg and "phi3-mini" in msg


def test_missing_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    msg = _config_error(missing)
    assert "cannot read config file" in msg and str(missing) in msg


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm: {lora: [unclosed\n")
    msg = _config_error(bad)
    assert str(bad) in msg and "not valid YAML" in msg


def test_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"llm": ')
    msg = _config_error(bad)
    assert str(bad) in msg and "not valid JSON" in msg


def test_file_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    assert "mapping" in _config_error(f)


def test_file_with_unknown_key_names_it(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("base: tiny\nspeech: {modle: small}\n")
    msg = _config_error(f)
    assert "speech.modle" in msg


def test_file_with_unknown_base(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("base: nosuch\n")
    assert "unknown preset 'nosuch'" in _config_error(f)


@pytest.mark.parametrize("name", ["tiny", "phi3-mini"])
def test_to_dict_round_trip(name):
    cfg = load_config(name, ["llm.lora.r=8", "speech.language=null"])
    data = cfg.to_dict()
    again = config_from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    # and through JSON text, as checkpoints store it
    assert config_from_dict(json.loads(cfg.to_json())) == cfg


def test_round_trip_does_not_share_state(tiny):
    data = tiny.to_dict()
    data["llm"]["random_init"]["hidden_size"] = 64
    assert tiny.llm.random_init["hidden_size"] == 256


def test_config_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict({"vision": 3})
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict([])  # type: ignore[arg-type]


def test_non_mapping_section_message_names_the_key_cleanly():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"vision": 3})
    assert str(info.value).startswith("vision must be a mapping")


@pytest.mark.parametrize("item, message", [
    ("llm.lora.r=[1", r"override 'llm.lora.r=\[1': the value '\[1' is not valid YAML"),
    ("=3", "override '=3' has no key"),
    ("a..b=3", "an empty part in key 'a..b'"),
])
def test_malformed_override_names_the_problem(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [item])
