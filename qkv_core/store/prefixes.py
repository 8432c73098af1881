"""Which held card covers which prefix: the receiver's index of block hashes (qkv_core.card.blocks).

    (tenant, block hash) -> {codec: (card id, tokens through that block, its chain depth)}

One entry per codec under a block: a dialogue that switches codec for a turn still finds its
earlier codec's cards when it switches back. A card is indexed under the hashes its header names (a delta card: the
blocks after its parent's,
which the parent's entries already cover). FindPrefix walks a context's hashes from the longest
prefix down and answers with the first entry whose card is still held and can take one more delta
(chains of deltas are at most MAX_CHAIN deep: decoding one decodes its parents); entries of cards
that are gone are dropped as they are met. Bounded: past `max_blocks` the entries added longest ago go first.
Kept in memory only: after a restart, cards read back from the disk tier are found by id, not by
prefix, until they are pushed again.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

from qkv_core.card.blocks import BLOCK_TOKENS
from qkv_core.wire import pb

MAX_CHAIN = 16  # deltas stacked on one whole card, at most


Entry = tuple[str, int, int]  # card id, tokens through the block, chain depth


class PrefixIndex:
    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks  # (block, codec) entries
        self._entries: OrderedDict[tuple[str, bytes, str], Entry] = OrderedDict()  # (tenant, block hash, codec)
        self._codecs: dict[tuple[str, bytes], set[str]] = {}  # the codecs indexed under a block
        self._lock = threading.Lock()

    def add(self, tenant: str, header: pb.CardHeader, depth: int = 0) -> None:
        """Index a held card; `depth`: the deltas from it down to a whole card (0: whole)."""
        first = header.parent_tokens // BLOCK_TOKENS
        with self._lock:
            for j, digest in enumerate(header.block_hashes):
                key = (tenant, digest, header.codec)
                self._entries[key] = (header.card_id, (first + j + 1) * BLOCK_TOKENS, depth)
                self._entries.move_to_end(key)
                self._codecs.setdefault(key[:2], set()).add(header.codec)
            while len(self._entries) > self.max_blocks:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, bytes, str]) -> None:
        if self._entries.pop(key, None) is not None:
            codecs = self._codecs[key[:2]]
            codecs.discard(key[2])
            if not codecs:
                del self._codecs[key[:2]]

    def longest(self, tenant: str, hashes: Sequence[bytes], held: Callable[[str], bool], codecs: Collection[str] = (),
                ) -> tuple[str, int] | None:
        """(card id, common tokens) of the longest prefix of `hashes` a held card (of one of `codecs`,
        if any are named) covers."""
        for digest in reversed(hashes):
            with self._lock:
                found = [((tenant, digest, c), self._entries[tenant, digest, c])
                         for c in self._codecs.get((tenant, digest), ()) if not codecs or c in codecs]
            for key, (card_id, tokens, depth) in sorted(found, key=lambda kv: kv[1][2]):  # the shortest chain first
                if depth >= MAX_CHAIN:
                    continue
                if held(card_id):
                    return card_id, tokens
                with self._lock:
                    self._drop(key)
        return None

    def __len__(self) -> int:
        return len(self._entries)
