"""The protobuf messages of proto/qkvcomm/v1, as one namespace: `pb.CardHeader`, `pb.AskRequest`, ...

The modules are generated from proto/ when the client package (clients/python) is built; they
are build outputs, never edited or committed. Their .pyi stubs type every message for mypy.
"""
try:
    from qkvcomm.v1.card_pb2 import *  # noqa: F403
    from qkvcomm.v1.services_pb2 import *  # noqa: F403
except ImportError as e:  # pragma: no cover - only without generated stubs
    raise ImportError("protobuf stubs are missing: install clients/python (`make install` does)") from e
