"""The codec layer: bit packing, quantization and its byte layout, codec names (registry), the
encoding of a cache's layers, and the allocators over a calibrated profile. No model library:
nothing here imports transformers (tests/test_layout.py checks it)."""
