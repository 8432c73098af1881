"""Codec tools: the suffixes a codec name takes (+rot, +zstd, +prerope, +lloyd, +s8, +outN), one
record each, in TOOLS.

A tool sets one optional field of a tensor codec (qkv_core.codec.tensor_codec.TensorCodec), and
the code that honours the field does the work. A row says everything else about the tool, and the
rest of the project reads the row, never a list of its own:

    suffix, numbered    how a name spells it (+out takes a number: +out10)
    field, proto_field  the TensorCodec field it sets, and the pb.TensorCodec field that carries it
    apply               the tensor codec with the tool on (N: the number of a numbered tool)
    keys_only           applies to K only (+prerope: values carry no RoPE)
    per_tensor          budget-B offers it per tensor, with and without, whichever its profiles
                        favour (otherwise budget-B takes it on every tensor)
    lossless            moves no error: every codec family takes it, and no profile depends on it
    version             the oldest card format version whose receivers undo it (card.header)
    tensor_hook         (before quantizing, after dequantizing): a transform of the tensor the
                        quantizer applies and undoes (+rot); None for tools the quantizer honours
                        in its own passes (+lloyd, +s8, +outN) or the layer codecs do (+prerope)
    blob_hook           (after encoding, before decoding): a transform of the encoded blob (+zstd)
    description         what Info shows

Used by the grammar and validation (qkv_core.codec.registry), Info's codec list, the proto
conversion and format versions (qkv_core.card.header), and the quantizer's hooks
(qkv_core.codec.quant). A new tool is its module (the transform), its TensorCodec and proto
fields, a row here, and its tests.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qkv_core.codec import entropy
from qkv_core.codec.levels import LLOYD
from qkv_core.codec.rotation import rotate, unrotate
from qkv_core.codec.tensor_codec import OUTLIER_SCALE, Entropy, TensorCodec
from qkv_core.errors import RequestError

ROTATION_SEED = 1  # one seed for every layer: layers of one codec stay one batch (the signs differ per head)

TensorHook = tuple[Callable[[torch.Tensor, TensorCodec], torch.Tensor], Callable[[torch.Tensor, TensorCodec],
                                                                                  torch.Tensor]]
BlobHook = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, int], torch.Tensor]]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Tool:
    suffix: str
    field: str
    proto_field: str
    apply: Callable[[TensorCodec, int], TensorCodec]
    version: int
    description: str
    keys_only: bool = False
    per_tensor: bool = False
    lossless: bool = False
    numbered: bool = False
    tensor_hook: TensorHook | None = None
    blob_hook: BlobHook | None = None
    to_wire: Callable[[Any], Any] = _same
    from_wire: Callable[[Any], Any] = _same

    @property
    def pattern(self) -> str:
        """How names spell it: +rot, +outN."""
        return self.suffix + ("N" if self.numbered else "")

    def on(self, c: TensorCodec) -> bool:
        return bool(getattr(c, self.field))

    def spelled(self, c: TensorCodec) -> str:
        """The suffix that gives `c` this tool's field (with its number, for a numbered tool)."""
        return self.suffix + (str(getattr(c, self.field)) if self.numbered else "")

    def ending(self, name: str) -> str | None:
        """The suffix `name` ends with when it is this tool's (+out10 for +out), else None."""
        if self.numbered:
            m = re.search(re.escape(self.suffix) + r"(\d+)$", name)
            return m[0] if m else None
        return self.suffix if name.endswith(self.suffix) else None


def _rotated(c: TensorCodec, _: int) -> TensorCodec:
    return dataclasses.replace(c, rotation=ROTATION_SEED)


def _entropy_coded(c: TensorCodec, _: int) -> TensorCodec:
    return dataclasses.replace(c, entropy=Entropy.ZSTD)


def _pre_rope(c: TensorCodec, _: int) -> TensorCodec:
    return dataclasses.replace(c, pre_rope=True)


def _lloyd_levels(c: TensorCodec, _: int) -> TensorCodec:
    """Non-uniform levels from the Lloyd-Max table, for integer widths it has (1..4; wider stay
    uniform); budget-B replaces them with each layer's own (qkv_core.codec.allocation.kivi_codecs)."""
    return dataclasses.replace(c, levels=LLOYD[c.bits]) if not c.is_float and c.bits in LLOYD else c


def _compact_side(c: TensorCodec, _: int) -> TensorCodec:
    """Scales and zero points one byte each, for integer codecs (floats have none)."""
    return c if c.is_float else dataclasses.replace(c, side_bits=8)


def _outliers(c: TensorCodec, count: int) -> TensorCodec:
    if not 0 < count <= OUTLIER_SCALE:
        raise RequestError(f"+out{count}: outliers are 1..{OUTLIER_SCALE} per {OUTLIER_SCALE} values")
    return c if c.is_float else dataclasses.replace(c, outliers=count)


ROT = Tool("+rot", "rotation", "rotation_seed", _rotated, 3,
           "NAME (a static codec or budget-B) with every tensor rotated over head_dim by a seeded Hadamard transform",
           tensor_hook=(lambda x, c: rotate(x, c.rotation), lambda x, c: unrotate(x, c.rotation)))
ZSTD = Tool("+zstd", "entropy", "entropy", _entropy_coded, 3,
            "NAME (any codec) with every tensor entropy coded, lossless; budget-B+zstd counts coded bytes",
            lossless=True, blob_hook=(entropy.compress, entropy.decompress), to_wire=int, from_wire=Entropy)
PREROPE = Tool("+prerope", "pre_rope", "pre_rope", _pre_rope, 3,
               "NAME (a static codec or budget-B) with every K coded with RoPE removed (plain RoPE models)",
               keys_only=True)
LLOYD_LEVELS = Tool("+lloyd", "levels", "levels", _lloyd_levels, 4,
                    "NAME (a static codec) with non-uniform (Lloyd-Max) levels at 1..4 bits; budget-B+lloyd: uniform "
                    "or each layer's own Lloyd-Max levels (in its profile) per tensor, whichever its profiles favour",
                    per_tensor=True, to_wire=list, from_wire=tuple)
COMPACT_SIDE = Tool("+s8", "side_bits", "side_bits", _compact_side, 4,
                    "NAME (a static codec or budget-B) with every scale and zero point one byte on grids of each "
                    "tensor's own, not fp16 (half the side information)")
OUTLIERS = Tool("+out", "outliers", "outliers", _outliers, 4,
                "NAME (a static codec) with N per 10,000 quantized values kept exact (dense-and-sparse); "
                "budget-B+outN: with or without them per tensor, whichever its profiles favour",
                per_tensor=True, numbered=True)

TOOLS = [ROT, ZSTD, PREROPE, LLOYD_LEVELS, COMPACT_SIDE, OUTLIERS]  # the order names are spelled and sorted in


def register_tool(tool: Tool) -> None:
    """Add a tool after those registered. Its field must be one a receiver of the card's format
    version reads (version), and its suffix must not end another's."""
    if any(t.suffix.startswith(tool.suffix) or tool.suffix.startswith(t.suffix) for t in TOOLS):
        raise ValueError(f"codec tool {tool.suffix!r} clashes with {', '.join(t.suffix for t in TOOLS)}")
    TOOLS.append(tool)


def ending(name: str) -> tuple[Tool, str] | None:
    """The tool `name`'s last suffix belongs to, and that suffix as spelled (+out10); None if none."""
    for tool in TOOLS:
        if (suffix := tool.ending(name)) is not None:
            return tool, suffix
    return None


def of(suffix: str) -> Tool:
    """The tool a suffix as spelled (+rot, +out10) belongs to; RequestError for none."""
    found = ending(suffix)
    if found is None or found[1] != suffix:
        raise RequestError(f"unknown codec tool {suffix!r}: use {', '.join(t.pattern for t in TOOLS)}")
    return found[0]


def apply(suffix: str, c: TensorCodec) -> TensorCodec:
    """A tensor codec with one tool, as spelled, on."""
    tool = of(suffix)
    return tool.apply(c, int(suffix.removeprefix(tool.suffix)) if tool.numbered else 0)


def spelled(c: TensorCodec) -> str:
    """The suffixes of every tool `c` has on, in TOOLS order."""
    return "".join(t.spelled(c) for t in TOOLS if t.on(c))


def patterns(lossless: bool) -> str:
    """The tools' patterns, lossless or lossy ones, for messages: +rot, +prerope, ..."""
    return ", ".join(t.pattern for t in TOOLS if t.lossless == lossless)


def before_quantizing(x: torch.Tensor, c: TensorCodec) -> torch.Tensor:
    """`x` as `c`'s quantizer codes it: every tensor hook of its tools applied, in TOOLS order."""
    for tool in TOOLS:
        if tool.tensor_hook is not None and tool.on(c):
            x = tool.tensor_hook[0](x, c)
    return x


def after_dequantizing(x: torch.Tensor, c: TensorCodec) -> torch.Tensor:
    """The decoded tensor with its tools' tensor hooks undone, in reverse order."""
    for tool in reversed(TOOLS):
        if tool.tensor_hook is not None and tool.on(c):
            x = tool.tensor_hook[1](x, c)
    return x


def after_encoding(blob: torch.Tensor, c: TensorCodec) -> torch.Tensor:
    """An encoded blob as it travels: every blob hook of `c`'s tools applied."""
    for tool in TOOLS:
        if tool.blob_hook is not None and tool.on(c):
            blob = tool.blob_hook[0](blob)
    return blob


def before_decoding(blob: torch.Tensor, c: TensorCodec, size: int) -> torch.Tensor:
    """A blob as received, its blob hooks undone: the `size` bytes the layout implies (ValueError
    when it does not hold them)."""
    for tool in reversed(TOOLS):
        if tool.blob_hook is not None and tool.on(c):
            blob = tool.blob_hook[1](blob, size)
    return blob
