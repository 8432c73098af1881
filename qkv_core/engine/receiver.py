"""The receiver's work: take cards in, keep them, and answer queries on top of them.

The receiver's prompt holds the query (and, when asked, the card's fact summary), never
the context: the context reaches the model only as the card's keys and values.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkv_core import malloc
from qkv_core.card.blocks import BLOCK_TOKENS, HASH_BYTES, block_hashes
from qkv_core.card.convert import fingerprint_from_pb, fingerprint_to_pb
from qkv_core.card.naming import context_digest, text_card_id
from qkv_core.card.reader import CardReader
from qkv_core.codec.registry import TEXT
from qkv_core.config import Limits, ServiceConfig, StoreConfig
from qkv_core.engine.answering import AnswerEngine, Generation, HFAnswers, answer_engine
from qkv_core.engine.crossmodel import Alignment
from qkv_core.errors import CardError, ErrorKind, LimitExceeded, RequestError
from qkv_core.model.attention import require_full_attention
from qkv_core.model.kv import prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.prompt import CHARS_PER_TOKEN_MAX, PromptFormat, context_ids, encode
from qkv_core.store.disk import namespace
from qkv_core.store.prefixes import MAX_CHAIN
from qkv_core.store.records import DEFAULT_TENANT, CardRecord, StoredCard
from qkv_core.store.tiered import CardStore
from qkv_core.types import KVCache
from qkv_core.wire import pb


class Admission:
    """How many cards are arriving and how much memory they will take once decoded: bounded, so
    that streams held open after their headers cannot exhaust the receiver (thread-safe)."""

    TRIM_EVERY_S = 5.0  # a failed intake hands its memory back, at most this often

    def __init__(self, limits: Limits):
        self.limits = limits
        self.intakes = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._trimmed = 0.0

    def enter(self) -> None:
        with self._lock:
            self.limits.check("max_intakes", self.intakes + 1, "the number of cards arriving at once")
            self.intakes += 1

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            self.limits.check("max_inflight_bytes", self.bytes + nbytes, "decoded bytes of the cards arriving at once")
            self.bytes += nbytes

    def leave(self, nbytes: int, failed: bool) -> None:
        with self._lock:
            self.intakes -= 1
            self.bytes -= nbytes
            trim = failed and time.monotonic() - self._trimmed > self.TRIM_EVERY_S
            if trim:
                self._trimmed = time.monotonic()
        if trim:
            malloc.trim()


@dataclass
class Intake:
    """One card arriving: validated frame by frame, each layer dequantized once complete.
    Use it as a context manager: leaving releases its admission, whatever happened."""

    reader: CardReader
    device: torch.device
    dtype: torch.dtype
    shared_prefix: Callable[[int], KVCache]  # the receiver's own KV of the first N tokens
    parent: Callable[[pb.CardHeader], KVCache]  # a delta card's parent: the cache of its first parent_tokens
    admission: Admission
    hot_budget: int  # a card whose decoded cache would not fit the hot tier is refused before its data
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)  # each sent layer as received: the store's compact form
    dequantize_s: float = 0.0
    reserved: int = 0  # decoded bytes admitted for this card
    prefix: KVCache | None = None  # a delta card's parent tokens, found when its header arrives

    def __enter__(self) -> Intake:
        self.admission.enter()
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self.keys.clear()
        self.values.clear()
        self.prefix = None
        self.admission.leave(self.reserved, failed=kind is not None)
        self.reserved = 0

    def feed(self, frame: pb.CardFrame) -> int | None:
        """Validate one frame; returns a layer index that is ready for `decode`."""
        first = self.reader.header is None
        ready = self.reader.feed(frame)
        if first and self.reader.header is not None:  # admit the card's decoded size before any of its data
            if self.reader.header.parent_card_id:  # a delta without its parent fails before any of its data too
                self.prefix = self.parent(self.reader.header)
            nbytes = self.reader.decoded_bytes(self.dtype)
            if nbytes > self.hot_budget:
                raise LimitExceeded(f"the card decodes to {nbytes:,} bytes, more than this receiver's hot tier "
                                    f"hot_bytes={self.hot_budget:,} (QKVCOMM_HOT_BYTES)")
            self.blobs = [b""] * len(self.reader.layers)
            self.admission.reserve(nbytes)
            self.reserved = nbytes
        return ready

    def decode(self, index: int) -> None:
        start = time.perf_counter()
        self.blobs[index] = bytes(self.reader.layers[index].buf)
        k, v = self.reader.decode_layer(index, self.device, self.dtype)
        receiver_layer = self.reader.layers[index].spec.receiver_layer
        self.keys[receiver_layer], self.values[receiver_layer] = k, v
        self.dequantize_s += time.perf_counter() - start

    def record(self) -> CardRecord:
        """The card as received, once `finish` has validated it."""
        return CardRecord(self.reader.finish(), self.blobs)

    def finish(self, num_layers: int) -> StoredCard:
        """The card's cache; layers it does not carry get only the shared prefix (a ragged cache)."""
        header = self.reader.finish()
        if (alignment := self.reader.alignment) is not None:
            missing = sorted(set(alignment.sources) - set(self.keys))  # equal to the card's map, when it has one
            if missing:
                raise CardError(ErrorKind.PRECONDITION,
                                f"a card from another model must carry every layer its alignment reads; {missing} are "
                                f"missing")
            start = time.perf_counter()
            # the layers the alignment does not read stay None: it never touches them
            sender = KVCache([self.keys.get(i) for i in range(alignment.sender.num_layers)],  # type: ignore[misc]
                             [self.values.get(i) for i in range(alignment.sender.num_layers)])  # type: ignore[misc]
            kv = alignment.apply(sender, self.device, self.dtype)
            self.dequantize_s += time.perf_counter() - start
            return StoredCard(header, kv)
        missing = sorted(set(range(num_layers)) - set(self.keys))
        if missing:
            if not header.shared_prefix_tokens:
                raise CardError(ErrorKind.PRECONDITION,
                                f"card lacks layers {missing} and names no shared prefix for them")
            prefix = self.shared_prefix(header.shared_prefix_tokens)
            for i in missing:
                self.keys[i], self.values[i] = prefix.keys[i], prefix.values[i]
        order = range(num_layers)
        kv = KVCache([self.keys[i] for i in order], [self.values[i] for i in order])
        return StoredCard(header, kv if self.prefix is None else self.prefix.extended(kv))


class ReceiverEngine:
    """A receiver's cards: intake (validate, decode, stitch deltas, store per tenant) and questions
    over them, answered by its answer engine (qkv_core.engine.answering; default: this process's
    model, hf)."""

    def __init__(self, lm: LoadedModel, store: StoreConfig = StoreConfig(), max_card_bytes: int = 1 << 30,
                 alignments: Sequence[Alignment] = (), limits: Limits = Limits(),
                 answers: AnswerEngine | None = None):
        self.lm = lm
        self.answers = answers if answers is not None else HFAnswers(lm, ServiceConfig())
        if self.answers.whole_cards_only:
            if alignments:
                raise ValueError("this receiver's engine takes cards of its own model only (no --alignment)")
            store = dataclasses.replace(store, prefix_blocks=0)  # no prefixes offered: senders send whole cards
        self.limits = limits
        self.admission = Admission(limits)
        # The store's own reads of its tiers (a delta's parents among them) are not arrivals: unbounded.
        self._reads = Admission(dataclasses.replace(limits, max_intakes=sys.maxsize, max_inflight_bytes=sys.maxsize))
        for a in alignments:
            if a.receiver != lm.fingerprint:
                raise ValueError(f"alignment {a.sender.name} -> {a.receiver.name} is for another receiver model than "
                                 f"{lm.fingerprint.name!r}")
        self.alignments = {a.sender.weights_sha256: a for a in alignments}
        self.prompt = PromptFormat.for_tokenizer(lm.tokenizer)
        self.store = CardStore(store, namespace(lm.fingerprint), self.decode, max_card_bytes)
        self.max_card_bytes = max_card_bytes
        self._prefix: tuple[int, KVCache | None] | None = None

    @classmethod
    def from_config(cls, cfg: ServiceConfig, lm: LoadedModel) -> ReceiverEngine:
        """The receiver `cfg` describes: its answer engine (`cfg.engine`), alignments, store and limits."""
        answers = answer_engine(cfg.engine)(lm, cfg)
        alignments = [Alignment.load(Path(p)) for p in cfg.alignments.split(",") if p]
        return cls(lm, cfg.store, cfg.max_card_bytes, alignments, cfg.limits, answers)

    def close(self) -> None:
        """Release what lives outside this process's memory: the answer engine's processes, the
        store's connections."""
        self.answers.close()
        self.store.close()

    def intake(self, tenant: str = DEFAULT_TENANT, admitted: bool = True) -> Intake:
        """A new card's intake for `tenant` (whose cards a delta's parent is looked up among); enter it
        (`with`) to be admitted (not `admitted`: the store reading its own tiers, outside the limits)."""
        reader = CardReader(self.lm.fingerprint, self.max_card_bytes, self.alignments, self.limits)
        return Intake(reader, self.lm.device, self.lm.dtype, self.shared_prefix,
                      functools.partial(self.parent, tenant=tenant), self.admission if admitted else self._reads,
                      self.store.cfg.hot_bytes)

    def parent(self, header: pb.CardHeader, tenant: str = DEFAULT_TENANT) -> KVCache:
        """The cache a delta card extends: the first parent_tokens tokens of the tenant's card
        parent_card_id. PARENT_MISSING when the tenant does not hold it (evicted, or never sent)."""
        held = self.store.get(header.parent_card_id, tenant)
        if held is None:
            raise CardError(ErrorKind.PARENT_MISSING, f"this receiver does not hold the delta card's parent "
                            f"{header.parent_card_id[:12]} (evicted, or never pushed): send the whole card",
                            {"parent_card_id": header.parent_card_id})
        foreign = fingerprint_from_pb(held.header.model) != self.lm.fingerprint
        if held.header.layer_sources or held.kv.is_ragged or foreign:
            raise CardError(ErrorKind.PRECONDITION, "a delta card extends only a card of this receiver's model "
                            "with every layer (not a layer-selected or cross-model one)")
        if header.parent_tokens > held.header.context_tokens:
            raise CardError(ErrorKind.INVALID, f"the delta extends {header.parent_tokens} tokens of a parent that "
                            f"holds {held.header.context_tokens}")
        if held.header.context_ids[: header.parent_tokens] != header.context_ids[: header.parent_tokens]:
            raise CardError(ErrorKind.INVALID, f"the delta's context does not begin with its parent's "
                            f"{header.parent_tokens} tokens (card {header.parent_card_id[:12]})")
        if self.store.depth(held.header, tenant) >= MAX_CHAIN:
            raise CardError(ErrorKind.PRECONDITION, f"the delta's parent is the end of a chain of {MAX_CHAIN} deltas, "
                            "the most this receiver stitches: send the whole card")
        return held.kv.span(0, header.parent_tokens)

    def find_prefix(self, hashes: Sequence[bytes], tenant: str = DEFAULT_TENANT, codecs: Sequence[str] = (),
                    ) -> tuple[str, int] | None:
        """The held card (of `codecs`, if named) sharing the longest prefix with a context named by its
        block hashes, and the tokens in common (FindPrefix)."""
        self.limits.check("max_context_tokens", len(hashes) * BLOCK_TOKENS, "the context's block hashes x 16 (tokens)")
        if any(len(h) != HASH_BYTES for h in hashes):
            raise RequestError(f"block hashes are {HASH_BYTES} bytes each")
        return self.store.find_prefix(list(hashes), tenant, set(codecs))

    def shared_prefix(self, tokens: int) -> KVCache:
        """This model's KV of its chat header, which a layer-selected card leaves to the receiver."""
        if self.answers.whole_cards_only:
            raise CardError(ErrorKind.PRECONDITION, "this receiver takes whole cards: every layer, no shared prefix")
        try:
            require_full_attention(self.lm.model, self.lm.fingerprint.name)
        except ValueError as e:
            raise CardError(ErrorKind.PRECONDITION, str(e)) from e
        if self._prefix is None:
            head = encode(self.lm.tokenizer, self.prompt.head)
            self._prefix = (len(head), prefill(self.lm, head)[0] if head else None)
        length, kv = self._prefix
        if tokens != length or kv is None:
            raise CardError(ErrorKind.PRECONDITION,
                            f"the card's shared prefix is {tokens} tokens; this receiver's chat header is {length}")
        return kv

    def accept(self, stream: Iterable[pb.CardFrame], intake: Intake | None = None, tenant: str = DEFAULT_TENANT,
               ) -> StoredCard:
        """Take a whole card in one blocking call (the service streams frames through `intake` instead);
        pass an `intake` to read its statistics afterwards. Keeps it for `tenant`."""
        record, card = self._take(stream, intake or self.intake(tenant))
        self.store.put(card, record, tenant)
        return card

    def decode(self, stream: Iterable[pb.CardFrame], tenant: str = DEFAULT_TENANT) -> tuple[CardRecord, KVCache]:
        """A card validated and decoded, not kept: how the store reads its own tiers."""
        record, card = self._take(stream, self.intake(tenant, admitted=False))
        return record, card.kv

    def _take(self, stream: Iterable[pb.CardFrame], intake: Intake) -> tuple[CardRecord, StoredCard]:
        with intake:
            for frame in stream:
                if (ready := intake.feed(frame)) is not None:
                    intake.decode(ready)
            card = intake.finish(self.lm.num_layers)
            return intake.record(), card

    def accept_text(self, context: str, tenant: str = DEFAULT_TENANT) -> tuple[StoredCard, float]:
        """The text handoff: keep the context's token ids, and its cache when the answer engine
        prefills now. Returns the stored entry and the prefill time."""
        header = self.text_header(context)
        kv, prefill_s = self.answers.text(list(header.context_ids))
        card = StoredCard(header, kv if kv is not None else KVCache([], []))
        self.store.put(card, None, tenant)
        return card, prefill_s

    def text_header(self, context: str) -> pb.CardHeader:
        """The header a text handoff is kept under: its context's token ids, named by them."""
        fp, ids = self.lm.fingerprint, context_ids(self.lm.tokenizer, self.prompt, context, self.limits)
        return pb.CardHeader(card_id=text_card_id(fp, ids), codec=TEXT, context_tokens=len(ids),
                             model=fingerprint_to_pb(fp), block_hashes=block_hashes(fp, ids),
                             context_ids_sha256=context_digest(ids), context_ids=ids)

    def card(self, card_id: str, tenant: str = DEFAULT_TENANT) -> StoredCard:
        card = self.store.get(card_id, tenant)
        if card is None:
            raise _not_held(card_id)
        return card

    def generate(self, card_id: str, query: str, max_new_tokens: int, facts: bool, stats: Generation,
                 tenant: str = DEFAULT_TENANT) -> Iterator[str]:
        """Stream the answer to `query` over `tenant`'s card; fills `stats` as it goes."""
        if not query.strip():
            raise RequestError("the query is empty")
        self.limits.check("max_new_tokens_limit", max_new_tokens, "max_new_tokens")
        self.limits.check("max_query_tokens", len(query) // CHARS_PER_TOKEN_MAX, "the query (characters / 16)")
        header = self.store.has(card_id, tenant)
        if header is None:
            raise _not_held(card_id)
        summary = header.fact_summary if facts else ""
        ids = encode(self.lm.tokenizer, self.prompt.query_part(query, summary))
        self.limits.check("max_query_tokens", len(ids), "the query with its fact summary (tokens)")
        yield from self.answers.answer(header, lambda: self.card(header.card_id, tenant).kv, ids, max_new_tokens,
                                       stats, tenant)


def _not_held(card_id: str) -> CardError:
    return CardError(ErrorKind.NOT_FOUND, f"no card {card_id!r} here; push it first")
