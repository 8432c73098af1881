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
