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


def test_every_setting_is_a_flag_of_its_service_and_flags_win(monkeypatch):
    from qkv_core.config import settings
    from qkvcomm_cli.commands.serve import config
    from qkvcomm_cli.main import parser

    monkeypatch.setenv("QKVCOMM_GRACE_S", "9")
    monkeypatch.setenv("QKVCOMM_MAX_INTAKES", "5")
    for role in ("receiver", "sender"):
        args = parser().parse_args([f"serve-{role}"])
        assert {f.name for f, _ in settings(role)} <= set(vars(args)), role  # a flag for every setting
    args = parser().parse_args(["serve-receiver", "--grace-s", "2", "--alignment", "a.json", "--alignment", "b.json",
                                "--store-bytes", "1000", "--device", "cpu"])
    cfg = config(args)
    assert cfg.grace_s == 2.0 and cfg.limits.max_intakes == 5  # the flag over the variable; the variable alone
    assert cfg.alignments == "a.json,b.json" and cfg.store.store_bytes == 1000 and cfg.runtime.device == "cpu"
    assert (cfg.port, cfg.metrics_port) == (50061, 9461)
    sender = config(parser().parse_args(["serve-sender", "--facts", "--layers", "0.5", "--receiver-timeout-s", "3"]))
    assert (sender.port, sender.metrics_port) == (50062, 9462)  # each service has its own default ports
    assert sender.facts is True and sender.layer_ratio == 0.5 and sender.limits.receiver_timeout_s == 3.0
    assert "--max-intakes" not in parser().format_help()
    assert not hasattr(parser().parse_args(["serve-sender"]), "max_intakes")
