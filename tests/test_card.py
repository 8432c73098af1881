"""CacheCard encode/decode on a tiny random model: round trip and every kind of bad input."""
import dataclasses

import pytest
import torch

from qkv_core.card.framing import frames
from qkv_core.card.header import FORMAT_VERSION, CardPlan, build_card
from qkv_core.card.reader import CardReader
from qkv_core.codec import registry as codecs
from qkv_core.config import MAX_CHUNK_BYTES
from qkv_core.errors import CardError, ErrorKind
from qkv_core.model.kv import prefill
from qkv_core.model.prompt import PromptFormat, encode
from qkv_core.wire import pb

CONTEXT = "The rate limit is 600 requests per minute. " * 12


@pytest.fixture(scope="module")
def made(tiny):
    ids = encode(tiny.tokenizer, PromptFormat.for_tokenizer(tiny.tokenizer).context_part(CONTEXT))
    kv, _ = prefill(tiny, ids)
    layer_codecs = codecs.resolve("int8", tiny.num_layers)
    plan = CardPlan("int8", layer_codecs)
    return ids, kv, *build_card(tiny.fingerprint, ids, kv, plan)


def read(tiny, stream, max_card_bytes=1 << 30):
    reader = CardReader(tiny.fingerprint, max_card_bytes)
    decoded = {}
    for frame in stream:
        ready = reader.feed(frame)
        if ready is not None:
            decoded[ready] = reader.decode_layer(ready, torch.device("cpu"), torch.float32)
    return reader.finish(), decoded


def test_round_trip_small_chunks(tiny, made):
    ids, kv, header, blobs = made
    stream = list(frames(header, blobs, chunk_bytes=1000))
    chunks = [f.chunk for f in stream if f.HasField("chunk")]
    assert len(chunks) > tiny.num_layers  # layers really were split
    assert all(len(c.data) <= 1000 for c in chunks)
    got, decoded = read(tiny, stream)
    assert got.card_id == header.card_id and got.context_tokens == len(ids)
    for i in range(tiny.num_layers):
        k, v = decoded[i]
        assert k.shape == kv.keys[i].shape
        # 8-bit per token: error bounded by half a step of each token's range
        step = (kv.keys[i].amax(-1, keepdim=True) - kv.keys[i].amin(-1, keepdim=True)) / 255
        assert ((k - kv.keys[i]).abs() <= step / 2 + 1e-3).all()


def test_card_id_is_a_content_hash(tiny, made):
    ids, kv, header, _ = made
    again, _ = build_card(tiny.fingerprint, ids, kv, CardPlan("int8", codecs.resolve("int8", tiny.num_layers)))
    other, _ = build_card(tiny.fingerprint, ids, kv, CardPlan("fp16", codecs.resolve("fp16", tiny.num_layers)))
    assert again.card_id == header.card_id != other.card_id


def test_an_id_names_its_content_only(tiny, made):
    """A card relabelled with another card's id, or with its data swapped under a real header, is
    refused at the trailer even when its framing (CRCs, digest) is made honestly for the lie."""
    ids, kv, header, blobs = made
    other, other_blobs = build_card(tiny.fingerprint, ids, kv,
                                    CardPlan("fp16", codecs.resolve("fp16", tiny.num_layers)))
    relabelled = pb.CardHeader()
    relabelled.CopyFrom(other)
    relabelled.card_id = header.card_id
    _expect(tiny, frames(relabelled, other_blobs), ErrorKind.INVALID, "id does not match its content")
    swapped = [bytes(len(b)) for b in blobs]  # same sizes, other data, under the real header
    _expect(tiny, frames(header, swapped), ErrorKind.INVALID, "id does not match its content")


def _expect(tiny, stream, kind, match, **kw):
    with pytest.raises(CardError, match=match) as err:
        read(tiny, stream, **kw)
    assert err.value.kind == kind


def test_truncated_stream(tiny, made):
    stream = list(frames(*made[2:]))
    _expect(tiny, stream[:-2], ErrorKind.DATA_LOSS, "truncated")
    _expect(tiny, [], ErrorKind.DATA_LOSS, "before the header")


def test_wrong_checksum(tiny, made):
    stream = list(frames(*made[2:]))
    stream[2].chunk.data = bytes([stream[2].chunk.data[0] ^ 1]) + stream[2].chunk.data[1:]
    _expect(tiny, stream, ErrorKind.DATA_LOSS, "CRC32C")


def test_digest_mismatch(tiny, made):
    stream = list(frames(*made[2:]))
    stream[-1].trailer.sha256 = bytes(32)
    _expect(tiny, stream, ErrorKind.DATA_LOSS, "digest")


def test_unknown_version(tiny, made):
    stream = list(frames(*made[2:]))
    stream[0].header.format_version = FORMAT_VERSION + 1
    _expect(tiny, stream, ErrorKind.PRECONDITION, f"version {FORMAT_VERSION + 1} is not supported")


def test_wrong_model(tiny, made):
    from conftest import tiny_model

    other = tiny_model(seed=1)  # same shapes, other weights
    assert dataclasses.astuple(other.fingerprint)[1:7] == dataclasses.astuple(tiny.fingerprint)[1:7]
    _expect(other, frames(*made[2:]), ErrorKind.PRECONDITION, "differ in weights_sha256")


def test_oversized_chunk(tiny, made):
    stream = list(frames(*made[2:]))
    stream[1].chunk.data = bytes(MAX_CHUNK_BYTES + 1)
    _expect(tiny, stream, ErrorKind.INVALID, "limit")


def test_card_over_the_receiver_limit(tiny, made):
    _expect(tiny, frames(*made[2:]), ErrorKind.TOO_LARGE, "exceeds", max_card_bytes=100)


def test_frames_out_of_order_or_malformed(tiny, made):
    stream = list(frames(*made[2:]))
    _expect(tiny, [stream[1]], ErrorKind.INVALID, "must start with its header")
    _expect(tiny, [stream[0], stream[2]], ErrorKind.DATA_LOSS, "expected")
    _expect(tiny, [stream[0], stream[0]], ErrorKind.INVALID, "second card header")
    _expect(tiny, [*stream, stream[1]], ErrorKind.INVALID, "after the card trailer")
    bad = pb.CardFrame()
    bad.CopyFrom(stream[0])
    bad.header.layers[0].key_bytes += 1
    _expect(tiny, [bad], ErrorKind.INVALID, "sizes do not match")
    _expect(tiny, [stream[0], pb.CardFrame()], ErrorKind.INVALID, "empty frame")


def test_the_sender_keeps_recent_contexts_and_their_cards_stay_the_same(tiny, monkeypatch):
    from qkv_core.engine import sender

    calls = []
    monkeypatch.setattr(sender, "prefill", lambda *a, **k: calls.append(1) or prefill(*a, **k))
    keeping, fresh = sender.SenderEngine(tiny, cache_bytes=1 << 20), sender.SenderEngine(tiny)
    first, again = keeping.prepare(CONTEXT, "int8"), keeping.prepare(CONTEXT, "int8")
    assert len(calls) == 1  # the second is a lookup
    other = fresh.prepare(CONTEXT, "int8")
    assert first.header.card_id == again.header.card_id == other.header.card_id  # the same KV, bit for bit
    assert keeping._prefilled.nbytes > 0 and not fresh._prefilled.nbytes
    small = sender.SenderEngine(tiny, cache_bytes=keeping._prefilled.nbytes)  # room for one context
    small.prepare(CONTEXT, "int8")
    small.prepare(CONTEXT + " More.", "int8")
    assert len(small._prefilled) == 1 and small._prefilled.nbytes <= keeping._prefilled.nbytes + 4096


def test_a_card_names_its_context_by_the_digest_of_its_token_ids(tiny, made):
    from qkv_core.card.naming import context_digest

    ids, _, header, _ = made
    assert len(header.context_ids_sha256) == 32 and header.context_ids_sha256 == context_digest(ids)
    assert context_digest(ids[:-1]) != header.context_ids_sha256 and context_digest([]) != context_digest([0])


def test_a_card_takes_the_oldest_version_that_undoes_its_tools_and_older_readers_refuse_it(tiny, made, monkeypatch):
    ids, kv, header, _ = made
    assert header.format_version == 2  # no tool a version-2 receiver would not undo: still readable by it
    for name, version in (("kivi-4+rot", 3), ("kivi-4+zstd", 3), ("kivi-4+prerope", 3), ("kivi-4+lloyd", 4),
                          ("kivi-4+out10", 4), ("kivi-4+s8", 4), ("kivi-4+rot+s8", 4)):
        tooled, blobs = build_card(tiny.fingerprint, ids, kv, CardPlan(name, codecs.resolve(name, tiny.num_layers)))
        assert tooled.format_version == version, name
        read(tiny, frames(tooled, blobs))
        # a receiver from before them
        monkeypatch.setattr("qkv_core.card.reader.READABLE_VERSIONS", tuple(range(2, version)))
        _expect(tiny, frames(tooled, blobs), ErrorKind.PRECONDITION, f"version {version} is not supported")
        monkeypatch.undo()
