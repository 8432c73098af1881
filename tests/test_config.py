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


def test_a_config_file_sits_between_the_defaults_and_the_environment(tmp_path, monkeypatch):
    from qkv_core.config import read_config_file
    from qkvcomm_cli.commands.serve import config
    from qkvcomm_cli.main import parser

    path = tmp_path / "receiver.toml"
    path.write_text('port = 7100\nstore-bytes = "2Gi"\nfacts = true\ngrace_s = "1m"\n'
                    'alignments = ["a.json", "b.json"]\nmetrics_port = 9600\n')
    file = read_config_file(path)
    cfg = ServiceConfig.from_env({"QKVCOMM_METRICS_PORT": "9700"}, file=file, grace_s=3.0)
    assert cfg.port == 7100 and cfg.store.store_bytes == 2 << 30 and cfg.facts  # from the file
    assert cfg.grace_s == 3.0  # a flag wins
    assert cfg.metrics_port == 9700 and cfg.alignments == "a.json,b.json"  # the environment wins
    assert ServiceConfig.from_env({}, file=file).codec == ServiceConfig().codec  # unset: the default
    monkeypatch.delenv("QKVCOMM_PORT", raising=False)
    cli = config(parser().parse_args(["serve-receiver", "--config", str(path), "--port", "7200"]))
    assert cli.port == 7200 and cli.store.store_bytes == 2 << 30


@pytest.mark.parametrize(("text", "match"), [
    ("colour = 'blue'", "'colour' is not a setting"),
    ("port = 'http'", "port = 'http'"),
    ("[port]\nnumber = 1", "'port' is a table"),
    ("port = ", "not TOML"),
])
def test_a_bad_config_file_is_named_with_its_key(tmp_path, text, match):
    from qkv_core.config import read_config_file

    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=match) as refused:
        read_config_file(path)
    assert str(path) in str(refused.value)


def test_the_servers_help_groups_their_flags_by_concern(capsys):
    from qkvcomm_cli.main import parser

    text = {}
    for role in ("sender", "receiver"):
        with pytest.raises(SystemExit):
            parser().parse_args([f"serve-{role}", "--help"])
        text[role] = capsys.readouterr().out
    for heading in ("network and process:", "TLS and tokens:", "the receiver (sender):", "handoff:", "model:"):
        assert f"\n{heading}\n" in text["sender"], heading
    receiver = text["receiver"]
    assert "\nstore:\n" in receiver and "\nstore:\n" not in text["sender"]
    assert receiver.index("\nstore:\n") < receiver.index("\n  --store-bytes")
    assert (receiver.index("\nnetwork and process:\n") < receiver.index("\n  --bulk-port")
            < receiver.index("\nTLS and tokens:\n"))
