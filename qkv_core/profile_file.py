"""Calibration profiles on disk: readable JSON, bound to the weights they were measured on."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from qkv_core.config import cache_dir
from qkv_core.types import Fingerprint

P = TypeVar("P", bound="ProfileFile")
# Profiles shipped with the package, measured for the embedded model by `make profiles`; each is
# found by its cache file name (model, weights hash, kind, tools) and checked like any other.
SHIPPED = Path(__file__).parent / "data" / "profiles"


@dataclass
class ProfileFile:
    """Base of a profile dataclass; `KIND` names it in file names and messages."""

    model: str
    weights_sha256: str

    KIND = "profile"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls: type[P], path: Path, fingerprint: Fingerprint) -> P:
        try:
            profile = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read {cls.KIND} profile {path}: {e}") from e
        if profile.weights_sha256 != fingerprint.weights_sha256:
            raise ValueError(f"{cls.KIND} profile {path} was calibrated on {profile.model!r}, not on this model's "
                             f"weights")
        return profile

    @classmethod
    def load_or_make(cls: type[P], fingerprint: Fingerprint, path: Path | None, make: Callable[[], P]) -> P:
        """The profile at `path` (default: the model's in the cache); else the one shipped under that
        file name; else made and saved at `path`."""
        path = path or cls.default_path(fingerprint)
        if path.exists():
            return cls.load(path, fingerprint)
        if (shipped := SHIPPED / path.name).exists():
            return cls.load(shipped, fingerprint)
        profile = make()
        profile.save(path)
        return profile

    @classmethod
    def default_path(cls, fp: Fingerprint) -> Path:
        return cache_dir() / "profiles" / f"{fp.name}-{fp.weights_sha256[:16]}-{cls.KIND}.json"
