"""The decision of `codec = "auto"`: the option with the lowest predicted time to first token.

The time predicted is the handoff's, from the moment the sender holds the context's KV (an
agent has read its context before it hands it on; the text option needs no KV at all) to the
receiver's first token:

    text    rtt + text_bytes / throughput + tokens / prefill_rate            + first_token
    card    fp16_bytes / quantize_rate + rtt + max(wire_bytes / throughput, fp16_bytes / dequantize_rate)
            + (fp16_bytes / layers) / dequantize_rate                       + first_token

A card is quantized whole before it streams; the receiver decodes each layer as soon as it has
arrived, so only the last layer's decode follows the wire (unless decoding is the slower of the
two). Units: bytes, seconds, bytes/s, tokens/s. An option whose predicted quality loss (the
calibrated next-token KL, nats; 0 for text and fp16) exceeds the floor is never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qkv_core.codec.registry import TEXT
from qkv_core.errors import RequestError


@dataclass(frozen=True)
class Link:
    throughput: float  # bytes/s, sender to receiver, as the sender measured its transfers
    rtt_s: float


@dataclass(frozen=True)
class Receiver:
    prefill_tokens_per_s: float
    first_token_s: float  # a question (~24 tokens) on a held cache to its first token
    dequantize_bytes_per_s: float  # fp16-equivalent KV bytes decoded per second


@dataclass(frozen=True)
class Option:
    name: str  # "text" or a codec name
    wire_bytes: int
    quality_loss: float = 0.0  # predicted next-token KL (nats)
    quantize_bytes_per_s: float = 0.0  # the sender's rate on this codec (fp16 bytes/s); text: unused
    fp16_bytes: int = 0  # the KV it encodes at fp16: a delta's own tokens only; 0: the whole context's
    reused_tokens: int = 0  # a delta: the held prefix it extends


@dataclass(frozen=True)
class Request:
    tokens: int
    layers: int
    fp16_bytes: int  # the context's KV at fp16, every layer


@dataclass(frozen=True)
class Scored:
    option: Option
    predicted_s: float
    eligible: bool  # within the quality floor


@dataclass(frozen=True)
class Decision:
    chosen: Scored
    scored: list[Scored] = field(default_factory=list)  # every option, in the order given


def predict(option: Option, request: Request, link: Link, receiver: Receiver) -> float:
    """The predicted handoff time to first token (s) of one option."""
    wire = option.wire_bytes / link.throughput
    if option.name == TEXT:
        return link.rtt_s + wire + request.tokens / receiver.prefill_tokens_per_s + receiver.first_token_s
    kv = option.fp16_bytes or request.fp16_bytes
    encode = kv / option.quantize_bytes_per_s
    decode = kv / receiver.dequantize_bytes_per_s
    return encode + link.rtt_s + max(wire, decode) + decode / request.layers + receiver.first_token_s


def decide(options: list[Option], request: Request, link: Link, receiver: Receiver,
           max_quality_loss: float) -> Decision:
    """The eligible option with the lowest predicted time. Text and fp16 lose nothing, so a
    candidate list that holds either always has an eligible option."""
    scored = [Scored(o, predict(o, request, link, receiver), o.quality_loss <= max_quality_loss) for o in options]
    eligible = [s for s in scored if s.eligible]
    if not eligible:
        raise RequestError(f"no auto candidate for this request is within the quality floor {max_quality_loss} "
                           "(text cannot carry facts or a layer selection; add fp16 to auto_codecs)")
    return Decision(min(eligible, key=lambda s: s.predicted_s), scored)
