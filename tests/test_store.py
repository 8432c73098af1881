import torch

from qkv_core.engine.store import CardStore, StoredCard
from qkv_core.types import KVCache
from qkv_core.wire import pb


def card(card_id: str, tokens: int) -> StoredCard:
    t = torch.zeros(1, tokens, 4)  # 16 B/token for K, the same for V
    return StoredCard(pb.CardHeader(card_id=card_id), KVCache([t], [t.clone()]))


def test_least_recently_used_card_goes_first():
    store = CardStore(budget_bytes=3 * 32 * 10)
    for name in "abc":
        assert store.put(card(name, 10)) == []
    assert store.get("a") is not None  # a becomes the most recent
    assert store.put(card("d", 10)) == ["b"]
    assert store.get("b") is None and len(store) == 3 and store.nbytes == 3 * 320


def test_a_card_larger_than_the_budget_is_kept_alone():
    store = CardStore(budget_bytes=100)
    store.put(card("a", 1))
    assert store.put(card("big", 50)) == ["a"]
    assert store.get("big") is not None


def test_tenants_see_only_their_own_cards_and_the_first_writer_wins():
    store = CardStore(budget_bytes=1 << 20)
    first, forged = card("a", 2), card("a", 3)
    store.put(first, tenant="alice")
    assert store.get("a", tenant="bob") is None and store.get("a") is None
    store.put(forged, tenant="alice")  # the same id again: the held card stays
    assert store.get("a", tenant="alice") is first
    store.put(forged, tenant="bob")  # another tenant's entry, beside alice's
    assert store.get("a", tenant="bob") is forged and store.get("a", tenant="alice") is first and len(store) == 2
