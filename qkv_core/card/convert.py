"""The wire form of the library's values in a card: model fingerprints and tensor codecs to and
from their protobuf messages (a codec's tool fields as qkv_core.codec.tools's table says), and the
ErrorInfo details of a model mismatch."""
from __future__ import annotations

from typing import Any

from qkv_core.codec.tensor_codec import Granularity, TensorCodec
from qkv_core.codec.tools import TOOLS
from qkv_core.errors import CardError, ErrorKind
from qkv_core.types import Fingerprint
from qkv_core.wire import pb


def model_details(sender: Fingerprint, receiver: Fingerprint) -> dict[str, str]:
    """The ErrorInfo metadata of a model mismatch: both models, by name and weights hash."""
    return {"sender_model": sender.name, "sender_weights": sender.weights_sha256[:16],
            "receiver_model": receiver.name, "receiver_weights": receiver.weights_sha256[:16],
            "differ_in": ",".join(receiver.mismatch(sender))}


def fingerprint_to_pb(fp: Fingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(**fp.__dict__)


def fingerprint_from_pb(msg: pb.ModelFingerprint) -> Fingerprint:
    return Fingerprint(**{f: getattr(msg, f) for f in Fingerprint.__dataclass_fields__})


def codec_to_pb(c: TensorCodec) -> pb.TensorCodec:
    """The wire form of a tensor codec: its base fields, then each tool's field (qkv_core.codec.tools)."""
    base: dict[str, Any] = {
        "bits": c.bits, "granularity": int(c.granularity), "group_size": c.group_size,
        "sink_tokens": c.sink_tokens, "recent_tokens": c.recent_tokens, "salient_bits": c.salient_bits}
    return pb.TensorCodec(**base, **{t.proto_field: t.to_wire(getattr(c, t.field)) for t in TOOLS
                                     if t.proto_field not in base})


def codec_from_pb(msg: pb.TensorCodec) -> TensorCodec:
    try:
        base: dict[str, Any] = {
            "bits": msg.bits, "granularity": Granularity(msg.granularity), "group_size": msg.group_size,
            "sink_tokens": msg.sink_tokens, "recent_tokens": msg.recent_tokens, "salient_bits": msg.salient_bits}
        return TensorCodec(**base, **{t.field: t.from_wire(getattr(msg, t.proto_field)) for t in TOOLS
                                      if t.field not in base})
    except ValueError as e:
        raise CardError(ErrorKind.INVALID, f"bad tensor codec in card: {e}") from e
