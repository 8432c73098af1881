import pytest

from qkv_core.config import ServiceConfig


def test_flags_over_environment_over_defaults():
    env = {"QKVCOMM_PORT": "7000", "QKVCOMM_MODEL": "gemma3-270m", "QKVCOMM_GRACE_S": "2.5", "QKVCOMM_CODEC": "fp16"}
    cfg = ServiceConfig.from_env(env, port=None, codec="kivi-4", device="cpu")
    assert cfg.port == 7000 and cfg.grace_s == 2.5  # from the environment
    assert cfg.codec == "kivi-4" and cfg.runtime.device == "cpu"  # flags win
    assert cfg.runtime.model == "gemma3-270m" and cfg.runtime.dtype == "auto"
    assert ServiceConfig.from_env({}).port == ServiceConfig().port


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="QKVCOMM_PORT='http'"):
        ServiceConfig.from_env({"QKVCOMM_PORT": "http"})
    with pytest.raises(TypeError, match="unknown settings"):
        ServiceConfig.from_env({}, colour="blue")


def test_booleans_parse_as_words_not_as_non_empty_strings():
    assert ServiceConfig.from_env({"QKVCOMM_FACTS": "false"}).facts is False
    assert ServiceConfig.from_env({"QKVCOMM_FACTS": "1"}).facts is True
    with pytest.raises(ValueError, match="QKVCOMM_FACTS='maybe'"):
        ServiceConfig.from_env({"QKVCOMM_FACTS": "maybe"})
