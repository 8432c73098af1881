"""The protobuf messages of proto/qkvcomm/v1, as one namespace: `pb.CardHeader`, `pb.AskRequest`, ...

The modules are generated from proto/ by `make proto` (grpcio-tools); they are build
outputs, never edited or committed.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import SimpleNamespace

try:
    from qkvcomm.v1 import card_pb2, services_pb2
except ImportError as e:  # pragma: no cover - only without generated stubs
    raise ImportError("protobuf stubs are missing: run `make proto` (or `make run`) first") from e

pb = SimpleNamespace(
    **{name: getattr(card_pb2, name) for name in card_pb2.DESCRIPTOR.message_types_by_name},
    **{name: getattr(services_pb2, name) for name in services_pb2.DESCRIPTOR.message_types_by_name},
)


def push_requests(frames: Iterable[pb.CardFrame]) -> Iterator[pb.PushCardRequest]:  # type: ignore[name-defined]
    """A card's frames as ReceiverService.PushCard's request stream."""
    for frame in frames:
        yield pb.PushCardRequest(frame=frame)
