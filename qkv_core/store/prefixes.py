"""Which held card covers which prefix: the receiver's index of block hashes (qkv_core.card.blocks).

    (tenant, block hash) -> (card id, tokens through that block, the card's codec, its chain depth)

A card is indexed under the hashes its header names (a delta card: the blocks after its parent's,
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


class PrefixIndex:
    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._entries: OrderedDict[tuple[str, bytes], tuple[str, int, str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, tenant: str, header: pb.CardHeader, depth: int = 0) -> None:
        """Index a held card; `depth`: the deltas from it down to a whole card (0: whole)."""
        first = header.parent_tokens // BLOCK_TOKENS
        with self._lock:
            for j, digest in enumerate(header.block_hashes):
                key = (tenant, digest)
                self._entries[key] = (header.card_id, (first + j + 1) * BLOCK_TOKENS, header.codec, depth)
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_blocks:
                self._entries.popitem(last=False)

    def longest(self, tenant: str, hashes: Sequence[bytes], held: Callable[[str], bool], codecs: Collection[str] = (),
                ) -> tuple[str, int] | None:
        """(card id, common tokens) of the longest prefix of `hashes` a held card (of one of `codecs`,
        if any are named) covers."""
        for digest in reversed(hashes):
            key = (tenant, digest)
            with self._lock:
                entry = self._entries.get(key)
            if entry is None or (codecs and entry[2] not in codecs) or entry[3] >= MAX_CHAIN:
                continue
            if held(entry[0]):
                return entry[:2]
            with self._lock:
                self._entries.pop(key, None)
        return None

    def __len__(self) -> int:
        return len(self._entries)
