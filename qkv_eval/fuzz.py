"""PushCard fuzzing: a structured mutator over real cards (and raw bytes) against a live receiver.

Each case is one PushCard stream of serialized frames (each wrapped in a well-formed PushCardRequest),
built from a real card by one mutation:

    unsigned  bit flips in chunk data, reordered / duplicated / dropped chunks, a truncated
              stream, a second header, a tampered trailer: the checksums no longer hold, so the
              card must be refused (DATA_LOSS or INVALID_ARGUMENT), never stored;
    signed    a header or layer field set to an odd value, a NaN/Inf written into fp16/fp32
              values, a huge salient list or fact summary, with CRCs and digest recomputed (as
              any client can): refused with a client status, or accepted when still consistent;
              a non-finite value must never be accepted;
    raw       a random serialized frame's bit flipped, random protobuf frames, random bytes.

The verdict: no INTERNAL or UNKNOWN status, no hang (every call has a deadline), no crash (the
receiver answers health checks and takes a clean card afterwards), no non-finite card and no
unsigned mutation accepted. `qkvcomm bench fuzz` runs it (make fuzz: 100,000 cases); the test
suite runs a bounded slice against its own services.
"""
from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.internal.encoder import _VarintBytes

from qkv_core.card.framing import frames
from qkv_core.engine.sender import PreparedCard
from qkv_core.wire import pb

Frames = list[bytes]
CONTEXT = "The vault code is 7731. The vault is in Geneva; it opens at noon on weekdays."
BASE_CODECS = ("fp16", "fp32", "int8", "kivi-2", "kivi-4", "seed-4")
_NONFINITE = (b"\x00\x7e", b"\x00\x7c", b"\x00\xfc")  # fp16 NaN, +Inf, -Inf (little-endian)


def _signed(header: pb.CardHeader, blobs: list[bytes]) -> Frames:
    return [f.SerializeToString() for f in frames(header, blobs, chunk_bytes=32 << 10)]


def _copy(header: pb.CardHeader) -> pb.CardHeader:
    out = pb.CardHeader()
    out.CopyFrom(header)
    return out


def _odd_int(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 7, 31, 64, 255, 256, 4095, 65535, 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])


# --- mutations: (rng, card) -> frames ------------------------------------------------------

def flip_chunk_bit(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    chunk = pb.CardFrame.FromString(out[i := rng.randrange(1, len(out) - 1)])
    data = bytearray(chunk.chunk.data)
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    chunk.chunk.data = bytes(data)
    out[i] = chunk.SerializeToString()
    return out


def reorder_chunks(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    i, j = rng.sample(range(1, len(out) - 1), 2)
    out[i], out[j] = out[j], out[i]
    return out


def duplicate_chunk(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    i = rng.randrange(1, len(out) - 1)
    return out[: i + 1] + [out[i]] + out[i + 1 :]


def drop_chunk(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    del out[rng.randrange(1, len(out) - 1)]
    return out


def truncate(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    return out[: rng.randrange(0, len(out))]


def second_header(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    return out[: (i := rng.randrange(1, len(out)))] + [out[0]] + out[i:]


def tamper_trailer(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    trailer = pb.CardFrame.FromString(out[-1])
    which = rng.choice(["num_chunks", "payload_bytes", "sha256"])
    if which == "sha256":
        trailer.trailer.sha256 = bytes(rng.randrange(256) for _ in range(32))
    else:
        setattr(trailer.trailer, which, getattr(trailer.trailer, which) + rng.choice([-1, 1, 1000]))
    out[-1] = trailer.SerializeToString()
    return out


_HEADER_FIELDS: dict[str, Callable[[random.Random, pb.CardHeader], object]] = {
    "format_version": lambda r, h: _odd_int(r),
    "context_tokens": lambda r, h: r.choice([0, 1, h.context_tokens - 1, h.context_tokens + 1, 10**9, _odd_int(r)]),
    "payload_bytes": lambda r, h: r.choice([0, h.payload_bytes + 1, h.payload_bytes - 1, 2**63, _odd_int(r)]),
    "num_chunks": lambda r, h: _odd_int(r),
    "shared_prefix_tokens": lambda r, h: r.choice([1, 5, h.context_tokens, _odd_int(r)]),
    "card_id": lambda r, h: r.choice(["", "x" * 64, "A" * 64, "0" * 63, "f" * 65, "a" * 100_000]),
    "fact_summary": lambda r, h: "fact " * r.choice([10, 2_000, 200_000]),
    "codec": lambda r, h: r.choice(["", "kivi-9", "x" * 10_000]),
}
_MODEL_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "name", "weights_sha256", "rope")
_CODEC_FIELDS = ("bits", "granularity", "group_size", "sink_tokens", "recent_tokens", "salient_bits")
_LAYER_FIELDS = ("sender_layer", "receiver_layer", "key_bytes", "value_bytes", "tokens")


def header_field(rng: random.Random, card: PreparedCard) -> Frames:
    h = _copy(card.header)
    name = rng.choice(list(_HEADER_FIELDS) + ["model", "salient_tokens", "layer_sources", "drop_layer"])
    if name in _HEADER_FIELDS:
        setattr(h, name, _HEADER_FIELDS[name](rng, h))
    elif name == "model":
        f = rng.choice(_MODEL_FIELDS)
        setattr(h.model, f, "x" if isinstance(getattr(h.model, f), str) else _odd_int(rng))
    elif name == "salient_tokens":
        count = rng.choice([1, 3, 200_000])
        h.salient_tokens[:] = sorted(rng.sample(range(max(count, h.context_tokens) * 2), count))
    elif name == "layer_sources":
        h.layer_sources[:] = [rng.randrange(64) for _ in range(rng.choice([1, 18, 30]))]
    else:
        del h.layers[rng.randrange(len(h.layers))]
    return _signed(h, card.blobs)


def layer_field(rng: random.Random, card: PreparedCard) -> Frames:
    h = _copy(card.header)
    spec = h.layers[rng.randrange(len(h.layers))]
    if rng.random() < 0.5:
        f = rng.choice(_LAYER_FIELDS)
        setattr(spec, f, rng.choice([0, 1, getattr(spec, f) + 1, max(0, getattr(spec, f) - 1), _odd_int(rng)]))
    else:
        codec = rng.choice([spec.key, spec.value])
        f = rng.choice(_CODEC_FIELDS)
        odd = rng.choice([0, 1, 2, 5, 99, 2**31 - 1]) if f == "granularity" else _odd_int(rng)  # an enum is int32
        setattr(codec, f, rng.choice([0, 1, 2, 8, 9, 15, 16, 17, 32, 33, odd]))
    return _signed(h, card.blobs)


def nonfinite(rng: random.Random, card: PreparedCard) -> Frames:
    """A NaN or Inf written over one value of a passthrough (fp16/fp32) card."""
    blobs = [bytearray(b) for b in card.blobs]
    blob = blobs[rng.randrange(len(blobs))]
    value = rng.choice(_NONFINITE)
    if card.header.layers[0].key.bits == 32:
        value = struct.pack("<f", struct.unpack("<e", value)[0])
    at = rng.randrange(len(blob) // len(value)) * len(value)
    blob[at : at + len(value)] = value
    return _signed(card.header, [bytes(b) for b in blobs])


def flip_frame_bit(rng: random.Random, card: PreparedCard) -> Frames:
    out = _signed(card.header, card.blobs)
    raw = bytearray(out[i := rng.randrange(len(out))])
    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    out[i] = bytes(raw)
    return out


def random_protobuf(rng: random.Random, card: PreparedCard) -> Frames:
    def frame() -> bytes:
        f = pb.CardFrame()
        kind = rng.choice(["header", "chunk", "trailer", "none"])
        if kind == "header":
            f.header.CopyFrom(card.header)
            f.header.context_tokens = _odd_int(rng)
        elif kind == "chunk":
            f.chunk.index, f.chunk.layer, f.chunk.offset = (_odd_int(rng) for _ in range(3))
            f.chunk.data = rng.randbytes(rng.randrange(1, 4096))
            f.chunk.crc32c = _odd_int(rng)
        elif kind == "trailer":
            f.trailer.num_chunks, f.trailer.payload_bytes = _odd_int(rng), _odd_int(rng)
        return f.SerializeToString()

    return [frame() for _ in range(rng.randrange(1, 6))]


def random_bytes(rng: random.Random, card: PreparedCard) -> Frames:
    return [rng.randbytes(rng.randrange(1, 2048)) for _ in range(rng.randrange(1, 4))]


UNSIGNED = (flip_chunk_bit, reorder_chunks, duplicate_chunk, drop_chunk, truncate, second_header, tamper_trailer)
SIGNED = (header_field, layer_field, nonfinite)
RAW = (flip_frame_bit, random_protobuf, random_bytes)
MUTATIONS = UNSIGNED + SIGNED + RAW


@dataclass
class Report:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)  # status name -> count
    by_mutation: dict[str, Counter] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the verdict's violations, first few
    seconds: float = 0.0

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        names = sorted(self.statuses)
        lines = [f"| mutation | cases | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
        for m, counts in sorted(self.by_mutation.items()):
            lines.append(f"| {m} | {sum(counts.values())} | " + " | ".join(str(counts.get(n, 0)) for n in names) + " |")
        lines.append(f"| **all** | {self.cases} | " + " | ".join(str(self.statuses[n]) for n in names) + " |")
        verdict = "PASS" if self.ok else "FAIL: " + "; ".join(self.failures)
        return "\n".join(lines) + f"\n\n{self.cases} cases in {self.seconds:.0f} s: {verdict}"


def as_request(frame: bytes) -> bytes:
    """A PushCardRequest holding these frame bytes (field 1, length-delimited), parseable or not:
    the mutations act on the frame, the wrapper stays well-formed."""
    return b"\x0a" + _VarintBytes(len(frame)) + frame


def run(receiver: str, cards: list[PreparedCard], cases: int, seed: int = 0, timeout_s: float = 30.0,
        progress: bool = False) -> Report:
    """`cases` mutated pushes against the receiver at `receiver` (HOST:PORT), round robin over `cards`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    rng = random.Random(seed)
    report = Report()
    start = time.perf_counter()
    with grpc.insecure_channel(receiver, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        push = channel.stream_unary("/qkvcomm.v1.ReceiverService/PushCard", request_serializer=None,
                                    response_deserializer=pb.PushCardResponse.FromString)
        for n in tqdm(range(cases), desc="fuzz PushCard", disable=not progress, mininterval=2):
            card = cards[n % len(cards)]
            mutate = rng.choice(MUTATIONS)
            if mutate is nonfinite and card.header.layers[0].key.bits not in (16, 32):
                mutate = flip_chunk_bit
            stream = mutate(rng, card)
            try:
                push(iter(map(as_request, stream)), timeout=timeout_s)
                status = "OK"
            except grpc.RpcError as e:
                status = e.code().name
            report.cases += 1
            report.statuses[status] += 1
            report.by_mutation.setdefault(mutate.__name__, Counter())[status] += 1
            if status in ("INTERNAL", "UNKNOWN"):
                report.fail(f"{mutate.__name__} -> {status}")
            elif status == "DEADLINE_EXCEEDED":
                report.fail(f"{mutate.__name__} hung past {timeout_s:g} s")
            elif status == "OK" and (mutate in UNSIGNED or mutate is nonfinite):
                report.fail(f"{mutate.__name__} was accepted")
            elif status == "UNAVAILABLE":
                report.fail(f"receiver unavailable after {mutate.__name__} (crashed?)")
                break
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            report.fail("receiver not SERVING after the run")
        clean = cards[0]
        if push(iter(map(as_request, _signed(clean.header, clean.blobs))),
                timeout=timeout_s).card_id != clean.header.card_id:
            report.fail("a clean card was not accepted after the run")
    report.seconds = time.perf_counter() - start
    return report


def base_cards(engine) -> list[PreparedCard]:  # noqa: ANN001 - a SenderEngine
    """Real cards of the receiver's model: every base codec, plus a layer-selected one."""
    from qkv_core.engine.selection import SelectionConfig  # noqa: PLC0415

    cards = [engine.prepare(CONTEXT, codec) for codec in BASE_CODECS]
    cards.append(engine.prepare(CONTEXT, "int8", layers=SelectionConfig(0.5, "prior")))
    return cards
