"""What travels: the protobuf messages (`pb`, re-exported from qkv_core.pb) and the request
streams built from them."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from qkv_core import pb

__all__ = ["pb", "push_requests"]


def push_requests(frames: Iterable[pb.CardFrame]) -> Iterator[pb.PushCardRequest]:
    """A card's frames as ReceiverService.PushCard's request stream."""
    for frame in frames:
        yield pb.PushCardRequest(frame=frame)
