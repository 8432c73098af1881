"""Configuration: one dataclass per concern, filled from defaults, then environment, then flags."""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qkv_core.errors import LimitExceeded

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CODEC = "int8"
AUTO_CODECS = "text,fp16,kivi-8,kivi-4,kivi-3,budget-3,kivi-2"
MAX_QUALITY_LOSS = 0.1  # nats of predicted next-token KL: kivi-4, budget-3 in; kivi-3, kivi-2 out (docs/codecs.md)
# The best layer selection measured (docs/results.md: SQuAD and HotpotQA at ratios 0.3, 0.5, 0.7);
# KVComm's own score, "combined", was the worst there.
LAYER_METHOD = "loo"
MAX_CHUNK_BYTES = 1 << 20  # one card chunk's data, and the gRPC message ceiling it implies


def setting(default: Any, help: str, role: str = "", flag: str = "", secret: bool = False) -> Any:  # noqa: A002
    """A configuration field with what the CLI needs to make its flag: help, the service it
    belongs to ("" both, "sender", "receiver"), and a flag name when it is not --field-name.
    A `secret` never appears in the config's repr (nor, so, in a log line)."""
    return field(default=default, repr=not secret, metadata={"help": help, "role": role, "flag": flag})


@dataclass(frozen=True)
class RuntimeConfig:
    """Which model runs where."""

    model: str = setting(DEFAULT_MODEL, "smollm2-135m, gemma3-270m, a Hugging Face id (org/model), "
                         "a Hugging Face directory or a .gguf file")
    revision: str = setting("", "Hugging Face id: the commit, branch or tag to load (\"\" = main)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a service. Past a limit a call is refused before any work,
    with a status naming the limit and its variable (QKVCOMM_<FIELD>)."""

    max_context_tokens: int = setting(32768, "a context (Ask/Share, PushText) or a card's context_tokens")
    max_query_tokens: int = setting(2048, "a question with the card's fact summary", "receiver")
    max_new_tokens_limit: int = setting(1024, "the most tokens one request may ask to generate", "receiver")
    max_fact_summary_bytes: int = setting(8192, "a card's fact summary, in bytes", "receiver")
    max_intakes: int = setting(8, "cards arriving at once", "receiver")
    max_inflight_bytes: int = setting(1 << 30, "decoded bytes of all cards arriving at once", "receiver")
    idle_timeout_s: float = setting(30.0, "a card stream that sends nothing this long is dropped", "receiver")
    intake_timeout_s: float = setting(600.0, "a card stream not complete this long after it began is dropped "
                                      "(however often it sends)", "receiver")
    receiver_timeout_s: float = setting(120.0, "deadline of each call to the receiver (or the client's, if sooner)",
                                        "sender")

    def check(self, limit: str, value: int | float, what: str) -> None:
        """LimitExceeded unless value <= the limit named `limit`."""
        allowed = getattr(self, limit)
        if value > allowed:
            raise LimitExceeded(f"{what} is {value:,}; the limit is {limit}={allowed:,} (QKVCOMM_{limit.upper()})",
                                {"limit": limit, "value": str(value), "allowed": str(allowed)})


@dataclass(frozen=True)
class StoreConfig:
    """The receiver's card store (qkv_core.store): compact cards in memory, their decoded caches in
    a hot tier, and optionally a disk tier, a Redis tier shared by receivers, encryption at rest."""

    store_bytes: int = setting(2 << 30, "memory tier: cards as received (compact), in bytes", "receiver")
    hot_bytes: int = setting(1 << 30, "hot tier: decoded caches of recently used cards, in bytes", "receiver")
    store_high_water: float = setting(0.8, "memory tier: eviction starts above this share of store_bytes", "receiver")
    store_low_water: float = setting(0.6, "memory tier: eviction frees down to this share", "receiver")
    store_dir: str = setting("", "disk tier: a directory; accepted cards are written there and served after a restart",
                             "receiver")
    store_disk_bytes: int = setting(20 << 30, "disk tier: its budget in bytes (oldest files go first)", "receiver")
    store_redis: str = setting("", "shared tier: redis://HOST:PORT/DB (or rediss://); receivers serve each other's "
                               "cards", "receiver")
    store_redis_ttl_s: int = setting(86400, "shared tier: how long a card lives in Redis", "receiver")
    prefix_blocks: int = setting(1 << 18, "prefix index: block hashes (16 tokens each) remembered for FindPrefix, "
                                 "so senders can send delta cards", "receiver")
    store_key: str = setting("", "encryption at rest: a file holding a 32-byte AES key (64 hex digits); disk and Redis "
                             "entries are sealed with AES-GCM", "receiver")

    def __post_init__(self) -> None:
        if not 0 < self.store_low_water <= self.store_high_water <= 1:
            raise ValueError("the store's water marks need 0 < store_low_water <= store_high_water <= 1")


# Ports by service: the dataclass defaults are the receiver's; the sender's differ.
ROLE_DEFAULTS = {"receiver": {}, "sender": {"port": 50062, "metrics_port": 9462}}


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of either service. Environment variables are QKVCOMM_<FIELD>, e.g. QKVCOMM_PORT;
    `qkvcomm serve-*` makes a flag of every field (--field-name), and flags win."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = setting(50061, "gRPC port (0 picks a free one)")
    metrics_port: int = setting(9461, "/metrics HTTP port (0 picks a free one, -1 turns it off)")
    bulk_port: int = setting(0, "bulk channel for card data beside gRPC (PushCardBulk): its port; 0 off, -1 any free "
                             "one (TLS as the gRPC port)", "receiver")
    receiver: str = setting("", "HOST:PORT of the receiver", "sender")
    tls_cert: str = setting("",
                            "TLS certificate (PEM); with --tls-key the port speaks TLS only; re-read when it changes")
    tls_key: str = setting("", "the TLS certificate's private key (PEM)")
    tls_client_ca: str = setting("",
                                 "CA bundle (PEM) of client certificates; set, every client must present one (mTLS)")
    auth_tokens: str = setting("", "token file, one 'TOKEN TENANT' per line; set, every call but health needs "
                                   "'authorization: Bearer TOKEN'")
    receiver_ca: str = setting("", "CA bundle (PEM) of the receiver's certificate; set, the channel speaks TLS",
                               "sender")
    receiver_cert: str = setting("", "client certificate (PEM) for a receiver that requires one (mTLS)", "sender")
    receiver_key: str = setting("", "the client certificate's key (PEM)", "sender")
    receiver_token: str = setting("", "bearer token for the receiver (its file's tenant '*': the sender relays "
                                      "its callers' tenants)", "sender", secret=True)
    receiver_insecure: bool = setting(False, "send --receiver-token in plaintext to a receiver off loopback (refused "
                                      "without this: give --receiver-ca)", "sender")
    receiver_balance: str = setting("pick_first", "pick_first (one receiver per sender) or round_robin (every address "
                                    "of --receiver; needs receivers that share a store tier)", "sender")
    receiver_bulk: bool = setting(True, "send card data on the receiver's bulk channel when it offers one "
                                  "(pick_first only)", "sender")
    receiver_server_name: str = setting("", "name the receiver's certificate must carry, when not the host of "
                                        "--receiver", "sender")
    codec: str = setting(DEFAULT_CODEC, "codec of a request that names none", "sender")
    context_cache_bytes: int = setting(1 << 30, "KV of recent contexts the sender keeps (the model's dtype), so a "
                                       "context handed on again is not prefilled again; 0: none", "sender")
    delta_min_tokens: int = setting(64, "a held prefix is extended by a delta card only when it is at least this "
                                    "long (the prompt's own head is shared by every context); 0: never", "sender")
    session_bytes: int = setting(64 << 20, "memory of the open sessions the sender keeps, counted as held (least "
                                 "recently used dropped past it)", "sender")
    session_max_per_tenant: int = setting(4096, "open sessions one tenant may hold (its least recently used dropped "
                                          "past it)", "sender")
    auto_codecs: str = setting(AUTO_CODECS, "candidates of codec auto, comma-separated: text, fp16, kivi-B, budget-B",
                               "sender")
    max_quality_loss: float = setting(MAX_QUALITY_LOSS, "codec auto never picks an option whose predicted next-token "
                                      "KL (nats, from the codec profile) exceeds this", "sender")
    performance_tokens: int = setting(512, "context length of the start-up speed measurement the receiver reports in "
                                      "Info (0: none; senders need it for codec auto)", "receiver")
    codec_files: str = setting("", "codec .json files requests may name (as written here), comma-separated; "
                                   "no other file is opened", "sender")
    codec_profile: str = setting("", "calibrated codec profile (JSON); \"\" = the model's, made on first use", "sender")
    layer_ratio: float = setting(1.0, "share of layers a card carries (a request can override)", "sender", "--layers")
    layer_method: str = setting(LAYER_METHOD, "loo, combined, attention, prior, random or contiguous", "sender")
    layer_profile: str = setting("", "layer-selection profile (JSON); \"\" = the model's, made on first use", "sender")
    receiver_layers: int = setting(0, "the receiver model's depth when it runs another model (cross-model cards)",
                                   "sender")
    facts: bool = setting(False, "extract facts into every card (a request can also ask for them)", "sender")
    facts_method: str = setting("hybrid", "simple, yake, spacy or hybrid", "sender")
    facts_budget_bytes: int = setting(400, "size of the fact summary", "sender")
    max_new_tokens: int = setting(48, "answer length of a request that names none")
    max_card_bytes: int = setting(1 << 30, "largest card accepted (wire bytes)", "receiver")
    engine: str = setting("hf", "what answers Generate: hf (this process decodes on the card's cache) or vllm (a vLLM "
                          "engine loads the card from the disk tier; needs the qkvcomm-vllm extra and --store-dir)",
                          "receiver")
    vllm_args: str = setting("", "vLLM engine arguments as JSON, e.g. '{\"max_model_len\": 8192}' (--engine vllm)",
                             "receiver")
    alignments: str = setting("", "alignment files (`calibrate pair`), comma-separated; cards of other models need one",
                              "receiver", "--alignment")
    stats_interval_s: float = setting(60.0, "a log line of what the service did since the last one, this often "
                                      "(0: none; an idle service writes none)")
    grace_s: float = setting(5.0, "graceful shutdown: time for in-flight calls to finish")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    limits: Limits = field(default_factory=Limits)
    store: StoreConfig = field(default_factory=StoreConfig)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, role: str = "receiver", file: Mapping[str, str] | None = None,
                 **overrides: Any) -> ServiceConfig:
        """Defaults (the `role`'s), then a config file's values (`file`: read_config_file's), then
        QKVCOMM_* variables, then explicit overrides (None means not given). The nested groups
        (runtime, limits, store) take their fields' names flat: QKVCOMM_DEVICE."""
        source: Mapping[str, str] = os.environ if env is None else env
        if file:  # a file is read like variables that any variable set overrides
            source = {**{f"QKVCOMM_{name.upper()}": text for name, text in file.items()}, **source}
        nested: dict[str, Any] = {
            name: _from_env(kind, source, {k: v for k, v in overrides.items() if k in _names(kind)})
            for name, kind in _NESTED.items()}
        rest = {k: v for k, v in overrides.items() if not any(k in _names(kind) for kind in _NESTED.values())}
        base = _from_env(cls, source, rest, ROLE_DEFAULTS[role])
        return dataclasses.replace(base, **nested)


def settings(role: str) -> list[tuple[dataclasses.Field, Any]]:
    """Every configuration field of a service with its default there, nested groups flattened:
    what its flags are made from."""
    defaults = ServiceConfig.from_env({}, role=role)
    return [(f, getattr(group, f.name)) for group in (defaults, defaults.runtime, defaults.limits, defaults.store)
            for f in dataclasses.fields(group) if f.name not in _NESTED and f.metadata.get("role", "") in ("", role)]


_NESTED = {"runtime": RuntimeConfig, "limits": Limits, "store": StoreConfig}


def read_config_file(path: str | Path) -> dict[str, str]:
    """A TOML file of settings, the flags' names as keys (store_bytes or store-bytes = "2G",
    port = 50061, tls = true...), each value as the text its variable would hold. ValueError naming
    the file and the key for anything that is not a setting, OSError for a file that cannot be read."""
    with open(path, "rb") as f:
        try:
            table = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not TOML: {e}") from None
    fields = {f.name: f for kind in (ServiceConfig, *_NESTED.values()) for f in dataclasses.fields(kind)
              if f.name not in _NESTED}
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"{path}: {key!r} is not a setting (the names are the flags', as in --help)")
        if isinstance(value, dict):
            raise ValueError(f"{path}: {key!r} is a table; settings are flat (key = value)")
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, list):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = str(value)
        try:  # checked here, so that a bad value names the file, not a variable
            parser_for(fields[name], type(fields[name].default))(out[name])
        except ValueError as e:
            raise ValueError(f"{path}: {key} = {value!r}: {e}") from None
    return out


def cache_dir() -> Path:
    """Converted models, profiles and alignments: QKVCOMM_CACHE_DIR, else ~/.cache/qkvcomm."""
    return Path(os.environ.get("QKVCOMM_CACHE_DIR", Path.home() / ".cache" / "qkvcomm"))


def data_dir() -> Path:
    """The QA data folder every reader (tests, eval, bench, grids) uses: QKVCOMM_DATA_DIR, else
    the checkout's data/qa: beside the source, or, for an installed wheel, under the current
    directory (a wheel ships no QA data; elsewhere set the variable)."""
    if configured := os.environ.get("QKVCOMM_DATA_DIR"):
        return Path(configured)
    source = Path(__file__).resolve().parents[1] / "data" / "qa"
    return source if source.is_dir() else Path.cwd() / "data" / "qa"


def qa_file(name: str | Path) -> Path:
    """`name` as given when that file exists, else the file of that name in `data_dir()` (so results
    that name a data file by an old path still find it)."""
    path = Path(name)
    if path.exists():
        return path
    candidate = data_dir() / path.name
    if not candidate.exists():
        hint = " (`make data` rebuilds it)" if candidate.name == "squad_longctx.jsonl" else ""
        where = ("QKVCOMM_DATA_DIR" if os.environ.get("QKVCOMM_DATA_DIR")
                 else "the checkout's data/qa or ./data/qa; set QKVCOMM_DATA_DIR to the folder that holds it, or pass "
                      "a path")
        raise FileNotFoundError(f"no QA file {str(name)!r}{hint}: looked for {candidate} ({where})")
    return candidate


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_TIME_UNITS = {"": 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "2G" (10^9), "512Mi" (2^20), "1.5GiB"; ValueError naming the forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a size: bytes, or a number with k, M, G, T (powers of 1000) or "
                         "Ki, Mi, Gi, Ti (powers of 1024), e.g. 2G or 512Mi")
    return int(float(match[1]) * _SIZE_UNITS[match[2] or ""])


def parse_duration(text: str) -> float:
    """Seconds from "30", "30s", "500ms", "2m", "1h"; ValueError naming the forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?\s*", text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: seconds, or a number with ms, s, m or h, e.g. 30s")
    return float(match[1]) * _TIME_UNITS[match[2] or ""]


def parser_for(f: dataclasses.Field, kind: type) -> Any:
    """How a setting's text is read: sizes (…_bytes) and durations (…_s) take units."""
    if kind is int and f.name.endswith("_bytes"):
        return parse_size
    if kind is float and f.name.endswith("_s"):
        return parse_duration
    return _parse_bool if kind is bool else kind


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _from_env(cls: type[T], env: Mapping[str, str], overrides: dict[str, Any],
              defaults: dict[str, Any] | None = None) -> T:
    values: dict[str, Any] = dict(defaults or {})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in _NESTED:
            continue
        if overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
            continue
        raw = env.get(f"QKVCOMM_{f.name.upper()}")
        if raw is None:
            continue
        kind = type(f.default)
        try:
            values[f.name] = parser_for(f, kind)(raw)
        except ValueError as e:
            raise ValueError(f"QKVCOMM_{f.name.upper()}={raw!r}: {e}") from e
    unknown = set(overrides) - _names(cls) - set(_NESTED)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return cls(**values)


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)
