"""What the sync and asyncio clients share: the connection settings, the channel and the requests."""
from __future__ import annotations

from collections.abc import Sequence

from qkvcomm.v1 import services_pb2 as pb
from qkvcomm.v1 import services_pb2_grpc

from qkvcomm_client import mirrors
from qkvcomm_client.channel import ClientTLS, call_metadata, check_token_transport, open_channel, retry_options

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Connection:
    """One channel to one service, reused by every call, with the caller's credentials and default deadline.

    address    HOST:PORT of the service
    tls        how to reach a TLS service (plaintext when empty)
    token      bearer token, for services that require one; never sent in plaintext off loopback
               unless `tls.insecure` (PlaintextToken)
    tenant     the tenant to act for (a relay token, tenant '*', only)
    timeout_s  the deadline of a call that names none
    retries    extra attempts of the idempotent calls on UNAVAILABLE (channel.py); 0: none
    options    further gRPC channel options
    """

    def __init__(self, address: str, *, tls: ClientTLS = ClientTLS(), token: str = "", tenant: str = "",
                 timeout_s: float = 600.0, retries: int = 2, options: Sequence[tuple[str, object]] = (),
                 aio: bool = False):
        self.address = address
        self.timeout_s = timeout_s
        check_token_transport(address, tls, token)
        self._metadata = call_metadata(token, tenant)
        self._channel = open_channel(address, tls, [*retry_options(retries), *options], aio=aio)
        self._info = services_pb2_grpc.InfoServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=mirrors.HealthCheckRequest.SerializeToString,
            response_deserializer=mirrors.HealthCheckResponse.FromString,
        )

    def _call(self, timeout_s: float | None) -> dict:
        """The keyword arguments of a call: its deadline and the credentials."""
        return {"timeout": self.timeout_s if timeout_s is None else timeout_s, "metadata": self._metadata}


def share_request(context: str, codec: str, facts: bool, layer_ratio: float, layer_method: str,
                  session: str) -> pb.ShareRequest:
    return pb.ShareRequest(context=context, codec=codec, facts=facts, layer_ratio=layer_ratio,
                           layer_method=layer_method, session=session)


def ask_request(context: str, question: str, codec: str, facts: bool, max_new_tokens: int, layer_ratio: float,
                layer_method: str, session: str) -> pb.AskRequest:
    return pb.AskRequest(context=context, question=question, codec=codec, facts=facts, max_new_tokens=max_new_tokens,
                         layer_ratio=layer_ratio, layer_method=layer_method, session=session)


def generate_request(card_id: str, query: str, max_new_tokens: int, facts: bool) -> pb.GenerateRequest:
    return pb.GenerateRequest(card_id=card_id, query=query, max_new_tokens=max_new_tokens, facts=facts)
