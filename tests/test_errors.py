"""Whose fault an error is decides its status: the client's never comes back INTERNAL, the server's always does."""
import grpc
import pytest
from google.protobuf.message import DecodeError

from qkv_core.errors import CardError, ErrorKind, LimitExceeded, RequestError, Unsupported
from service_common.errors import IdleTimeout, status_of


@pytest.mark.parametrize(("error", "code", "reason"), [
    (RequestError("unknown codec 'x'"), grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    (Unsupported("sliding-window layers"), grpc.StatusCode.FAILED_PRECONDITION, "precondition"),
    (LimitExceeded("max_intakes"), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
    (DecodeError("Error parsing message"), grpc.StatusCode.INVALID_ARGUMENT, "undecodable"),
    (IdleTimeout("idle"), grpc.StatusCode.DEADLINE_EXCEEDED, "idle"),
    (CardError(ErrorKind.DATA_LOSS, "crc"), grpc.StatusCode.DATA_LOSS, "data_loss"),
    (ValueError("KV values are not finite"), grpc.StatusCode.INTERNAL, "internal"),  # a server fault
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "internal"),
])
def test_each_error_kind_maps_to_its_status(error, code, reason):
    got, message, got_reason = status_of(error)
    assert (got, got_reason) == (code, reason)
    assert str(error) in message


def test_capability_refusals_are_preconditions_not_client_errors(tiny):
    from qkv_core.model.attention import require_full_attention

    tiny.model.config.sliding_window = 16
    try:
        with pytest.raises(Unsupported, match="sliding-window"):
            require_full_attention(tiny.model, "tiny")
    finally:
        tiny.model.config.sliding_window = None
    with pytest.raises(RequestError, match="unknown codec"):
        from qkv_core.codec.registry import resolve
        resolve("no-such-codec", 3)
