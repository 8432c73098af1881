"""The CacheCard: its header (what a card declares, the sender's plan, error kinds), its framing
into checksummed chunks, and the validating reader. No model library: nothing here imports
transformers (tests/test_layout.py checks it)."""
