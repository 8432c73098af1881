"""Configuration: one dataclass per concern, filled from defaults, then environment, then flags."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CODEC = "int8"
MAX_CHUNK_BYTES = 1 << 20  # one card chunk's data, and the gRPC message ceiling it implies


@dataclass(frozen=True)
class RuntimeConfig:
    """Which model runs where."""

    model: str = DEFAULT_MODEL  # embedded name, Hugging Face directory, or .gguf file
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16


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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "ServiceConfig":
        """Defaults, then QKVCOMM_* variables, then explicit overrides (None means not given)."""
        env = os.environ if env is None else env
        runtime = _from_env(RuntimeConfig, env, {k: v for k, v in overrides.items() if k in _names(RuntimeConfig)})
        rest = {k: v for k, v in overrides.items() if k not in _names(RuntimeConfig)}
        return dataclasses.replace(_from_env(cls, env, rest), runtime=runtime)


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _from_env(cls: type[T], env: dict[str, str], overrides: dict[str, Any]) -> T:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == "runtime":
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
    unknown = set(overrides) - _names(cls) - {"runtime"}
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
