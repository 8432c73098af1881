"""What answers a receiver's Generate: an answer engine, behind one interface, chosen by name.

The receiver's intake is the same whatever answers (qkv_core.engine.receiver.ReceiverEngine:
validate, decode, stitch, store, per tenant). An answer engine only answers. The calls, in order:

    cls = answer_engine(name)        the class registered under `name` (the --engine setting)
    cls.check(cfg)                   before the model loads: ValueError naming what to change when
                                     the configuration is one this engine cannot serve
    lm = cls.load(cfg.runtime)       the model as this engine needs it: whole (hf), or its
                                     fingerprint and tokenizer only (vllm, which loads its own)
    engine = cls(lm, cfg)            once, when the receiver starts
    engine.text(ids)                 a text handoff arrived: (the cache to hold for it, seconds
                                     spent), or (None, 0.0) when the engine prefills at answer time
    engine.answer(header, kv, ids, max_new_tokens, stats, tenant)
                                     stream the answer text after the query's token ids `ids` on
                                     top of the card `header` names, held for `tenant`; `kv()`
                                     decodes its cache from the store, for an engine that needs
                                     it (vllm reads the card file itself); fills `stats`
    engine.close()                   the receiver stops (an engine's own processes end here)

text and answer are called from request threads, concurrently. Two class attributes say what the
receiver may offer around the engine: `whole_cards_only` (no layer-selected, shared-prefix or
cross-model cards at intake, no prefixes offered to senders, no sessions or layer selection in
Info) and `measures_speed` (the receiver's start-up speed measurement, which codec auto needs,
runs on this process's model).

Engines register by name: "hf" here, "vllm" from the qkvcomm-vllm package, imported when named.
A deployment adds one with register_answer_engine. Nothing outside this module looks at a name.
"""
from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qkv_core.config import RuntimeConfig, ServiceConfig
from qkv_core.errors import Unsupported
from qkv_core.model.kv import generate, prefill, stream_text
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.loading import load_model
from qkv_core.types import KVCache
from qkv_core.wire import pb


@dataclass
class Generation:
    card_id: str
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine did not compute (vLLM: taken from the card)


class AnswerEngine(ABC):
    whole_cards_only = False
    measures_speed = False

    def __init__(self, lm: LoadedModel, cfg: ServiceConfig):
        self.lm = lm

    @classmethod
    def check(cls, cfg: ServiceConfig) -> None:  # noqa: B027 - most engines serve any configuration
        return None

    @classmethod
    def load(cls, runtime: RuntimeConfig) -> LoadedModel:
        return load_model(runtime)

    @abstractmethod
    def text(self, ids: list[int]) -> tuple[KVCache | None, float]: ...

    @abstractmethod
    def answer(self, header: pb.CardHeader, kv: Callable[[], KVCache], ids: list[int], max_new_tokens: int,
               stats: Generation, tenant: str) -> Iterator[str]: ...

    def close(self) -> None:  # noqa: B027 - an engine without processes of its own has nothing to stop
        return None


class HFAnswers(AnswerEngine):
    """This process's model decodes greedily on the card's cache (transformers)."""

    measures_speed = True

    def text(self, ids: list[int]) -> tuple[KVCache, float]:
        start = time.perf_counter()
        kv, _ = prefill(self.lm, ids)
        return kv, time.perf_counter() - start

    def answer(self, header: pb.CardHeader, kv: Callable[[], KVCache], ids: list[int], max_new_tokens: int,
               stats: Generation, tenant: str) -> Iterator[str]:
        return timed_answer(self.lm, kv(), ids, max_new_tokens, stats)


def timed_answer(lm: LoadedModel, kv: KVCache | None, ids: list[int], max_new_tokens: int,
                 stats: Generation) -> Iterator[str]:
    """Greedy answer text after `ids` (on top of `kv`), recording TTFT, total time and tokens in `stats`."""
    start = time.perf_counter()
    stats.cached_tokens = kv.tokens if kv is not None else 0

    def counted(tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            stats.tokens += 1
            yield token

    for piece in stream_text(lm, counted(generate(lm, kv, ids, max_new_tokens))):
        if not stats.ttft_s:
            stats.ttft_s = time.perf_counter() - start
        yield piece
    stats.total_s = time.perf_counter() - start


# name -> the class, or "module:Class" of one imported when first named (an optional package)
ANSWER_ENGINES: dict[str, type[AnswerEngine] | str] = {"hf": HFAnswers, "vllm": "qkvcomm_vllm.receiver:VllmAnswers"}
_NEEDS = {"vllm": "vLLM and the qkvcomm-vllm package (integrations/vllm; `make test-vllm` builds such an environment)"}


def register_answer_engine(name: str, engine: type[AnswerEngine] | str) -> None:
    """Make `engine` answer receivers started with --engine NAME."""
    if name in ANSWER_ENGINES:
        raise ValueError(f"an answer engine named {name!r} exists already")
    ANSWER_ENGINES[name] = engine


def answer_engine(name: str) -> type[AnswerEngine]:
    """The answer engine registered as `name`; ValueError for a name none is, Unsupported when its
    package is not installed here."""
    found = ANSWER_ENGINES.get(name)
    if found is None:
        raise ValueError(f"unknown engine {name!r}: choose {' or '.join(ANSWER_ENGINES)}")
    if isinstance(found, str):
        module, _, attribute = found.partition(":")
        try:
            found = getattr(importlib.import_module(module), attribute)
        except ImportError as e:
            raise Unsupported(f"--engine {name} needs {_NEEDS.get(name, module)}: {e}") from None
        if not (isinstance(found, type) and issubclass(found, AnswerEngine)):
            raise TypeError(f"{module}:{attribute} is no AnswerEngine")
        ANSWER_ENGINES[name] = found
    return found
