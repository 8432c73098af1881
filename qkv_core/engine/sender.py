"""The sender's work: prefill a context and turn its KV cache into a card.

The context cache keeps the KV of recent contexts (context_cache_bytes). A context that begins
with one of them (a dialogue's next turn, the same document with another question) is prefilled
from the longest such prefix on, whole blocks of BLOCK_TOKENS: only its new tokens go through
the model. A card can be a delta: only the tokens after a prefix the receiver holds (`Parent`).

Every memo here that answers a repeat faster (the context cache and its block index, the facts
cache, the last tokenization) is keyed by tenant, the role vLLM's per-request `cache_salt` plays:
a tenant's timing never tells whether another tenant shared a text (CVE-2025-46570's class).
The budget is shared; only hits are private.
"""
from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qkv_core.card.blocks import BLOCK_TOKENS, block_hashes
from qkv_core.card.framing import overhead_bound
from qkv_core.card.header import CardPlan, build_card
from qkv_core.codec import allocation
from qkv_core.codec import registry as codecs
from qkv_core.config import Limits
from qkv_core.engine import calibration, selection
from qkv_core.engine.crossmodel import layer_sources
from qkv_core.engine.selection import SelectionConfig
from qkv_core.errors import Cancelled, RequestError
from qkv_core.facts import FactCache, FactConfig
from qkv_core.model.attention import Probe, full_attention, require_full_attention
from qkv_core.model.kv import prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.prompt import PromptFormat, context_ids
from qkv_core.store.lru import ByteLRU
from qkv_core.store.records import DEFAULT_TENANT
from qkv_core.types import KVCache
from qkv_core.wire import pb

PROBE_QUERIES = 32  # tokenmix: attention from the context's last tokens ranks its tokens
CacheKey = tuple[str, str, str]  # (tenant, "probe" or "", SHA-256 of the ids): a context cache entry


@dataclass(frozen=True)
class Parent:
    """A card the receiver holds, whose first `tokens` tokens a delta card extends."""

    card_id: str
    tokens: int


@dataclass
class PreparedCard:
    header: pb.CardHeader
    blobs: list[bytes]
    kv_fp16_bytes: int  # the fp16 KV of all layers of the tokens in the card (a delta's own): the headline baseline
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
        self._profiles: dict[str, allocation.Profile] = {}  # by their tools ('' plain)
        self._layer_profile: selection.LayerProfile | None = None
        self._profile_lock = threading.Lock()  # profiles are calibrated once, by the first request that needs one
        self.facts = FactCache()
        self.cache_bytes = cache_bytes
        self._last_ids: tuple[str, str, list[int]] | None = None  # (tenant, context, its ids)
        # (tenant, "probe" or "", digest of the ids) -> the cache and the probe's attention
        self._prefilled: ByteLRU[CacheKey, tuple[KVCache, torch.Tensor | None]] = ByteLRU(lambda e: _nbytes(e[0]))
        self._blocks: dict[tuple[str, bytes], CacheKey] = {}  # (tenant, block hash) -> the cached context it begins
        self._blocks_of: dict[CacheKey, list[tuple[str, bytes]]] = {}
        self._blocks_lock = threading.Lock()

    def profile(self, tools: str = "") -> allocation.Profile:
        """The codec profile measured with `tools` (+rot+prerope; '' none), calibrated on first use if
        no saved one exists."""
        with self._profile_lock:
            if tools not in self._profiles:
                self._profiles[tools] = calibration.load_or_calibrate(self.lm, self.profile_path, tools)
            return self._profiles[tools]

    def context_ids(self, context: str, tenant: str = DEFAULT_TENANT) -> list[int]:
        """The context's prompt tokens; the tenant's last context's are remembered (codec auto
        tokenizes it just before prepare does)."""
        last = self._last_ids
        if last is not None and last[:2] == (tenant, context):
            return last[2]
        ids = context_ids(self.lm.tokenizer, self.prompt, context, self.limits)
        self._last_ids = (tenant, context, ids)
        return ids

    def block_hashes(self, ids: list[int]) -> list[bytes]:
        return block_hashes(self.lm.fingerprint, ids)

    def prefill(self, ids: list[int], probe: bool = False, cancel: threading.Event | None = None,
                tenant: str = DEFAULT_TENANT) -> tuple[KVCache, torch.Tensor | None]:
        """The cache of `ids`, and with `probe` the attention each token receives (tokenmix);
        `cancel` stops a long prefill between chunks. Recent ones of the same `tenant` come from the
        context cache (the card path only reads them); without `probe`, a cached prefix is extended."""
        key = (tenant, "probe" if probe else "", hashlib.sha256(array("l", ids).tobytes()).hexdigest())
        if (held := self._prefilled.get(key)) is not None:
            return held
        hashes = [] if probe else [(tenant, h) for h in self.block_hashes(ids)]
        if not probe:
            past, start = self._cached_prefix(hashes, len(ids))
            entry: tuple[KVCache, torch.Tensor | None] = prefill(self.lm, ids[start:], past, cancel=cancel)[0], None
        else:
            attended = Probe(PROBE_QUERIES)
            kv, _ = prefill(self.lm, ids, probe=attended)
            entry = kv, torch.stack(attended.received).mean(dim=0)
        if self.cache_bytes and not (cancel is not None and cancel.is_set()) and _nbytes(entry[0]) <= self.cache_bytes:
            self._prefilled.add(key, entry)
            self._forget(self._prefilled.shrink_to(self.cache_bytes, keep=key))
            if not probe:
                with self._blocks_lock:
                    self._blocks.update(dict.fromkeys(hashes, key))
                    self._blocks_of[key] = hashes
        return entry

    def _cached_prefix(self, hashes: list[tuple[str, bytes]], tokens: int) -> tuple[KVCache | None, int]:
        """The longest cached prefix of a context (at most tokens - 1 of its tokens) and its length;
        `hashes` are (tenant, block hash): only the tenant's own contexts are found."""
        for i in reversed(range(min(len(hashes), (tokens - 1) // BLOCK_TOKENS))):
            with self._blocks_lock:
                key = self._blocks.get(hashes[i])
            held = self._prefilled.get(key) if key is not None else None
            if held is not None:
                n = (i + 1) * BLOCK_TOKENS
                return held[0].span(0, n), n
        return None, 0

    def _forget(self, keys: list[CacheKey]) -> None:
        with self._blocks_lock:
            for key in keys:
                for digest in self._blocks_of.pop(key, []):
                    if self._blocks.get(digest) == key:
                        del self._blocks[digest]

    def layer_profile(self) -> selection.LayerProfile:
        """The layer-selection profile, calibrated on first use if no saved one exists."""
        with self._profile_lock:
            if self._layer_profile is None:
                self._layer_profile = selection.load_or_calibrate(self.lm, self.layer_profile_path)
            return self._layer_profile

    def codec(self, name: str) -> codecs.Codec:
        """A codec name parsed for this model, with the codec files this sender may open."""
        return codecs.parse(name, self.lm.num_layers, self.codec_files)

    def allocate(self, codec: codecs.Codec, kv: KVCache, importance: torch.Tensor | None,
                 card: allocation.CardTarget | None = None) -> CardPlan:
        """The per-layer codecs (tokenmix's salient positions, budget-B's dropped layers) for this cache;
        `card` (default: this model's, the cache a whole context, no header paid for, no drops)."""
        card = card or allocation.CardTarget(self.lm.fingerprint)
        kind = codec.kind
        if kind is None:
            return CardPlan(codec.name, list(codec.layers))
        profiles = [self.profile(tools) for tools in kind.profile_sets] if kind.needs_profile else []
        a = allocation.allocate(kind, profiles, kv, importance, card)
        return CardPlan(codec.name, a.layers, a.salient, a.selected, selection="" if a.selected is None else codec.name)

    def plan(self, codec: codecs.Codec, ids: list[int], kv: KVCache, importance: torch.Tensor | None,
             may_drop: bool = False, parent: Parent | None = None) -> tuple[KVCache, CardPlan]:
        """The cache a card of context `ids` encodes and its plan: with `parent`, a delta of the tokens
        after the parent's. `may_drop`: budget-B may drop layers (full attention is checked here)."""
        if parent is not None:
            kv = kv.span(parent.tokens)
        overhead = overhead_bound(self.lm.fingerprint, ids, kv, codec.name)
        card = allocation.CardTarget(self.lm.fingerprint, len(ids), overhead,
                                     may_drop and parent is None and full_attention(self.lm.model))
        plan = self.allocate(codec, kv, importance, card)
        if parent is not None:
            plan.parent_card_id, plan.parent_tokens = parent.card_id, parent.tokens
        return kv, plan

    def select(self, plan: CardPlan, ids: list[int], layers: SelectionConfig) -> None:
        """Restrict `plan` to the layers `layers` selects (all of them at ratio 1); a plan whose
        allocator dropped layers keeps its own selection."""
        if layers.ratio < 1:
            require_full_attention(self.lm.model, self.lm.fingerprint.name)
            profile = self.layer_profile() if selection.needs_profile(layers) else None
            plan.selected = selection.select(layers, self.lm.num_layers, profile)
            plan.selection = layers.name
        if plan.selected is not None:
            plan.shared_prefix = selection.shared_prefix(self.lm, ids)

    def can_extend(self, codec: codecs.Codec, layers: SelectionConfig, receiver_layers: int) -> bool:
        """Whether a card of these settings can be a delta: every layer, for this model's receivers,
        no attention probe (tokenmix ranks the whole context's tokens), full attention in every layer."""
        if layers.ratio < 1 or receiver_layers or codec.needs_probe:
            return False
        try:
            require_full_attention(self.lm.model, self.lm.fingerprint.name)
        except ValueError:
            return False
        return True

    def prepare(
        self, context: str, codec: codecs.Codec | str, facts: FactConfig | None = None,
        layers: SelectionConfig = SelectionConfig(), receiver_layers: int = 0, cancel: threading.Event | None = None,
        parent: Parent | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> PreparedCard:
        """Prefill, allocate, select layers, encode; with `facts`, extract them into the header too.
        `receiver_layers`: the depth of a receiver running another model; the card then carries
        the layer map and only the layers that receiver reads. `cancel`: set when the caller goes
        away; the prefill stops at its next chunk and nothing is encoded (Cancelled). `parent`: a
        delta card of the tokens after the parent's (`can_extend` must hold). `tenant`: whose
        context cache and facts cache may answer (no other tenant's). `codec`: parsed (a name is
        parsed here, once, before the prefill)."""
        if isinstance(codec, str):
            codec = self.codec(codec)
        if receiver_layers and (layers.ratio < 1 or receiver_layers == self.lm.num_layers):
            raise RequestError("a cross-model card takes every layer its map reads, for a receiver of another depth")
        if parent is not None and not self.can_extend(codec, layers, receiver_layers):
            raise RequestError("a delta card takes every layer of this model, and a codec without an attention probe")
        ids = self.context_ids(context, tenant)
        start = time.perf_counter()
        kv, importance = self.prefill(ids, probe=codec.needs_probe, cancel=cancel, tenant=tenant)
        prefill_s = time.perf_counter() - start
        if cancel is not None and cancel.is_set():
            raise Cancelled("the caller went away before the card was encoded")
        start = time.perf_counter()
        kv, plan = self.plan(codec, ids, kv, importance, layers.ratio >= 1 and not receiver_layers, parent)
        self.select(plan, ids, layers)
        if receiver_layers:
            plan.sources = layer_sources(self.lm.num_layers, receiver_layers)
            plan.selected = sorted(set(plan.sources))
        facts_start = time.perf_counter()
        if facts:
            extracted = self.facts.get(context, facts, tenant)
            plan.facts = [pb.Fact(**asdict(f)) for f in extracted.facts]
            plan.fact_summary = extracted.summary
        facts_s = time.perf_counter() - facts_start
        header, blobs = build_card(self.lm.fingerprint, ids, kv, plan)
        quantize_s = time.perf_counter() - start - facts_s
        return PreparedCard(header, blobs, kv.nbytes(2), kv.nbytes(4), prefill_s, quantize_s, facts_s)
