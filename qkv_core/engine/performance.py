"""The receiver's speed, measured once at start so that senders can predict handoff times
(`codec = "auto"`, qkv_core.policy): prefill tokens/s, the time from a question on a held cache
to its first token, and card decoding in fp16-equivalent KV bytes per second (kivi-4)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from qkv_core.bundled import texts
from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.codec import registry
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.model.kv import next_logits, prefill

MEASURED_TOKENS = 512
QUESTION_TOKENS = 24
PROBE_CODEC = "kivi-4"


@dataclass(frozen=True)
class Performance:
    prefill_tokens_per_s: float
    first_token_s: float
    dequantize_bytes_per_s: float
    measured_tokens: int


def _best(run, repeats: int = 2) -> float:
    """The fastest of `repeats` timings of `run()` (the others paid a one-time cost)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(engine: ReceiverEngine, tokens: int = MEASURED_TOKENS) -> Performance:
    """About 2-3 prefills of `tokens` tokens of the bundled calibration text on this device."""
    lm = engine.lm
    text = " ".join(texts())
    ids = (lm.tokenizer(text, add_special_tokens=False).input_ids * 8)[:tokens + QUESTION_TOKENS]
    context, question = ids[:tokens], ids[tokens:]
    kv, _ = prefill(lm, context)
    prefill_s = _best(lambda: prefill(lm, context))
    first_token_s = _best(lambda: next_logits(lm, kv, question))
    plan = CardPlan(PROBE_CODEC, registry.resolve(PROBE_CODEC, lm.num_layers))
    card = list(frames(*build_card(lm.fingerprint, context, kv, plan)))
    decode_s = _best(lambda: engine.decode(iter(card)))
    return Performance(tokens / prefill_s, first_token_s, kv.nbytes(2) / decode_s, tokens)
