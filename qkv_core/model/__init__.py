"""The model layer: loading (names to weights, device, dtype, fingerprint), the prompt format and
its sender/receiver cut, prefill / injection / decoding over KV caches, and the attention modes."""
