"""The receiver's card store, in tiers: hot (decoded caches), memory (cards as received), disk
(card files), Redis (shared by receivers). qkv_core.store.tiered puts them together."""
