import pytest
import torch

from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.model.kv import prefill
from qkv_eval.multihop import context_drift, run_chain

CONTEXT = "The rate limit is 600 requests per minute. Bulk exports moved to the /v4/exports endpoint."


def _engines(lm):
    return SenderEngine(lm), ReceiverEngine(lm)


def test_each_hop_appends_a_note_and_relays_the_grown_cache(tiny):
    sender, receiver = _engines(tiny)
    chain = run_chain(sender, receiver, CONTEXT, "fp32", hops=3)
    context_ids = sender.context_ids(CONTEXT)
    assert len(chain.notes) == 2 and all(n.startswith("Note from agent") and n.endswith("\n") for n in chain.notes)
    assert len(chain.wire_bytes) == 3 and chain.wire_bytes[0] < chain.wire_bytes[1] < chain.wire_bytes[2]
    assert chain.ids[: len(context_ids)] == context_ids and chain.kv.tokens == len(chain.ids)
    # a lossless relay leaves the context's cache exactly as agent 1 computed it
    first, _ = prefill(tiny, context_ids)
    stored = receiver.card(chain.card_id).kv
    assert torch.allclose(stored.keys[0][:, : len(context_ids)], first.keys[0], atol=1e-6)


def test_lossy_relays_compound_and_tokenmix_is_refused(tiny):
    sender, receiver = _engines(tiny)

    # Per-token V rows land on the same grid again (re-quantizing them is idempotent); the
    # per-channel K grids move as each note widens the channels' ranges, so K error compounds.
    drift = {hops: context_drift(sender, receiver, CONTEXT, "kivi-2", hops) for hops in (1, 3)}
    assert drift[3] > drift[1] > 0
    assert context_drift(sender, receiver, CONTEXT, "kivi-2", 3, deltas=True) == pytest.approx(drift[1], rel=1e-6)
    with pytest.raises(ValueError, match="tokenmix"):
        run_chain(sender, receiver, CONTEXT, "tokenmix-3", hops=2)


def test_a_relay_of_deltas_quantizes_each_token_once(tiny):
    """Each later hop sends only its note: the context's cache is agent 1's card, never re-encoded."""
    sender, receiver = _engines(tiny)
    n = len(sender.context_ids(CONTEXT))
    once = receiver.card(run_chain(sender, receiver, CONTEXT, "kivi-2", 1).card_id).kv
    chain = run_chain(sender, receiver, CONTEXT, "kivi-2", 3, deltas=True)
    relayed = receiver.card(chain.card_id).kv
    assert all(torch.equal(a[:, :n], b) for a, b in zip(relayed.keys + relayed.values, once.keys + once.values))
    assert relayed.tokens == len(chain.ids)
    reencoded = run_chain(sender, receiver, CONTEXT, "kivi-2", 3)
    assert chain.wire_bytes[0] == reencoded.wire_bytes[0]
    assert all(chain.wire_bytes[hop] < reencoded.wire_bytes[hop] / 2 for hop in (1, 2))
