"""Blocking clients: `SenderClient` (share, ask) and `ReceiverClient` (generate, has_card); both
answer `info` and `healthy`. Use them as context managers, or call `close()`."""
from __future__ import annotations

import grpc
from qkvcomm.v1 import services_pb2 as pb
from qkvcomm.v1 import services_pb2_grpc

from qkvcomm_client import mirrors
from qkvcomm_client.answers import Answer, AnswerStream, OnText
from qkvcomm_client.base import Connection, ask_request, generate_request, share_request
from qkvcomm_client.errors import raised_as_qkvcomm


class _Client(Connection):
    def __init__(self, address: str, **settings):
        super().__init__(address, **settings, aio=False)

    def info(self, timeout_s: float | None = None) -> pb.InfoResponse:
        """The service's version, model, device, codecs, limits and features."""
        with raised_as_qkvcomm():
            return self._info.Info(pb.InfoRequest(), **self._call(timeout_s))

    def healthy(self, service: str = "", timeout_s: float = 3.0) -> bool:
        """True when the service answers grpc.health.v1 with SERVING (no token needed)."""
        return self.health(service, timeout_s) == "SERVING"

    def health(self, service: str = "", timeout_s: float = 3.0) -> str:
        """SERVING or NOT_SERVING as the service answers, or UNREACHABLE when nothing answers."""
        try:
            reply = self._health(mirrors.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
        return "SERVING" if reply.status == mirrors.SERVING else "NOT_SERVING"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SenderClient(_Client):
    """A client of a sender (qkvcomm.v1.SenderService): it holds the contexts and hands them on."""

    def __init__(self, address: str, **settings):
        super().__init__(address, **settings)
        self._stub = services_pb2_grpc.SenderServiceStub(self._channel)

    def share(self, context: str, *, codec: str = "", facts: bool = False, layer_ratio: float = 0.0,
              layer_method: str = "", session: str = "", timeout_s: float | None = None) -> pb.HandoffStats:
        """Hand `context` to the receiver as a card (unless it holds it); the handoff's stats.
        Empty settings take the sender's defaults. With a `session`, `context` is appended to the
        session's context so far, and only the new tokens travel (a delta card)."""
        with raised_as_qkvcomm():
            return self._stub.Share(share_request(context, codec, facts, layer_ratio, layer_method, session),
                                    **self._call(timeout_s)).stats

    def ask_stream(self, context: str, question: str, *, codec: str = "", facts: bool = False,
                   max_new_tokens: int = 0, layer_ratio: float = 0.0, layer_method: str = "", session: str = "",
                   on_text: OnText | None = None, timeout_s: float | None = None) -> AnswerStream:
        """Share `context`, then ask `question` of the receiver: iterate for the answer's pieces."""
        request = ask_request(context, question, codec, facts, max_new_tokens, layer_ratio, layer_method, session)
        return AnswerStream(self._stub.Ask(request, **self._call(timeout_s)), on_text)

    def ask(self, context: str, question: str, **settings) -> Answer:
        """`ask_stream` to the end: the whole answer and the handoff's stats."""
        return self.ask_stream(context, question, **settings).drain()


class ReceiverClient(_Client):
    """A client of a receiver (qkvcomm.v1.ReceiverService): it holds cards and answers on them."""

    def __init__(self, address: str, **settings):
        super().__init__(address, **settings)
        self._stub = services_pb2_grpc.ReceiverServiceStub(self._channel)

    def generate_stream(self, card_id: str, query: str, *, max_new_tokens: int = 0, facts: bool = False,
                        on_text: OnText | None = None, timeout_s: float | None = None) -> AnswerStream:
        """Answer `query` on a held card: iterate for the answer's pieces."""
        call = self._stub.Generate(generate_request(card_id, query, max_new_tokens, facts), **self._call(timeout_s))
        return AnswerStream(call, on_text)

    def generate(self, card_id: str, query: str, **settings) -> Answer:
        return self.generate_stream(card_id, query, **settings).drain()

    def has_card(self, card_id: str, timeout_s: float | None = None) -> pb.HasCardResponse:
        """Whether the caller's tenant holds the card (`present`), and its `context_tokens`."""
        with raised_as_qkvcomm():
            return self._stub.HasCard(pb.HasCardRequest(card_id=card_id), **self._call(timeout_s))
