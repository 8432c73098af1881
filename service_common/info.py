"""The Info RPC's answer: what a service runs and offers, built from its model and configuration."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from qkvcomm.v1 import services_pb2_grpc

from qkv_core import package_version
from qkv_core.card.convert import fingerprint_to_pb
from qkv_core.codec import registry
from qkv_core.config import MAX_CHUNK_BYTES, ServiceConfig
from qkv_core.engine.performance import Performance
from qkv_core.model.loaded import LoadedModel
from qkv_core.types import Fingerprint
from qkv_core.wire import pb
from service_common.auth import Auth

INFO_TOKENS = 1024  # codec costs are quoted at this context length


def codecs(fp: Fingerprint) -> list[pb.CodecInfo]:
    out = [pb.CodecInfo(name="text", description="the context as text: the receiver prefills it"),
           pb.CodecInfo(name="auto", description="the sender picks text or a codec: the lowest predicted time to "
                                                 "first token within its quality floor")]
    for name, what in registry.PRESETS.items():
        bits = registry.wire_bits(registry.resolve(name, fp.num_layers), fp.num_kv_heads, INFO_TOKENS, fp.head_dim)
        out.append(pb.CodecInfo(name=name, bits_per_element=bits, description=what))
    out += [pb.CodecInfo(name=name, description=what) for name, what in (registry.ADAPTIVE | registry.TOOLS).items()]
    return out


def build_info(role: str, lm: LoadedModel, cfg: ServiceConfig, alignments: Sequence[Fingerprint] = (),
               store_tiers: Sequence[str] = (), performance: Performance | None = None,
               whole_cards_only: bool = False, bulk_port: int = 0) -> pb.InfoResponse:
    limits = cfg.limits
    speed = pb.ServicePerformance(**vars(performance)) if performance else None
    return pb.InfoResponse(
        version=package_version(), role=role, model=fingerprint_to_pb(lm.fingerprint), device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."), codecs=codecs(lm.fingerprint),
        limits=pb.ServiceLimits(max_card_bytes=cfg.max_card_bytes, max_context_tokens=limits.max_context_tokens,
                                max_new_tokens=limits.max_new_tokens_limit, chunk_bytes=MAX_CHUNK_BYTES),
        features=pb.ServiceFeatures(
            facts=cfg.facts, layer_selection=not whole_cards_only, sessions=not whole_cards_only,
            alignments=[fingerprint_to_pb(a) for a in alignments], tls=bool(cfg.tls_cert), auth=bool(cfg.auth_tokens),
            store_tiers=list(store_tiers), engine=cfg.engine if role == "receiver" else "", bulk_port=bulk_port),
        performance=speed,
    )


class InfoServicer(services_pb2_grpc.InfoServiceServicer):
    """qkvcomm.v1.InfoService, served by both services: their answer, built once at start;
    `refresh(reply, tenant)` fills in what changes (a receiver's free store bytes) on each call, in
    the caller's tenant's figures only, so no tenant learns what another pushed."""

    def __init__(self, info: pb.InfoResponse, refresh: Callable[[pb.InfoResponse, str], None] | None = None,
                 auth: Auth | None = None):
        self.info, self.refresh, self.auth = info, refresh, auth or Auth()

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if self.refresh is None:
            return self.info
        reply = pb.InfoResponse()
        reply.CopyFrom(self.info)
        self.refresh(reply, self.auth.tenant(context.invocation_metadata()))
        return reply

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeResponse:
        # the payload is bounded by the server's message limit (MAX_MESSAGE_BYTES); nothing is kept
        return pb.ProbeResponse(received_bytes=len(request.payload))
