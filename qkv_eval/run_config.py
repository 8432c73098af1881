"""The configuration of one evaluation run, typed, and how it survives JSON (a result's `config`).

Kept free of the model and engine imports, so `qkvcomm report` reads results without loading torch.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from qkv_core.config import LAYER_METHOD

MODES = ("baseline", "skyline", "text", "kv", "facts")


@dataclass(frozen=True)
class EvalConfig:
    data: Path
    mode: str = "kv"
    codec: str = "fp16"
    limit: int = 0  # 0: all rows
    max_new_tokens: int = 32
    context_field: str = "context"
    hops: int = 1  # kv: handoffs along a chain of agents before the answer
    deltas: bool = False  # hops > 1: each later hop sends only its own turn (a delta card), not the whole cache
    facts: str = ""  # kv: a fact method (simple, yake, spacy, hybrid) to send facts with the card; "" = none
    layers: float = 1.0  # kv: share of layers the card carries
    layer_method: str = LAYER_METHOD
    relevance: bool = True  # MiniLM relevance per row; off, `rescore` fills it in later
    sender_model: str = ""  # kv: the sender's model when it is not the receiver's (cross-model handoff)
    alignment: str = ""  # cross-model: stats, ridge (the pair's calibrated file) or an alignment file

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.hops < 1 or (self.hops > 1 and self.mode != "kv"):
            raise ValueError("hops must be >= 1, and above 1 only in kv mode")
        if self.deltas and self.hops < 2:
            raise ValueError("deltas apply to a relay of two or more hops")
        if self.layers < 1 and (self.mode != "kv" or self.hops > 1):
            raise ValueError("a layer ratio below 1 applies to single-hop kv cards")
        if self.facts and (self.mode not in ("kv", "facts") or self.hops > 1):
            raise ValueError("facts go with single-hop kv cards (or alone, in facts mode)")
        if self.mode == "facts" and not self.facts:
            raise ValueError("facts mode needs a fact method")
        single_hop_kv = self.mode == "kv" and self.hops == 1 and self.layers >= 1 and not self.facts
        if self.sender_model and not (single_hop_kv and self.alignment):
            raise ValueError("a cross-model eval is single-hop kv with all layers, no facts, and an --alignment")

    def to_json(self) -> dict:
        """The fields as JSON values (the data path as a string): a result's `config`."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}

    @classmethod
    def from_json(cls, config: dict) -> EvalConfig:
        """The configuration of a saved result; results written before configs were typed hold every
        value as a string, and both read back the same. Keys that are no field (date, machine) are left."""
        values: dict = {}
        for f in fields(cls):
            if f.name not in config:
                continue
            raw, kind = config[f.name], type(f.default) if f.default is not MISSING else Path
            values[f.name] = raw in (True, "True", "true", "1") if kind is bool else kind(raw)
        return cls(**values)
