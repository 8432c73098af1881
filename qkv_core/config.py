"""Configuration: one dataclass per concern, filled from defaults, then environment, then flags."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CODEC = "int8"
MAX_CHUNK_BYTES = 1 << 20  # one card chunk's data, and the gRPC message ceiling it implies


@dataclass(frozen=True)
class RuntimeConfig:
    """Which model runs where."""

    model: str = DEFAULT_MODEL  # embedded name, Hugging Face id (org/model), Hugging Face directory, or .gguf file
    revision: str = ""  # hub models: the commit (or branch/tag) to load; "" = main
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16


class LimitExceeded(Exception):
    """A request asks for more than a configured limit allows (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a service. Past a limit a call is refused before any work,
    with a status naming the limit and its variable (QKVCOMM_<FIELD>)."""

    max_context_tokens: int = 32768  # a context (Ask/Share, PushText) or a card's context_tokens
    max_query_tokens: int = 2048  # a question and the card's fact summary, at the receiver
    max_new_tokens_limit: int = 1024  # the most tokens one request may ask to generate
    max_fact_summary_bytes: int = 8192  # a card's fact summary
    max_intakes: int = 8  # receiver: cards arriving at once
    max_inflight_bytes: int = 1 << 30  # receiver: decoded bytes of all cards arriving at once
    idle_timeout_s: float = 30.0  # receiver: a card stream that sends nothing this long is dropped
    receiver_timeout_s: float = 120.0  # sender: deadline of each call to the receiver (or the client's, if sooner)

    def check(self, limit: str, value: int | float, what: str) -> None:
        """LimitExceeded unless value <= the limit named `limit`."""
        allowed = getattr(self, limit)
        if value > allowed:
            raise LimitExceeded(f"{what} is {value:,}; the limit is {limit}={allowed:,} (QKVCOMM_{limit.upper()})")


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of either service. Environment variables are QKVCOMM_<FIELD>, e.g. QKVCOMM_PORT."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # /metrics HTTP port; 0 picks a free one, -1 turns it off
    receiver: str = ""  # sender only: HOST:PORT of the receiver
    codec: str = DEFAULT_CODEC  # sender default when a request names none
    codec_profile: str = ""  # sender: calibrated codec profile (JSON); "" = the model's default, made on first use
    layer_ratio: float = 1.0  # sender: share of layers a card carries (a request can override)
    layer_method: str = "combined"  # combined | attention | prior | random | contiguous | loo
    layer_profile: str = ""  # sender: layer-selection profile (JSON); "" = the model's default, made on first use
    receiver_layers: int = 0  # sender: the receiver model's depth when it runs another model (cross-model cards)
    facts: bool = False  # sender: extract facts into every card (a request can also ask for them)
    facts_method: str = "hybrid"  # simple | yake | spacy | hybrid
    facts_budget_bytes: int = 400  # size of the fact summary
    max_new_tokens: int = 48
    store_bytes: int = 2 << 30  # receiver: budget of the in-memory card store (dequantized KV)
    max_card_bytes: int = 1 << 30  # receiver: largest card accepted
    alignments: str = ""  # receiver: comma-separated alignment files (`calibrate pair`); cards of other models need one
    grace_s: float = 5.0  # graceful shutdown: time for in-flight calls to finish
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "ServiceConfig":
        """Defaults, then QKVCOMM_* variables, then explicit overrides (None means not given).
        The nested groups (runtime, limits) take their fields' names flat: QKVCOMM_DEVICE, QKVCOMM_MAX_INTAKES."""
        env = os.environ if env is None else env
        nested = {name: _from_env(kind, env, {k: v for k, v in overrides.items() if k in _names(kind)})
                  for name, kind in _NESTED.items()}
        rest = {k: v for k, v in overrides.items() if not any(k in _names(kind) for kind in _NESTED.values())}
        return dataclasses.replace(_from_env(cls, env, rest), **nested)


_NESTED = {"runtime": RuntimeConfig, "limits": Limits}


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
    """`name` as given when that file exists, else the file of that name in `data_dir()`."""
    path = Path(name)
    if path.exists():
        return path
    candidate = data_dir() / path.name if path.parent == Path(".") else path
    if not candidate.exists():
        hint = " (`make data` rebuilds it)" if candidate.name == "squad_longctx.jsonl" else ""
        raise FileNotFoundError(f"no QA file {str(name)!r}{hint}: looked in QKVCOMM_DATA_DIR={data_dir()}")
    return candidate


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _from_env(cls: type[T], env: dict[str, str], overrides: dict[str, Any]) -> T:
    values: dict[str, Any] = {}
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
            values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
        except ValueError as e:
            raise ValueError(f"QKVCOMM_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from e
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
