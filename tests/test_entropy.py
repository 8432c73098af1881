"""Entropy coding of encoded tensors (codec option `+zstd`): the frame's content byte for byte,
lossless round trips on random codes (hypothesis) and on a real model's codes, the grammar, and
bad frames refused as invalid cards before anything is inflated."""
from __future__ import annotations

import math

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.card.naming import name_card
from qkv_core.card.reader import CardReader
from qkv_core.codec import entropy, registry
from qkv_core.codec.allocation import allocate
from qkv_core.codec.encoding import encode_layers
from qkv_core.codec.quant import dequantize, encoded_size, quantize
from qkv_core.codec.tensor_codec import Entropy, Granularity, TensorCodec
from qkv_core.codec.tools import ROTATION_SEED
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import CardError, ErrorKind, RequestError
from qkv_core.model.kv import next_logits, prefill
from qkv_core.model.prompt import encode
from qkv_core.types import KVCache
from qkv_eval.bench import Row, pays_below_gbps, table
from tests.conftest import qa_rows, replaced, synthetic_profile

ZSTD = Entropy.ZSTD
MAGIC = [0x28, 0xB5, 0x2F, 0xFD]  # a zstd frame (RFC 8878)


def content(blob: torch.Tensor) -> list[int]:
    return list(zstandard.ZstdDecompressor().decompress(bytes(blob.tolist())))


def test_the_frame_holds_the_codes_in_row_order_at_an_aligned_width():
    # [1 head, 3 tokens, 2 channels]; per channel, 2 bits: channel 0 is 0,1,3 and channel 1 is 3,0,2
    # over the tokens, each with zero 0 and scale 1 (fp16 0x3C00)
    x = torch.tensor([[[0.0, 3.0], [1.0, 0.0], [3.0, 2.0]]])
    coded = quantize(x, TensorCodec(2, Granularity.PER_CHANNEL, entropy=ZSTD))
    assert coded.tolist()[:4] == MAGIC
    # row order (channel by channel), four 2-bit codes a byte LSB first: 0|1<<2|3<<4|3<<6, 0|2<<2
    assert content(coded) == [0xF4, 0x08, 0x00, 0x3C, 0x00, 0x3C, 0, 0, 0, 0]
    # the plain layout keeps the tensor's order (token by token): 0,3,1,0 | 3,2
    assert quantize(x, TensorCodec(2, Granularity.PER_CHANNEL)).tolist()[:2] == [0x1C, 0x0B]
    assert torch.equal(dequantize(coded, TensorCodec(2, Granularity.PER_CHANNEL, entropy=ZSTD), x.shape, torch.float32),
                       x)
    # 3-bit codes are packed at 4 bits, two a byte, so none straddles a byte: 0|7<<4, 1|5<<4, 2
    per_token = TensorCodec(3, Granularity.PER_TOKEN, entropy=ZSTD)
    packed = content(quantize(torch.tensor([[[0.0, 7.0, 1.0, 5.0, 2.0]]]), per_token))
    assert packed == [0x70, 0x51, 0x02, 0x00, 0x3C, 0, 0]
    assert encoded_size(per_token, 1, 1, 5) == 7


def test_aligned_widths_and_the_bound():
    assert [entropy.aligned_width(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert entropy.bound(0) == 64  # zstd.h: ZSTD_COMPRESSBOUND(0)
    assert entropy.bound(1 << 20) == (1 << 20) + (1 << 12)
    noise = torch.randint(0, 256, (100_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert noise.numel() < entropy.compress(noise).numel() <= entropy.bound(noise.numel())  # incompressible


CODECS = st.builds(
    TensorCodec,
    bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 16, 32]),
    granularity=st.sampled_from(list(Granularity)),
    group_size=st.just(4),
    sink_tokens=st.integers(0, 3),
    recent_tokens=st.integers(0, 3),
    rotation=st.sampled_from([0, 5]),
)


@settings(max_examples=80, deadline=None)
@given(codec=CODECS, heads=st.integers(1, 3), tokens=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_entropy_coding_is_lossless_on_random_tensors(codec, heads, tokens, seed):
    x = torch.randn(heads, tokens, 8, generator=torch.Generator().manual_seed(seed)) * 3
    coded = TensorCodec(**{**codec.__dict__, "entropy": ZSTD})
    blob = quantize(x, coded)
    assert blob.numel() <= entropy.bound(encoded_size(coded, heads, tokens, 8))
    assert torch.equal(dequantize(blob, coded, x.shape, torch.float32),
                       dequantize(quantize(x, codec), codec, x.shape, torch.float32))


def test_the_grammar():
    layer = registry.resolve("kivi-2+rot+zstd", 1)[0]
    assert layer == registry.resolve("kivi-2+zstd+rot", 1)[0]
    assert (layer.key.entropy, layer.key.rotation, layer.value.entropy) == (ZSTD, ROTATION_SEED, ZSTD)
    assert registry.spec_of(layer.key) == "2/channel+rot+zstd"
    spec = registry.resolve("k=3/channel;v=2/token+zstd", 1)[0]  # a spec's suffix is its tensor's
    assert (spec.key.entropy, spec.value.entropy) == (Entropy.NONE, ZSTD)
    assert registry.resolve("fp16+zstd", 1)[0].key == TensorCodec(16, entropy=ZSTD)
    with pytest.raises(RequestError, match="allocated per model"):
        registry.resolve("budget-3+zstd+rot", 2)
    kind = registry.adaptive("budget-3+zstd")
    assert kind is not None and kind.entropy and kind.bits == 3.0 and kind.profile_tools == ""
    kind = registry.adaptive("budget-2+zstd+prerope+rot")  # any order; the profile's tools in one
    assert kind is not None and kind.entropy and kind.profile_tools == "+rot+prerope"
    with pytest.raises(RequestError, match="takes \\+zstd only"):
        registry.adaptive("tokenmix-3+rot")
    assert registry.adaptive("budget-3") is not None and not registry.adaptive("budget-3").entropy
    kv = KVCache([torch.randn(2, 200, 16)] * 2, [torch.randn(2, 200, 16)] * 2)
    layers = allocate(registry.adaptive("tokenmix-6+zstd"), [], kv, torch.rand(200)).layers
    assert all(t.entropy == ZSTD for c in layers for t in (c.key, c.value))


@pytest.fixture(scope="module")
def coded_card(tiny):
    ids = encode(tiny.tokenizer, "The rate limit is 600 requests per minute. " * 12)
    kv, _ = prefill(tiny, ids)
    plan = CardPlan("kivi-2+zstd", registry.resolve("kivi-2+zstd", tiny.num_layers))
    header, blobs = build_card(tiny.fingerprint, ids, kv, plan)
    return header, blobs


def _read(tiny, header, blobs):
    reader = CardReader(tiny.fingerprint, 1 << 30)
    for frame in frames(header, blobs):
        ready = reader.feed(frame)
        if ready is not None:
            reader.decode_layer(ready, torch.device("cpu"), torch.float32)
    return reader.finish()


def _forged(header, blobs, layer: int, key_blob: bytes):
    """The card with one layer's K replaced by `key_blob`, sizes and id made consistent: only the
    reader's checks of the frame stand in between."""
    blobs = list(blobs)
    spec = header.layers[layer]
    blobs[layer] = key_blob + blobs[layer][spec.key_bytes :]
    out = replaced(header)
    out.layers[layer].key_bytes = len(key_blob)
    out.payload_bytes = sum(map(len, blobs))
    name_card(out, blobs)
    return out, blobs


def test_a_coded_card_reads_back_and_bad_frames_are_invalid(tiny, coded_card):
    header, blobs = coded_card
    assert _read(tiny, header, blobs).card_id == header.card_id
    key = blobs[0][: header.layers[0].key_bytes]
    plain = zstandard.ZstdDecompressor().decompress(key)
    other = zstandard.ZstdCompressor().compress(plain + b"\0")  # a valid frame, one byte too many
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 20))  # 1 MiB of zeros in 49 bytes
    for bad, match in [
        (b"\x00" * len(key), "not one valid zstd frame"),
        (key[:-3], "not one valid zstd frame"),
        (key + b"\x00", "not one valid zstd frame"),
        (other, "declares"),
        (bomb, "declares"),
    ]:
        with pytest.raises(CardError, match=match) as err:
            _read(tiny, *_forged(header, blobs, 0, bad))
        assert err.value.kind == ErrorKind.INVALID
    # a frame larger than zstd's bound on the layout is refused at the header, before any byte
    with pytest.raises(CardError, match="sizes do not match") as err:
        _read(tiny, *_forged(header, blobs, 0, key + bytes(entropy.bound(len(plain)))))
    assert err.value.kind == ErrorKind.INVALID


@pytest.mark.integration
def test_real_codes_shrink_and_the_receiver_sees_the_same_cache(embedded):
    """SmolLM2's kivi-2 codes of a SQuAD context: the coded card is much smaller, and the receiver's
    cache and next-token logits are bit-identical to the plain card's."""
    sender, receiver = SenderEngine(embedded), ReceiverEngine(embedded)
    context, question = (lambda r: (r["context"], r["question"]))(qa_rows("squad.jsonl", 1)[0])
    ids = encode(embedded.tokenizer, sender.prompt.context_part(context))
    kv, _ = sender.prefill(ids)
    taken, wire = {}, {}
    for name in ("kivi-2+rot", "kivi-2+rot+zstd"):
        header, blobs = build_card(embedded.fingerprint, ids, kv, sender.allocate(sender.codec(name), kv, None))
        wire[name] = header.payload_bytes
        taken[name] = receiver.accept(frames(header, blobs)).kv
    assert wire["kivi-2+rot+zstd"] < 0.9 * wire["kivi-2+rot"]
    plain, coded = taken["kivi-2+rot"], taken["kivi-2+rot+zstd"]
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, coded.keys + coded.values))
    q = encode(embedded.tokenizer, sender.prompt.query_part(question))
    assert torch.equal(next_logits(embedded, plain, q), next_logits(embedded, coded, q))


def test_a_coded_budget_holds_on_the_wire_after_coding():
    """budget-B+zstd measures each option's coded bytes: the card fits B bits after coding and
    spends the bytes coding saves on wider codes than budget-B can afford."""
    g = torch.Generator().manual_seed(0)
    # smooth, low-entropy rows compress well, so coding frees bytes for the allocator to spend
    kv = KVCache([torch.randn(3, 400, 64, generator=g).cumsum(1) for _ in range(30)],
                 [torch.randn(3, 400, 64, generator=g).cumsum(1) for _ in range(30)])
    elements = 2 * 30 * 3 * 400 * 64

    def wire_bits(name):
        layers = allocate(registry.adaptive(name), [synthetic_profile()], kv).layers
        blobs = encode_layers(kv, layers, range(30))
        return 8 * sum(len(k) + len(v) for k, v in blobs) / elements, sum(c.key.bits + c.value.bits for c in layers)

    plain_bits, plain_width = wire_bits("budget-3")
    coded_bits, coded_width = wire_bits("budget-3+zstd")
    assert 2.9 <= coded_bits <= 3.0 and 2.9 <= plain_bits <= 3.0
    assert coded_width > plain_width


def test_the_link_speed_below_which_coding_pays():
    plain = Row("kivi-2", "cpu", 2.25, 7.1, 0.3, 0.4, quant_gbps=2.0, dequant_gbps=2.0)
    coded = Row("kivi-2+zstd", "cpu", 1.75, 9.1, 0.3, 0.4, quant_gbps=1.0, dequant_gbps=1.0)
    # 0.5 bits saved per fp16 element (0.25 Gbit per GB of cache) against 0.5 + 0.5 s per GB added
    assert pays_below_gbps(plain, coded) == pytest.approx(0.25)
    assert pays_below_gbps(plain, Row(**{**coded.__dict__, "quant_gbps": 4.0, "dequant_gbps": 4.0})) == math.inf
    assert pays_below_gbps(plain, Row(**{**coded.__dict__, "bits_per_element": 2.2499})) is None  # a budget: no saving
    rows = table([plain, coded], 1024, "m")
    assert "| kivi-2+zstd | cpu | 1.75 | 9.10 | 0.3000 | 0.4000 | 1.00 | 1.00 | 0.25 |" in rows
