"""asyncio clients (grpc.aio): `AsyncSenderClient` and `AsyncReceiverClient`, the same calls as
the blocking ones, awaited. Use them with `async with`, or `await close()`."""
from __future__ import annotations

import grpc
from qkvcomm.v1 import services_pb2 as pb
from qkvcomm.v1 import services_pb2_grpc

from qkvcomm_client import mirrors
from qkvcomm_client.answers import Answer, AsyncAnswerStream, OnText
from qkvcomm_client.base import Connection, ask_request, generate_request, share_request
from qkvcomm_client.errors import raised_as_qkvcomm


class _AsyncClient(Connection):
    def __init__(self, address: str, **settings):
        super().__init__(address, **settings, aio=True)

    async def info(self, timeout_s: float | None = None) -> pb.InfoResponse:
        with raised_as_qkvcomm():
            return await self._info.Info(pb.InfoRequest(), **self._call(timeout_s))

    async def healthy(self, service: str = "", timeout_s: float = 3.0) -> bool:
        try:
            reply = await self._health(mirrors.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == mirrors.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSenderClient(_AsyncClient):
    def __init__(self, address: str, **settings):
        super().__init__(address, **settings)
        self._stub = services_pb2_grpc.SenderServiceStub(self._channel)

    async def share(self, context: str, *, codec: str = "", facts: bool = False, layer_ratio: float = 0.0,
                    layer_method: str = "", session: str = "", timeout_s: float | None = None) -> pb.HandoffStats:
        with raised_as_qkvcomm():
            reply = await self._stub.Share(share_request(context, codec, facts, layer_ratio, layer_method, session),
                                           **self._call(timeout_s))
        return reply.stats

    def ask_stream(self, context: str, question: str, *, codec: str = "", facts: bool = False,
                   max_new_tokens: int = 0, layer_ratio: float = 0.0, layer_method: str = "", session: str = "",
                   on_text: OnText | None = None, timeout_s: float | None = None) -> AsyncAnswerStream:
        request = ask_request(context, question, codec, facts, max_new_tokens, layer_ratio, layer_method, session)
        return AsyncAnswerStream(self._stub.Ask(request, **self._call(timeout_s)), on_text)

    async def ask(self, context: str, question: str, **settings) -> Answer:
        return await self.ask_stream(context, question, **settings).drain()


class AsyncReceiverClient(_AsyncClient):
    def __init__(self, address: str, **settings):
        super().__init__(address, **settings)
        self._stub = services_pb2_grpc.ReceiverServiceStub(self._channel)

    def generate_stream(self, card_id: str, query: str, *, max_new_tokens: int = 0, facts: bool = False,
                        on_text: OnText | None = None, timeout_s: float | None = None) -> AsyncAnswerStream:
        call = self._stub.Generate(generate_request(card_id, query, max_new_tokens, facts), **self._call(timeout_s))
        return AsyncAnswerStream(call, on_text)

    async def generate(self, card_id: str, query: str, **settings) -> Answer:
        return await self.generate_stream(card_id, query, **settings).drain()

    async def has_card(self, card_id: str, timeout_s: float | None = None) -> pb.HasCardResponse:
        with raised_as_qkvcomm():
            return await self._stub.HasCard(pb.HasCardRequest(card_id=card_id), **self._call(timeout_s))
