"""qkvcomm-client: call the Q-KVComm services from Python with grpcio and protobuf only.

    from qkvcomm_client import SenderClient

    with SenderClient("localhost:50062") as sender:
        answer = sender.ask(context, "What is the rate limit?", codec="kivi-4")
        print(answer.text, answer.stats.compression_ratio)

`SenderClient` / `ReceiverClient` block; `AsyncSenderClient` / `AsyncReceiverClient` are their
asyncio twins. Failures raise `QKVCommError` (a grpc.RpcError with the ErrorInfo's reason and
metadata). The generated stubs and messages are in `qkvcomm.v1`.
"""
from qkvcomm_client.aio import AsyncReceiverClient, AsyncSenderClient
from qkvcomm_client.answers import Answer, AnswerStream, AsyncAnswerStream
from qkvcomm_client.channel import ClientTLS, PlaintextToken, call_metadata, check_token_transport, open_channel
from qkvcomm_client.errors import ErrorInfo, QKVCommError, error_info
from qkvcomm_client.sync import ReceiverClient, SenderClient

__all__ = [
    "Answer", "AnswerStream", "AsyncAnswerStream", "AsyncReceiverClient", "AsyncSenderClient", "ClientTLS",
    "ErrorInfo", "PlaintextToken", "QKVCommError", "ReceiverClient", "SenderClient", "call_metadata",
    "check_token_transport", "error_info", "open_channel",
]
