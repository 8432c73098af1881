"""The card store's tiers with the tiny model: compact memory, hot caches, the disk tier, encryption
at rest, memory pressure; the Redis tier against a real redis-server (tests/test_shared_store.py)."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model

from qkv_core.card.reencode import REENCODED, reencode
from qkv_core.config import StoreConfig
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import CardError
from qkv_core.store.cardfile import Sealer
from qkv_core.store.lru import ByteLRU

CONTEXTS = [f"Note {i}: the depot in sector {i} opens at {i % 12 + 1} o'clock and holds {100 + i} crates. " * 6
            for i in range(12)]


@pytest.fixture(scope="module")
def cards(tiny):
    sender = SenderEngine(tiny)
    return [sender.prepare(text, "kivi-4") for text in CONTEXTS]


def _receiver(tiny, **store) -> ReceiverEngine:
    return ReceiverEngine(tiny, StoreConfig(**store))


def _push(receiver, card, tenant=""):
    from qkv_core.card.framing import frames

    return receiver.accept(frames(card.header, card.blobs), tenant=tenant)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values))


def test_lru_first_writer_wins_and_the_coldest_goes_first():
    lru = ByteLRU(len)
    assert lru.add(("", "a"), b"xx") and lru.add(("", "b"), b"yyy") and not lru.add(("", "a"), b"zzzz")
    assert lru.get(("", "a")) == b"xx" and lru.nbytes == 5
    assert lru.shrink_to(2) == [("", "b")] and lru.coldest() == [("", "a")]


def test_memory_holds_cards_compact_and_decodes_them_again_on_use(tiny, cards):
    receiver = _receiver(tiny, hot_bytes=400_000)  # the hot tier keeps one card: the one just used
    first = _push(receiver, cards[0])
    _push(receiver, cards[1])
    store = receiver.store
    blob_bytes = sum(sum(map(len, c.blobs)) for c in cards[:2])
    assert blob_bytes < store.memory.nbytes < blob_bytes + 2 * 4096  # the blobs as received, and their headers
    decoded = sum(t.numel() * t.element_size() for t in first.kv.keys + first.kv.values)
    assert store.memory.nbytes < decoded  # kivi-4 blobs, against fp32 tensors
    again = store.get(cards[0].header.card_id)
    assert _same(again, first) and store.stats.get("memory", "hit") == 1


def test_tenants_see_only_their_own_cards_and_the_first_writer_wins(tiny, cards):
    receiver = _receiver(tiny)
    _push(receiver, cards[0], tenant="alice")
    card_id = cards[0].header.card_id
    assert receiver.store.get(card_id, "bob") is None and receiver.store.has(card_id) is None
    held = receiver.store.get(card_id, "alice")
    _push(receiver, cards[0], tenant="alice")  # the same card again: the held one stays
    assert receiver.store.get(card_id, "alice") is held and len(receiver.store) == 1


def test_above_the_high_water_mark_cold_cards_are_reencoded_before_any_is_dropped(tiny, cards):
    one = sum(map(len, cards[0].blobs)) + 2048  # a card as held, its header included
    squeezed = sum(map(len, reencode(cards[0].header, cards[0].blobs)[1])) + 2048
    assert squeezed < 0.7 * one
    # three cards pass the high-water mark; three squeezed ones fit under the low-water mark
    receiver = _receiver(tiny, store_bytes=int(3 * squeezed / 0.6), hot_bytes=400_000)
    for card in cards[:3]:
        _push(receiver, card)
    store = receiver.store
    assert store.stats.get("memory", "reencode") >= 1 and store.stats.get("memory", "evict") == 0
    assert store.memory.nbytes <= store.cfg.store_bytes * store.cfg.store_low_water
    squeezed = store.memory.peek(("", cards[0].header.card_id))
    assert squeezed.header.codec.endswith(REENCODED) and squeezed.header.card_id != cards[0].header.card_id
    assert {codec.key.bits for codec in squeezed.header.layers} == {2}
    # still served under the id it was pushed with, decoded from its smaller self
    assert store.get(cards[0].header.card_id).kv.tokens == cards[0].header.context_tokens
    for card in cards[3:]:  # more pressure than re-encoding can absorb: then the coldest go
        _push(receiver, card)
    assert store.stats.get("memory",
                           "evict") > 0 and store.memory.nbytes <= store.cfg.store_bytes * store.cfg.store_high_water


def test_reencoding_stops_at_two_bits(cards):
    header, blobs = cards[0].header, cards[0].blobs
    steps = 0
    while (smaller := reencode(header, blobs)) is not None:
        header, blobs = smaller
        steps += 1
    assert steps == 1 and sum(map(len, blobs)) < sum(map(len, cards[0].blobs))  # kivi-4 -> 2 bits, then the floor


def test_the_disk_tier_serves_cards_after_a_restart(tiny, cards, tmp_path):
    first = _receiver(tiny, store_dir=str(tmp_path))
    served = _push(first, cards[0], tenant="alice")
    files = list(tmp_path.rglob("*.card"))
    assert len(files) == 1 and cards[0].header.card_id in files[0].name
    restarted = _receiver(tiny, store_dir=str(tmp_path))
    assert restarted.store.has(cards[0].header.card_id, "bob") is None
    header = restarted.store.has(cards[0].header.card_id, "alice")
    assert header is not None and header.context_tokens == cards[0].header.context_tokens
    assert _same(restarted.store.get(cards[0].header.card_id, "alice"), served)
    assert restarted.store.stats.get("disk", "reload") == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_card_file_is_dropped_and_counted_never_served(tiny, cards, tmp_path, damage):
    _push(_receiver(tiny, store_dir=str(tmp_path)), cards[1])
    (path,) = tmp_path.rglob("*.card")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data = bytearray(os.urandom(len(data)))
    path.write_bytes(bytes(data))
    restarted = _receiver(tiny, store_dir=str(tmp_path))
    assert restarted.store.get(cards[1].header.card_id) is None
    assert restarted.store.stats.get("disk", "corrupt") == 1 and not path.exists()


def test_sealed_files_open_only_with_their_key_and_name(tiny, cards, tmp_path):
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_text(os.urandom(32).hex())
    other.write_text(os.urandom(32).hex())
    store_dir = tmp_path / "cards"
    card_id = cards[2].header.card_id
    served = _push(_receiver(tiny, store_dir=str(store_dir), store_key=str(key)), cards[2], tenant="alice")
    (path,) = store_dir.rglob("*.card")
    plain_card = bytes(cards[2].blobs[0][:64])
    assert plain_card not in path.read_bytes()  # sealed: the data is not readable on disk
    # named by a keyed hash: neither the tenant nor the card id shows, and the file is the owner's alone
    assert card_id not in str(path) and b"alice".hex() not in str(path) and path.parent.name == "sealed"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert path.parent.parent.stat().st_mode & 0o777 == 0o700  # the model's directory
    assert _same(_receiver(tiny, store_dir=str(store_dir), store_key=str(key)).store.get(card_id, "alice"), served)
    wrong = _receiver(tiny, store_dir=str(store_dir), store_key=str(other))
    assert wrong.store.get(card_id, "alice") is None  # another key names it otherwise: not even found
    path.rename(wrong.store.tier("disk").path(("alice", card_id)))  # moved where that key looks: it does not open
    wrong = _receiver(tiny, store_dir=str(store_dir), store_key=str(other))
    assert wrong.store.get(card_id, "alice") is None and wrong.store.stats.get("disk", "corrupt") == 1


def test_a_sealed_entry_moved_to_another_card_or_tenant_does_not_open(tiny, cards, tmp_path):
    from qkv_core.store.cardfile import from_bytes, to_bytes
    from qkv_core.store.records import CardRecord

    sealer = Sealer(os.urandom(32))
    x, y = cards[0].header.card_id, "0" * 64
    data = to_bytes(CardRecord(cards[0].header, cards[0].blobs), "m", ("alice", x), sealer)
    assert list(from_bytes(data, "m", ("alice", x), sealer))
    for model, key in (("m", ("bob", x)), ("m", ("alice", y)), ("n", ("alice", x))):
        with pytest.raises(CardError, match="AES-GCM"):
            list(from_bytes(data, model, key, sealer))


def test_an_unsealed_entry_under_another_cards_name_is_refused(tiny, cards, tmp_path):
    """No key: whoever writes the disk can put a valid card under another's name; the read checks
    that the entry holds the card asked for, drops it and counts it."""
    receiver = _receiver(tiny, store_dir=str(tmp_path))
    _push(receiver, cards[0])
    _push(receiver, cards[1])
    a, b = (receiver.store.tier("disk").path(("", c.header.card_id)) for c in cards[:2])
    b.write_bytes(a.read_bytes())  # card 0's bytes, named card 1
    restarted = _receiver(tiny, store_dir=str(tmp_path))
    assert restarted.store.get(cards[1].header.card_id) is None
    assert restarted.store.stats.get("disk", "corrupt") == 1 and not b.exists()
    assert _same(restarted.store.get(cards[0].header.card_id), receiver.store.get(cards[0].header.card_id))


def test_a_card_from_another_model_on_disk_is_not_served(tiny, cards, tmp_path):
    _push(_receiver(tiny, store_dir=str(tmp_path)), cards[3])
    other = ReceiverEngine(tiny_model(seed=5), StoreConfig(store_dir=str(tmp_path)))
    assert other.store.get(cards[3].header.card_id) is None  # its own model's directory holds nothing
