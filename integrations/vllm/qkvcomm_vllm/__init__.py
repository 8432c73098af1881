"""Q-KVComm cards in vLLM: a KV connector (connector.py) that loads a card a receiver stored into
vLLM's paged KV cache, so a vLLM engine answers on contexts it never prefilled."""
