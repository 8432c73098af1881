"""A vLLM KV connector (KVConnectorBase_V1) that loads Q-KVComm cards into vLLM's paged KV cache.

A request names its card in `kv_transfer_params`: {"qkvcomm_card_id": ID, "qkvcomm_tenant": T}
(tenant optional). The card comes from a receiver's disk tier (cards.py), configured through
`kv_connector_extra_config`: {"store_dir": DIR, "namespace": NS (the directory under DIR the receiver
writes this model's cards to: 16 hex digits of the weights hash, qkv_core.store.disk.namespace),
"store_key": FILE (when the receiver seals its cards)}.

Scheduler side (the engine core process):
    get_num_new_matched_tokens  the card's context tokens that the prompt begins with (checked by
                                the header's token-id digest), rounded down to whole blocks and
                                leaving the prompt's last token to compute; 0 when the request
                                names no card, or its card is absent, damaged, of another model's
                                shape, or for another prompt (logged; vLLM then prefills).
    update_state_after_alloc    remembers the slots vLLM allocated for those tokens: after the ones it
                                found in its own prefix cache (a shared chat header, say), which the
                                card does not overwrite.
    build_connector_meta        hands (card, tokens, slots) to the workers for this step.
    request_finished            forgets a request matched but never allocated.
Worker side (the model runner process):
    start_load_kv               decodes the card and writes each layer's K and V into the slots
                                through the attention backend's own cache writer
                                (impl.do_kv_cache_update), so the backend's layout (the CPU
                                backend keeps keys transposed per block) is never assumed here.
    wait_for_layer_load, save_kv_layer, wait_for_save   nothing: the connector only loads.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from qkv_core.errors import CardError
from qkvcomm_vllm.cards import Card, CardFiles, Shape

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
CARD, TENANT = "qkvcomm_card_id", "qkvcomm_tenant"
LAYER = re.compile(r"layers\.(\d+)\.")


def transfer_config(store_dir: str, namespace: str, store_key: str = "") -> dict[str, Any]:
    """vLLM's kv_transfer_config for this connector over a receiver's disk tier (the fields of
    vllm.config.KVTransferConfig, or the JSON of `--kv-transfer-config`)."""
    return {"kv_connector": "CacheCardConnector", "kv_connector_module_path": __name__, "kv_role": "kv_consumer",
            "kv_connector_extra_config": {"store_dir": store_dir, "namespace": namespace, "store_key": store_key}}


@dataclass
class Load:
    card_id: str
    tenant: str
    start: int  # the card's tokens [start, end) go to `slots`: those before start vLLM already holds (prefix cache)
    end: int
    slots: torch.Tensor  # one slot per token: block_id * block_size + offset


@dataclass
class CardLoads(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


class CacheCardConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.files = CardFiles(extra["store_dir"], extra["namespace"], extra.get("store_key", ""))
        model = vllm_config.model_config
        self.shape = Shape(model.get_num_layers(vllm_config.parallel_config),
                           model.get_num_kv_heads(vllm_config.parallel_config), model.get_head_size())
        self.block_size = vllm_config.cache_config.block_size
        self._cards: dict[tuple[str, str], Card] = {}  # decoded, per process (the scheduler's or a worker's)
        self._matched: dict[str, int] = {}  # request id -> tokens vLLM held itself when the card was matched
        self._pending: dict[str, Load] = {}

    def _card(self, card_id: str, tenant: str) -> Card:
        key = (tenant, card_id)
        if key not in self._cards:
            self._cards = {key: self.files.load(card_id, self.shape, tenant)}  # keep one: the next request's
        return self._cards[key]

    # ---- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not (card_id := params.get(CARD)):
            return 0, False
        tenant = params.get(TENANT, "")
        prompt = list(request.prompt_token_ids or [])
        try:
            card = self._card(card_id, tenant)
        except CardError as e:
            log.warning("request %s: card %s not loaded (%s); vLLM prefills the prompt", request.request_id, card_id, e)
            return 0, False
        if not self.files.covers(card, prompt):
            log.warning("request %s: the prompt does not begin with card %s's context; vLLM prefills it",
                        request.request_id, card_id)
            return 0, False
        usable = min(card.tokens, len(prompt) - 1) // self.block_size * self.block_size
        self._matched[request.request_id] = num_computed_tokens
        return max(0, usable - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        # The tokens vLLM found in its own prefix cache come first; the card fills the ones after them.
        start = self._matched.pop(request.request_id, 0)
        if num_external_tokens <= 0:
            return
        params = request.kv_transfer_params or {}
        block_ids = torch.tensor(blocks.get_block_ids()[0])
        end = start + num_external_tokens
        slots = (block_ids[:, None] * self.block_size + torch.arange(self.block_size)).flatten()[start:end]
        self._pending[request.request_id] = Load(params[CARD], params.get(TENANT, ""), start, end, slots)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)  # matched, but never allocated (aborted while waiting)
        return False, None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = CardLoads(list(self._pending.values()))
        self._pending.clear()
        return meta

    # ---- worker side
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, CardLoads)
        for load in meta.loads:
            card = self._card(load.card_id, load.tenant)
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                if cache is None or not (m := LAYER.search(name)):
                    continue
                i = int(m.group(1))
                key = card.keys[i][:, load.start : load.end].transpose(0, 1).to(cache.dtype).contiguous()
                value = card.values[i][:, load.start : load.end].transpose(0, 1).to(cache.dtype).contiguous()
                layer.impl.do_kv_cache_update(layer, key, value, cache, load.slots.to(cache.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return
