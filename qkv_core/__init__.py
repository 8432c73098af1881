"""qkv_core: the Q-KVComm library. Prefill, compress, frame, verify and inject KV caches.

No gRPC here; the services in sender_service/ and receiver_service/ are thin shells over it.
"""
