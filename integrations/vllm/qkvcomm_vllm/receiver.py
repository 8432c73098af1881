"""A receiver that answers through a vLLM engine (`qkvcomm serve-receiver --engine vllm`).

The receiver takes cards in as always (validated, kept in its store, written through to its disk
tier). Generate hands vLLM the prompt [the card's context token ids] + [the query's ids] and names the
card in kv_transfer_params; the CacheCardConnector (connector.py), inside vLLM, loads the card's K and
V from the disk tier into the blocks vLLM allocated, so those tokens are not prefilled. Concurrent
Generates are concurrent vLLM requests: continuous batching and paged attention are vLLM's.

Against the Hugging Face receiver:
    text handoffs   PushText keeps the context's token ids; vLLM prefills them at Generate (with
                    prefix caching, once per context)
    cards           whole cards of this model: layer-selected and cross-model cards are refused at
                    intake, delta cards at Generate (FAILED_PRECONDITION); FindPrefix finds nothing,
                    so senders send whole cards
    a card whose file has left the disk tier costs a prefill, not a wrong answer: the prompt holds
                    the real context ids (Generation.cached_tokens says how many tokens vLLM took
                    from the card, logged when short)
    Hugging Face    weights loaded on the CPU at start to fingerprint the model, then released
    speed           no start-up measurement (Info reports none; codec auto refuses this receiver)
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from qkv_core.codec.registry import TEXT
from qkv_core.config import RuntimeConfig, ServiceConfig
from qkv_core.engine.answering import AnswerEngine, Generation
from qkv_core.errors import CardError, ErrorKind
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.loading import load_model, model_source, resolve_device, resolve_dtype
from qkv_core.store.disk import namespace
from qkv_core.types import KVCache
from qkv_core.wire import pb
from qkvcomm_vllm.connector import CARD, TENANT, transfer_config

log = logging.getLogger(__name__)


def fingerprinted(runtime: RuntimeConfig) -> LoadedModel:
    """The model's fingerprint and tokenizer (what cards are checked against and queries encoded
    with). The Hugging Face weights are loaded on the CPU for the fingerprint only, in the dtype the
    configured device would run (the fingerprint covers it: bf16 on CUDA), then released: vLLM holds
    the model, in that same dtype. Cards are decoded on the CPU (the receiver's validating intake)."""
    dtype = resolve_dtype(runtime.dtype, resolve_device(runtime.device))
    lm = load_model(dataclasses.replace(runtime, device="cpu", dtype=str(dtype).removeprefix("torch.")))
    lm.model = None  # type: ignore[assignment]
    return lm


def engine_args(cfg: ServiceConfig, lm: LoadedModel, namespace: str) -> AsyncEngineArgs:
    """vLLM's arguments: the receiver's model in the fingerprinted dtype, the connector reading this
    receiver's disk tier (`namespace`: the store's directory for this model), then --vllm-args."""
    extra: dict[str, Any] = json.loads(cfg.vllm_args) if cfg.vllm_args else {}
    if not isinstance(extra, dict) or extra.keys() & {"model", "dtype", "kv_transfer_config"}:
        raise ValueError("--vllm-args is a JSON object of vLLM engine arguments other than model, dtype and "
                         "kv_transfer_config (the receiver sets those: --model, --dtype)")
    connector = KVTransferConfig(**transfer_config(cfg.store.store_dir, namespace, cfg.store.store_key))
    dtype = str(lm.dtype).removeprefix("torch.")
    return AsyncEngineArgs(model=str(model_source(cfg.runtime.model, cfg.runtime.revision)), dtype=dtype,
                           kv_transfer_config=connector, **extra)


class VllmAnswers(AnswerEngine):
    """Answers from vLLM (module docstring), registered as --engine vllm. vLLM runs on an event loop
    of its own (a daemon thread); each answer is a vLLM request streamed back through a queue."""

    whole_cards_only = True

    @classmethod
    def check(cls, cfg: ServiceConfig) -> None:
        if not cfg.store.store_dir:
            raise ValueError("--engine vllm needs --store-dir: vLLM reads the cards from the disk tier")
        if cfg.alignments:
            raise ValueError("--engine vllm takes cards of its own model only (no --alignment)")

    @classmethod
    def load(cls, runtime: RuntimeConfig) -> LoadedModel:
        return fingerprinted(runtime)

    def __init__(self, lm: LoadedModel, cfg: ServiceConfig):
        super().__init__(lm, cfg)
        self.check(cfg)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True).start()
        args = engine_args(cfg, lm, namespace(lm.fingerprint))
        self.llm: AsyncLLM = self._run(self._start(args))
        log.info("vLLM engine ready (%s, connector on %s)", args.model, cfg.store.store_dir)

    async def _start(self, args: AsyncEngineArgs) -> AsyncLLM:
        return AsyncLLM.from_engine_args(args)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Shut vLLM's engine down (its engine-core and worker processes would outlive this one)."""
        async def shutdown() -> None:
            self.llm.shutdown()

        self._run(shutdown())

    def text(self, ids: list[int]) -> tuple[None, float]:
        """The text handoff keeps the context's token ids; vLLM prefills them at Generate."""
        return None, 0.0

    def answer(self, header: pb.CardHeader, kv: Callable[[], KVCache], ids: list[int], max_new_tokens: int,
               stats: Generation, tenant: str) -> Iterator[str]:
        if header.parent_card_id:
            raise CardError(ErrorKind.PRECONDITION, "a vLLM receiver answers on whole cards; this one is a delta card")
        if not header.context_ids:
            raise CardError(ErrorKind.PRECONDITION, "the card carries no context token ids (a sender older than "
                            "card field 19): a vLLM receiver needs them for the prompt")
        card = header.codec != TEXT
        transfer = {"kv_transfer_params": {CARD: header.card_id, TENANT: tenant}} if card else None
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA,
                                extra_args=transfer)
        prompt = TokensPrompt(prompt_token_ids=[*header.context_ids, *ids])
        pieces: queue.Queue[str | BaseException | None] = queue.Queue()
        request_id = f"qkv-{next(self._ids)}"
        start = time.perf_counter()

        async def run() -> None:
            try:
                async for out in self.llm.generate(prompt, params, request_id):
                    if out.num_cached_tokens is not None:
                        stats.cached_tokens = out.num_cached_tokens
                    for piece in out.outputs:
                        stats.tokens += len(piece.token_ids)
                        pieces.put(piece.text)
                pieces.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the reading thread
                pieces.put(e)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            while (piece := pieces.get()) is not None:
                if isinstance(piece, BaseException):
                    raise piece
                if not stats.ttft_s:
                    stats.ttft_s = time.perf_counter() - start
                if piece:
                    yield piece
        finally:
            if not future.done():  # the caller went away: end the vLLM request too
                self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.llm.abort(request_id)))
        stats.total_s = time.perf_counter() - start
        if card and not stats.cached_tokens:
            log.warning("card %s: vLLM prefilled its %d tokens instead of loading them (its file has left the "
                        "disk tier?)", header.card_id[:12], header.context_tokens)

