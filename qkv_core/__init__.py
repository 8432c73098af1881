"""qkv_core: the Q-KVComm library. Prefill, compress, frame, verify and inject KV caches.

No gRPC here; the services in sender_service/ and receiver_service/ are thin shells over it.
"""
from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed qkvcomm package's version."""
    try:
        return version("qkvcomm")
    except PackageNotFoundError:  # run from a checkout without an install
        return "0+unknown"
