"""KV caches: prefill a prompt, hold its per-layer keys/values, rebuild a transformers Cache
from them, and decode greedily on top of it.

A KVCache holds one [kv_heads, tokens, head_dim] tensor per layer for K and for V (batch 1,
the batch dimension dropped). Injection goes through the transformers Cache API: the
tensors become a DynamicCache, and the model attends to them exactly as to its own.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import DynamicCache

from qkv_core.errors import Cancelled, RequestError
from qkv_core.model import attention
from qkv_core.model.attention import Probe
from qkv_core.model.loaded import LoadedModel
from qkv_core.types import KVCache

PREFILL_CHUNK = 1024  # tokens per forward pass of a cancellable prefill


@torch.inference_mode()
def prefill(lm: LoadedModel, ids: list[int], past: KVCache | None = None, probe: Probe | None = None,
            cancel: threading.Event | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the model over `ids` (after `past` when given); return the cache of everything so
    far and the last position's logits. A `probe` collects the attention each key receives.
    With `cancel`, a long prompt runs in chunks of PREFILL_CHUNK tokens and stops between them
    once the event is set (Cancelled): a forward pass itself cannot be interrupted."""
    if not ids:
        raise RequestError("cannot prefill an empty prompt")
    if cancel is not None and probe is None and len(ids) > PREFILL_CHUNK:
        kv: KVCache | None = past
        for start in range(0, len(ids), PREFILL_CHUNK):
            if cancel.is_set():
                raise Cancelled(f"prefill stopped after {start} of {len(ids)} tokens: the caller went away")
            kv, logits = prefill(lm, ids[start : start + PREFILL_CHUNK], kv)
        assert kv is not None  # more than one chunk ran
        return kv, logits
    cache = to_dynamic_cache(lm, past) if past is not None else DynamicCache(config=lm.model.config)
    out = _forward(lm, ids, cache, past, probe)
    keys = [layer.keys[0] for layer in cache.layers]  # type: ignore[union-attr,index]  # attention layers, filled
    values = [layer.values[0] for layer in cache.layers]  # type: ignore[union-attr,index]
    return KVCache(keys, values), out.logits[0, -1].float()


def _forward(lm: LoadedModel, ids: list[int], cache: DynamicCache, past: KVCache | None, probe: Probe | None = None,
             start: int | None = None):
    """One forward pass over `ids` after `past`, at positions start.. (default: after past's
    tokens; explicit, so that a ragged cache, whose first layer may be short, still gets the
    context's true positions). The attention mode is this call's alone."""
    start = (past.tokens if past is not None else 0) if start is None else start
    x = torch.tensor([ids], device=lm.device)
    position = torch.arange(start, start + len(ids), device=lm.device)
    ragged = past is not None and past.is_ragged
    if ragged:
        attention.require_full_attention(lm.model, lm.fingerprint.name)
    modes = attention.mode(ragged=ragged, probe=probe)
    return lm.model(input_ids=x, past_key_values=cache, use_cache=True, position_ids=position.unsqueeze(0), **modes)


def to_dynamic_cache(lm: LoadedModel, kv: KVCache) -> DynamicCache:
    """A transformers cache holding `kv`; the tensors are shared, not copied (decoding
    concatenates onto new tensors, so the stored card is never modified)."""
    data = [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(kv.keys, kv.values)]
    return DynamicCache(data, config=lm.model.config)


@torch.inference_mode()
def answer_log_likelihood(lm: LoadedModel, kv: KVCache, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | kv, prompt) under teacher forcing, in nats."""
    if not prompt or not answer:
        raise RequestError("the prompt and the answer must not be empty")
    logits = _forward(lm, prompt + answer, to_dynamic_cache(lm, kv), kv).logits[0].float()
    steps = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return float(steps.gather(1, torch.tensor(answer, device=steps.device).unsqueeze(1)).sum())


def stop_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    gen = getattr(lm.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = lm.tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != lm.tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


def next_logits(lm: LoadedModel, kv: KVCache | None, ids: list[int]) -> torch.Tensor:
    """Logits after `ids`, attending to `kv` first when given."""
    return prefill(lm, ids, kv)[1]


@torch.inference_mode()
def generate(lm: LoadedModel, kv: KVCache | None, ids: list[int], max_new_tokens: int) -> Iterator[int]:
    """Greedy decoding of up to max_new_tokens after `ids`, on top of `kv` when given."""
    if not ids:
        raise RequestError("the receiver's prompt is empty")
    cache = to_dynamic_cache(lm, kv) if kv is not None else DynamicCache(config=lm.model.config)
    stops = stop_ids(lm)
    position = kv.tokens if kv is not None else 0
    for _ in range(max_new_tokens):
        out = _forward(lm, ids, cache, kv, start=position)
        position += len(ids)
        token = int(out.logits[0, -1].argmax())
        if token in stops:
            return
        yield token
        ids = [token]


def stream_text(lm: LoadedModel, tokens: Iterator[int]) -> Iterator[str]:
    """Turn a token stream into text pieces, holding back incomplete UTF-8 sequences."""
    seen: list[int] = []
    emitted = ""
    for token in tokens:
        seen.append(token)
        text = str(lm.tokenizer.decode(seen, skip_special_tokens=True))
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text


def warm_up(lm: LoadedModel) -> None:
    """Run one tiny prefill + cached decode, so that the first real request does not pay the
    one-time kernel set-up (measured ~5 s on this 2-core CPU, which would swamp its TTFT)."""
    ids = lm.tokenizer("warm up", add_special_tokens=False).input_ids or [0]
    kv, _ = prefill(lm, ids)
    for _ in generate(lm, kv, ids, 2):
        pass
