"""The sender's work: prefill a context and turn its KV cache into a card."""
from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qkv_core.card.header import CardPlan, build_card
from qkv_core.codec import allocation
from qkv_core.codec import registry as codecs
from qkv_core.config import Limits
from qkv_core.engine import calibration, selection
from qkv_core.engine.crossmodel import layer_sources
from qkv_core.engine.selection import SelectionConfig
from qkv_core.errors import Cancelled, RequestError
from qkv_core.facts import FactCache, FactConfig
from qkv_core.model.attention import Probe, require_full_attention
from qkv_core.model.kv import prefill
from qkv_core.model.loading import LoadedModel
from qkv_core.model.prompt import PromptFormat, context_ids
from qkv_core.store.lru import ByteLRU
from qkv_core.types import KVCache
from qkv_core.wire import pb

PROBE_QUERIES = 32  # tokenmix: attention from the context's last tokens ranks its tokens


@dataclass
class PreparedCard:
    header: pb.CardHeader
    blobs: list[bytes]
    kv_fp16_bytes: int  # the fp16 KV of all layers of these tokens: the headline baseline
    kv_fp32_bytes: int
    prefill_s: float
    quantize_s: float  # allocation included
    facts_s: float = 0.0


def _nbytes(kv: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in (*kv.keys, *kv.values))


class SenderEngine:
    def __init__(self, lm: LoadedModel, profile_path: Path | None = None, layer_profile_path: Path | None = None,
                 limits: Limits = Limits(), codec_files: Mapping[str, Path] = {},  # noqa: B006 - read only
                 cache_bytes: int = 0):
        """`codec_files`: the codec files a codec name may select (registry.resolve); no others are opened.
        `cache_bytes`: the KV of recent contexts kept, so a context handed on again is not prefilled again."""
        self.lm = lm
        self.codec_files = dict(codec_files)
        self.limits = limits
        self.prompt = PromptFormat.for_tokenizer(lm.tokenizer)
        self.profile_path = profile_path
        self.layer_profile_path = layer_profile_path
        self._profile: allocation.Profile | None = None
        self._layer_profile: selection.LayerProfile | None = None
        self._profile_lock = threading.Lock()  # profiles are calibrated once, by the first request that needs one
        self.facts = FactCache()
        self.cache_bytes = cache_bytes
        self._last_ids: tuple[str, list[int]] | None = None
        self._prefilled: ByteLRU[tuple[KVCache, torch.Tensor | None]] = ByteLRU(lambda entry: _nbytes(entry[0]))

    def profile(self) -> allocation.Profile:
        """The codec profile, calibrated on first use if no saved one exists."""
        with self._profile_lock:
            if self._profile is None:
                self._profile = calibration.load_or_calibrate(self.lm, self.profile_path)
            return self._profile

    def context_ids(self, context: str) -> list[int]:
        """The context's prompt tokens; the last context's are remembered (codec auto tokenizes it just
        before prepare does)."""
        last = self._last_ids
        if last is not None and last[0] == context:
            return last[1]
        ids = context_ids(self.lm.tokenizer, self.prompt, context, self.limits)
        self._last_ids = (context, ids)
        return ids

    def prefill(self, ids: list[int], probe: bool = False, cancel: threading.Event | None = None,
                ) -> tuple[KVCache, torch.Tensor | None]:
        """The cache of `ids`, and with `probe` the attention each token receives (tokenmix);
        `cancel` stops a long prefill between chunks. Recent ones come from the context cache (the
        card path only reads them)."""
        key = ("probe" if probe else "", hashlib.sha256(array("l", ids).tobytes()).hexdigest())
        if (held := self._prefilled.get(key)) is not None:
            return held
        if not probe:
            entry = prefill(self.lm, ids, cancel=cancel)[0], None
        else:
            attended = Probe(PROBE_QUERIES)
            kv, _ = prefill(self.lm, ids, probe=attended)
            entry = kv, torch.stack(attended.received).mean(dim=0)
        if self.cache_bytes and not (cancel is not None and cancel.is_set()) and _nbytes(entry[0]) <= self.cache_bytes:
            self._prefilled.add(key, entry)
            self._prefilled.shrink_to(self.cache_bytes, keep=key)
        return entry

    def layer_profile(self) -> selection.LayerProfile:
        """The layer-selection profile, calibrated on first use if no saved one exists."""
        with self._profile_lock:
            if self._layer_profile is None:
                self._layer_profile = selection.load_or_calibrate(self.lm, self.layer_profile_path)
            return self._layer_profile

    def allocate(self, codec_name: str, kv: KVCache, importance: torch.Tensor | None) -> CardPlan:
        """The per-layer codecs (and tokenmix's salient positions) for this cache."""
        kind = codecs.adaptive(codec_name)
        if kind is None:
            return CardPlan(codec_name, codecs.resolve(codec_name, kv.num_layers, self.codec_files))
        profile = self.profile() if kind.needs_profile else None
        return CardPlan(codec_name, *allocation.allocate(kind, profile, [tuple(k.shape) for k in kv.keys], importance))

    def select(self, plan: CardPlan, ids: list[int], layers: SelectionConfig) -> None:
        """Restrict `plan` to the layers `layers` selects (all of them at ratio 1)."""
        if layers.ratio >= 1:
            return
        require_full_attention(self.lm.model, self.lm.fingerprint.name)
        profile = self.layer_profile() if selection.needs_profile(layers) else None
        plan.selected = selection.select(layers, self.lm.num_layers, profile)
        plan.shared_prefix = selection.shared_prefix(self.lm, ids)
        plan.selection = layers.name

    def prepare(
        self, context: str, codec_name: str, facts: FactConfig | None = None, layers: SelectionConfig = SelectionConfig(),
        receiver_layers: int = 0, cancel: threading.Event | None = None,
    ) -> PreparedCard:
        """Prefill, allocate, select layers, encode; with `facts`, extract them into the header too.
        `receiver_layers`: the depth of a receiver running another model; the card then carries
        the layer map and only the layers that receiver reads. `cancel`: set when the caller goes
        away; the prefill stops at its next chunk and nothing is encoded (Cancelled)."""
        if receiver_layers and (layers.ratio < 1 or receiver_layers == self.lm.num_layers):
            raise RequestError("a cross-model card takes every layer its map reads, for a receiver of another depth")
        kind = codecs.adaptive(codec_name)
        if kind is None:
            codecs.resolve(codec_name, self.lm.num_layers, self.codec_files)  # a bad name fails before the prefill
        ids = self.context_ids(context)
        start = time.perf_counter()
        kv, importance = self.prefill(ids, probe=kind is not None and kind.needs_probe, cancel=cancel)
        prefill_s = time.perf_counter() - start
        if cancel is not None and cancel.is_set():
            raise Cancelled("the caller went away before the card was encoded")
        start = time.perf_counter()
        plan = self.allocate(codec_name, kv, importance)
        self.select(plan, ids, layers)
        if receiver_layers:
            plan.sources = layer_sources(self.lm.num_layers, receiver_layers)
            plan.selected = sorted(set(plan.sources))
        facts_start = time.perf_counter()
        if facts:
            extracted = self.facts.get(context, facts)
            plan.facts = [pb.Fact(**asdict(f)) for f in extracted.facts]
            plan.fact_summary = extracted.summary
        facts_s = time.perf_counter() - facts_start
        header, blobs = build_card(self.lm.fingerprint, ids, kv, plan)
        quantize_s = time.perf_counter() - start - facts_s
        return PreparedCard(header, blobs, kv.nbytes(2), kv.nbytes(4), prefill_s, quantize_s, facts_s)
