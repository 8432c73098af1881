"""Codec names: how every layer's K and V are encoded.

A codec name is a preset, a spec string, or a JSON file:

    fp32 / fp16       lossless / fp16 passthrough
    int8              8-bit asymmetric, per token, K and V
    seed-B            B-bit per-tensor, K and V (the seed paper's quantizer), B in 2..8
    kivi-B            B-bit, K per channel and V per token (KIVI), B in 1..8
    seed-adaptive     per-tensor 8/6/4 bits by layer sensitivity (calibrated profile)
    budget-B          per-tensor widths that fit B bits per element on the wire (profile);
                      budget-B+rot, +prerope, +s8, +zstd: with those tools, its profile calibrated with them
    tokenmix-B        sink tokens fp16, most-attended tokens 8-bit, the rest low, within B bits
    k=SPEC;v=SPEC[;sink=N][;recent=N]
                      SPEC is BITS/GRANULARITY[/GROUP][+rot][+zstd][+prerope][+lloyd][+s8][+outN]: 4/channel,
                      8/token, 3/group/32, 2/tensor+rot, or fp16 / fp32 alone (+prerope: k only);
                      the same for every layer
    NAME+rot          a static name above (fp16, int8, seed-B, kivi-B, a spec) or budget-B with every tensor
                      rotated over head_dim first (qkv_core.codec.rotation, seed ROTATION_SEED)
    NAME+zstd         any name above, adaptive ones included, with every tensor entropy coded
                      (lossless, qkv_core.codec.entropy); +rot+zstd does both
    NAME+prerope      a static name above or budget-B with every K coded with RoPE removed (qkv_core.codec.rope)
    NAME+outN         a static name above with N per 10,000 quantized values of every tensor
                      kept exact in fp16 (dense-and-sparse; +out10 is 0.1%); budget-B+outN:
                      with or without them per tensor, whichever its profiles favour
    NAME+s8           a static name above or budget-B with every scale and zero point one byte on
                      grids of each tensor's own, not fp16 (half the side bytes; qkv_core.codec.quant)
    NAME+lloyd        a static name above with non-uniform (Lloyd-Max) levels at 1..4 bits
                      (the LLOYD tables, qkv_core.codec.levels); budget-B+lloyd: uniform levels or
                      the layer's own (fitted per layer and stored in its profile) per tensor,
                      whichever its two profiles (with and without +lloyd) favour
    FILE.json         {"layers": [{"key": SPEC, "value": SPEC}, ...]}, one entry per layer
                      (what `qkvcomm calibrate codec --allocate` writes); only the files the
                      caller lists in `files` are opened: a service lists those of its
                      configuration, so a request names codecs, never paths on the server

The first five and specs resolve here; the adaptive ones need the model (qkv_core.codec.allocation).
`text` is no codec: the handoff that sends the context itself (TEXT, for the layers that choose).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qkv_core.codec import tools as codec_tools
from qkv_core.codec.quant import encoded_size
from qkv_core.codec.tensor_codec import FP16_BITS, FP32_BITS, Granularity, TensorCodec
from qkv_core.errors import RequestError

TEXT = "text"  # the pseudo-codec of the text handoff: no card, the context itself
_GRANULARITIES = {
    "tensor": Granularity.PER_TENSOR,
    "token": Granularity.PER_TOKEN,
    "channel": Granularity.PER_CHANNEL,
    "group": Granularity.PER_GROUP,
}
_ADAPTIVE = re.compile(r"seed-adaptive|(budget|tokenmix)-(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class LayerCodec:
    key: TensorCodec
    value: TensorCodec


def SEED(bits: int) -> LayerCodec:  # noqa: N802 (a family of presets, named like one)
    return LayerCodec(TensorCodec(bits, Granularity.PER_TENSOR), TensorCodec(bits, Granularity.PER_TENSOR))


def KIVI(bits: int) -> LayerCodec:  # noqa: N802
    return LayerCodec(TensorCodec(bits, Granularity.PER_CHANNEL), TensorCodec(bits, Granularity.PER_TOKEN))


def spec_of(c: TensorCodec) -> str:
    """The SPEC text of one tensor codec (windows are spelled at the layer level)."""
    tools = codec_tools.spelled(c)
    if c.is_float:
        return f"fp{c.bits}{tools}"
    name = next(k for k, v in _GRANULARITIES.items() if v == c.granularity)
    group = f"/{c.group_size}" if c.granularity == Granularity.PER_GROUP else ""
    return f"{c.bits}/{name}{group}{tools}"


def _tool(name: str) -> str | None:
    """The tool suffix a name ends with (+rot, +zstd, +prerope, +lloyd, +s8, +outN), if any."""
    found = codec_tools.ending(name)
    return found[1] if found else None


def _parse_tensor(text: str, sink: int = 0, recent: int = 0) -> TensorCodec:
    if tool := _tool(text):
        return codec_tools.apply(tool, _parse_tensor(text.removesuffix(tool), sink, recent))
    if text in ("fp16", "fp32"):
        return TensorCodec(bits=FP16_BITS if text == "fp16" else FP32_BITS)
    parts = text.split("/")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in _GRANULARITIES:
        raise RequestError(f"bad tensor spec {text!r}: use BITS/GRANULARITY[/GROUP][+rot], e.g. 4/channel")
    group = int(parts[2]) if len(parts) == 3 else 0
    return TensorCodec(int(parts[0]), _GRANULARITIES[parts[1]], group, sink, recent)


def with_tools(layers: list[LayerCodec], tools: Iterable[str]) -> list[LayerCodec]:
    """Every tensor of `layers` with tools (suffixes, as `tooled` takes them) applied (+prerope: K alone)."""
    return [LayerCodec(tooled(c.key, "key", tools), tooled(c.value, "value", tools)) for c in layers]


def _parse_spec(spec: str) -> LayerCodec:
    fields = dict(item.split("=", 1) for item in spec.split(";") if "=" in item)
    unknown = set(fields) - {"k", "v", "sink", "recent"}
    if unknown or "k" not in fields or "v" not in fields:
        raise RequestError(f"bad codec spec {spec!r}: expected k=...;v=...[;sink=N][;recent=N]")
    sink, recent = int(fields.get("sink", 0)), int(fields.get("recent", 0))
    return _layer(_parse_tensor(fields["k"], sink, recent), _parse_tensor(fields["v"], sink, recent))


def _layer(key: TensorCodec, value: TensorCodec) -> LayerCodec:
    if value.pre_rope:
        raise RequestError(f"{codec_tools.PREROPE.suffix} applies to keys only: values carry no RoPE")
    return LayerCodec(key, value)


def save_layers(path: Path, layers: list[LayerCodec], note: str = "") -> None:
    """Write per-layer codecs as a codec file usable wherever a codec name is."""
    entries = [{"key": spec_of(c.key), "value": spec_of(c.value)} for c in layers]
    path.write_text(json.dumps({"note": note, "layers": entries}, indent=1) + "\n")


def codec_files(paths: Iterable[str]) -> dict[str, Path]:
    """The codec files a caller allows, each selected by the name it was given as."""
    return {p: Path(p) for p in paths if p.endswith(".json")}


def _load_layers(path: Path, num_layers: int) -> list[LayerCodec]:
    try:
        entries = json.loads(path.read_text())["layers"]
        layers = [_layer(_parse_tensor(e["key"]), _parse_tensor(e["value"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RequestError(f"cannot read codec file {path}: {e}") from e
    if len(layers) != num_layers:
        raise RequestError(f"codec file {path} has {len(layers)} layers, the model {num_layers}")
    return layers


@dataclass(frozen=True)
class Adaptive:
    """An adaptive codec: its layers are allocated per cache (qkv_core.codec.allocation), not
    looked up. What each family needs is said here once, for every caller."""

    allocator: str  # seed-adaptive | budget | tokenmix
    bits: float  # the budget in bits per element (seed-adaptive: none, 0)
    needs_profile: bool  # reads the calibrated codec profile of the model
    needs_probe: bool  # reads the sender's attention probe, so a relayed or precomputed cache cannot use it
    tools: tuple[str, ...] = ()  # suffixes every tensor takes, in TOOLS order (budget-B: any; the others: lossless)

    @property
    def entropy(self) -> bool:
        """+zstd: every tensor entropy coded (budget-B counts the coded bytes)."""
        return codec_tools.ZSTD.suffix in self.tools

    @property
    def profile_tools(self) -> str:
        """The lossy tools its profile is calibrated with ('' for none); a lossless one moves no error."""
        return "".join(t for t in self.tools if not codec_tools.of(t).lossless)

    @property
    def profile_sets(self) -> tuple[str, ...]:
        """The tool sets of the profiles it reads, one per subset of its per-tensor tools (+lloyd,
        +outN) on top of the tools every tensor takes (+rot, +prerope, +s8): each tensor then takes
        the levels and outliers whose profile cuts more error per byte. Plain tools first."""
        every = [t for t in self.tools if not codec_tools.of(t).lossless and not codec_tools.of(t).per_tensor]
        optional = [t for t in self.tools if codec_tools.of(t).per_tensor]
        subsets = [[t for i, t in enumerate(optional) if mask >> i & 1] for mask in range(1 << len(optional))]
        return tuple("".join(t for t in self.tools if t in every or t in subset) for subset in subsets)


# family -> (needs_profile, needs_probe)
_FAMILIES = {"seed-adaptive": (True, False), "budget": (True, False), "tokenmix": (False, True)}


def split_tools(name: str) -> tuple[str, tuple[str, ...]]:
    """(the name without its tool suffixes, those suffixes in TOOLS order)."""
    found = set()
    while tool := _tool(name):
        found.add(tool)
        name = name.removesuffix(tool)
    return name, tuple(sorted(found, key=lambda t: codec_tools.TOOLS.index(codec_tools.of(t))))


def adaptive(name: str) -> Adaptive | None:
    """The adaptive family a codec name belongs to, None for every other name."""
    stem, tools = split_tools(name)
    m = _ADAPTIVE.fullmatch(stem)
    if not m:
        return None
    family = "seed-adaptive" if m[1] is None else m[1]
    if family != "budget" and any(not codec_tools.of(t).lossless for t in tools):
        raise RequestError(f"{name!r}: {stem} takes {codec_tools.patterns(lossless=True)} only; "
                           f"{codec_tools.patterns(lossless=False)} apply to static codecs and to budget-B, whose "
                           "profile is calibrated with them")
    return Adaptive(family, 0.0 if m[1] is None else float(m[2]), *_FAMILIES[family], tools)


def tooled(c: TensorCodec, kind: str, tools: Iterable[str]) -> TensorCodec:
    """A K ("key") or V ("value") codec with tools applied (+prerope: keys only)."""
    for tool in tools:
        if kind == "key" or not codec_tools.of(tool).keys_only:
            c = codec_tools.apply(tool, c)
    return c


def resolve(name: str, num_layers: int, files: Mapping[str, Path] = {}) -> list[LayerCodec]:  # noqa: B006 - read only
    """The per-layer codecs a static codec name stands for; RequestError with the options if unknown.
    `files`: the codec files that may be opened, by the name that selects them."""
    if (tool := _tool(name)) and "=" not in name and not adaptive(name):  # a spec's suffix is its last tensor's
        return with_tools(resolve(name.removesuffix(tool), num_layers, files), [tool])
    if name in ("fp16", "fp32"):
        return [LayerCodec(*[TensorCodec(bits=FP16_BITS if name == "fp16" else FP32_BITS)] * 2)] * num_layers
    if name == "int8":
        return [LayerCodec(*[TensorCodec(8, Granularity.PER_TOKEN)] * 2)] * num_layers
    if m := re.fullmatch(r"seed-([2-8])", name):
        return [SEED(int(m[1]))] * num_layers
    if m := re.fullmatch(r"kivi-([1-8])", name):
        return [KIVI(int(m[1]))] * num_layers
    if "=" in name:
        return [_parse_spec(name)] * num_layers
    if name in files:
        return _load_layers(files[name], num_layers)
    if name.endswith(".json"):
        raise RequestError(f"codec file {name!r} is not one this service offers: it opens only the codec files "
                           "of its configuration (codec_files, QKVCOMM_CODEC_FILES)")
    if adaptive(name):
        raise RequestError(f"codec {name!r} is allocated per model; resolve it through qkv_core.codec.allocation")
    raise RequestError(
        f"unknown codec {name!r}: use fp32, fp16, int8, seed-B, kivi-B, budget-B (each optionally "
        f"{codec_tools.patterns(lossless=False)}), seed-adaptive, tokenmix-B (any of them optionally "
        f"{codec_tools.patterns(lossless=True)}), a spec like 'k=4/channel;v=4/token+rot' or a configured codec "
        ".json file"
    )


@dataclass(frozen=True)
class Codec:
    """A codec name parsed once, at the edge (a request, the CLI, a configuration), for one model:
    the per-layer codecs of a static codec, or the family of an adaptive one (allocated per cache,
    qkv_core.codec.allocation). Below the edge nothing parses the name again; `name` travels on as
    the card's codec field and the statistics' label."""

    name: str
    layers: tuple[LayerCodec, ...] = ()  # a static codec's, one per layer
    kind: Adaptive | None = None  # an adaptive codec's family

    @property
    def needs_probe(self) -> bool:
        """Allocated from the sender's attention probe (tokenmix): the whole context must be prefilled."""
        return self.kind is not None and self.kind.needs_probe


def parse(name: str, num_layers: int, files: Mapping[str, Path] = {}) -> Codec:  # noqa: B006 - read only
    """`name` for a model of `num_layers` layers; RequestError (with the options) for a bad one.
    `files`: the codec files that may be opened, by the name that selects them."""
    if (kind := adaptive(name)) is not None:
        return Codec(name, kind=kind)
    return Codec(name, tuple(resolve(name, num_layers, files)))


# The names a request may use, with what they are (a service's Info lists them).
PRESETS = {
    "fp32": "lossless passthrough",
    "fp16": "fp16 passthrough",
    "int8": "8-bit asymmetric, per token, K and V",
    **{f"seed-{b}": f"{b}-bit per tensor, K and V (the seed paper's quantizer)" for b in range(2, 9)},
    **{f"kivi-{b}": f"{b}-bit, K per channel and V per token (KIVI)" for b in range(1, 9)},
}
ADAPTIVE = {
    "seed-adaptive": "per-tensor 8/6/4 bits by layer sensitivity (calibrated profile)",
    "budget-B": "per-tensor widths that fit B bits per element on the wire, header included (calibrated profile); "
                "below the all-2-bit card also 1-bit tensors and dropped layers",
    "tokenmix-B": "sink tokens fp16, most-attended tokens 8-bit, the rest low, within B bits",
}
TOOLS = {f"NAME{t.pattern}": t.description for t in codec_tools.TOOLS}  # suffixes (Info lists them as patterns)


def wire_bytes(layers: list[LayerCodec], heads: int, tokens: int, dim: int) -> int:
    """Payload bytes of a cache encoded with `layers`: codes, scales, zero points, fp16 windows."""
    return sum(encoded_size(c.key, heads, tokens, dim) + encoded_size(c.value, heads, tokens, dim) for c in layers)


def wire_bits(layers: list[LayerCodec], heads: int, tokens: int, dim: int) -> float:
    """Bits per element on the wire of a cache encoded with `layers` (scales and zero points included)."""
    return 8 * wire_bytes(layers, heads, tokens, dim) / (2 * len(layers) * heads * tokens * dim)
