"""`qkvcomm serve-receiver` and `serve-sender`: every ServiceConfig field (and the runtime and
limits groups) is a flag, made from the field itself; flags win over QKVCOMM_* variables."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from qkv_core.config import Limits, RuntimeConfig, ServiceConfig, StoreConfig, parser_for, read_config_file, settings


def register(sub: argparse._SubParsersAction) -> None:
    for role, what in (("receiver", "the ReceiverService"), ("sender", "the SenderService")):
        p = sub.add_parser(f"serve-{role}", help=f"run {what}")
        p.add_argument("--config", help="a TOML file of settings (the flags' names as keys); flags and QKVCOMM_* "
                       "variables win over it, it wins over the defaults")
        setting_flags(p, role)
        p.set_defaults(run=run, role=role)


# --help groups the flags by concern: a nested group's fields under its name, the others by what they set
GROUPS = ("network and process", "TLS and tokens", "the receiver (sender)", "handoff", "engine and answers",
          "model", "limits", "store")
_OWN = {"model": RuntimeConfig, "limits": Limits, "store": StoreConfig}
_NETWORK = {"host", "port", "metrics_port", "bulk_port", "grace_s", "stats_interval_s"}
_SECRETS = {"auth_tokens", "receiver_ca", "receiver_cert", "receiver_key", "receiver_token", "receiver_server_name",
            "receiver_insecure"}
_ENGINE = {"engine", "vllm_args", "alignments", "max_card_bytes", "performance_tokens", "max_new_tokens"}


def group_of(f: dataclasses.Field) -> str:
    for name, kind in _OWN.items():
        if f in dataclasses.fields(kind):
            return name
    if f.name in _NETWORK:
        return "network and process"
    if f.name.startswith("tls_") or f.name in _SECRETS:
        return "TLS and tokens"
    if f.name.startswith("receiver"):
        return "the receiver (sender)"
    return "engine and answers" if f.name in _ENGINE else "handoff"


def setting_flags(p: argparse.ArgumentParser, role: str) -> None:
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f, default in settings(role):
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        help_text = f"{f.metadata['help']} (default {default!r}; QKVCOMM_{f.name.upper()})"
        group = groups[group_of(f)]
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "alignments":  # repeatable; the setting holds them comma-separated
            group.add_argument(flag, dest=f.name, action="append", default=None, help=help_text + " (repeatable)")
        else:
            group.add_argument(flag, dest=f.name, type=_typed(parser_for(f, type(default))), default=None,
                               help=help_text)


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its ValueError's words become the flag's error."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) if str(e) else f"invalid value {text!r}") from None

    return typed


def config(args: argparse.Namespace) -> ServiceConfig:
    given = {f.name: getattr(args, f.name) for f, _ in settings(args.role)}
    if given.get("alignments") is not None:
        given["alignments"] = ",".join(given["alignments"])
    file = read_config_file(args.config) if getattr(args, "config", None) else None
    return ServiceConfig.from_env(role=args.role, file=file, **given)


def run(args: argparse.Namespace) -> int:
    from service_common.server import preflight  # noqa: PLC0415

    cfg = config(args)
    preflight(args.role, cfg)  # before the model loads
    if args.role == "receiver":
        from receiver_service.server import main as serve  # noqa: PLC0415 - keep `qkvcomm --help` fast
    else:
        from sender_service.server import main as serve  # noqa: PLC0415
    asyncio.run(serve(cfg))
    return 0
