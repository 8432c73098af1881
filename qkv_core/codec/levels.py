"""Non-uniform code levels (`+lloyd`): where a row's 2^b codes sit within its [zero, zero + qmax * scale] range.

Uniform codes put level c at c / qmax of the range. Rotated KV rows are close to Gaussian, so most
values fall near the middle of a row's range and few near its ends: Lloyd-Max levels (each
level the mean of the values nearest it, each boundary midway between two levels) put more
levels where the values are. The row's scale and zero point are unchanged; a code c decodes
to zero + qmax * scale * levels[c], and encodes to the nearest level.

A card carries the levels it was coded with (TensorCodec.levels: fractions of the range,
ascending, within [0, 1]), so a reader needs no table. A static codec (`kivi-2+lloyd`) takes
LLOYD[bits], fitted on rotated, pre-RoPE SmolLM2-135M KV of the bundled calibration texts (K per
channel and V per token pooled; `python benchmarks/fit_levels.py`). budget-B+lloyd takes each
layer's own K and V levels, fitted by `fit` when its profile is calibrated (stored in the profile;
keys above 1 bit with their ends exact, see `fit`). Levels are rounded to multiples of 1/4096, exact in fp32 as
the card carries them. Widths above 4 bits keep uniform levels: there the gain is small.
"""
from __future__ import annotations

import torch

# bits -> levels (fractions of a row's range), from benchmarks/fit_levels.py
LLOYD: dict[int, tuple[float, ...]] = {
    1: (0.32958984375, 0.667724609375),
    2: (0.184326171875, 0.40478515625, 0.59423828125, 0.8154296875),
    3: (0.073974609375, 0.228271484375, 0.345458984375, 0.44921875, 0.548583984375, 0.652587890625, 0.7705078125,
        0.925537109375),
    4: (0.02099609375, 0.118408203125, 0.194580078125, 0.259765625, 0.318115234375, 0.372314453125, 0.424072265625,
        0.474365234375, 0.524169921875, 0.57421875, 0.6259765625, 0.68017578125, 0.73876953125, 0.803955078125,
        0.88037109375, 0.978271484375),
}


def code_units(levels: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The levels in code units (0..qmax, where uniform level c is c), fp32."""
    return torch.tensor(levels, dtype=torch.float32, device=device) * (len(levels) - 1)


def nearest(units: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest each value (`units`: values in code units; ties go up)."""
    return torch.bucketize(units, (table[1:] + table[:-1]) / 2, right=True)


def lloyd_max(sample: torch.Tensor, n: int, iterations: int = 200, exact_ends: bool = False) -> torch.Tensor:
    """The n levels that locally minimize the squared error of quantizing `sample` to its
    nearest level (Lloyd's iteration from uniform levels over the sample's range); with
    `exact_ends` the first and last level stay at the sample's min and max."""
    sample = sample.flatten().float()
    levels = torch.linspace(float(sample.min()), float(sample.max()), n)
    ends = levels[[0, -1]]
    for _ in range(iterations):
        cell = nearest(sample, levels)
        counts = torch.bincount(cell, minlength=n)
        sums = torch.zeros(n).index_add_(0, cell, sample)
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
        if exact_ends:
            levels[[0, -1]] = ends
    return levels


def unit_values(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Where each value of a [heads, tokens, dim] tensor falls within its row's range, as a
    fraction in [0, 1] (rows: a channel's tokens, or a token's channels), flattened."""
    rows = x.float().transpose(1, 2).reshape(-1, x.shape[1]) if per_channel else x.float().reshape(-1, x.shape[2])
    low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    return ((rows - low) / (high - low).clamp_min(1e-12)).flatten()


def fit(sample: torch.Tensor, bits: int, exact_ends: bool = False) -> tuple[float, ...]:
    """Lloyd-Max levels for a sample of unit values (unit_values), rounded to multiples of 1/4096.

    `exact_ends` keeps levels 0 and 1, so every row's min and max decode exactly: free levels
    pull the ends inwards and clip the largest keys, which steer attention (SmolLM2's 2-bit K KL
    rose 0.30 -> 0.79 with the free LLOYD tables while V's fell). A fit whose rounded levels are
    not strictly ascending (levels closer than 1/4096) is uniform."""
    rounded = tuple(round(float(x) * 4096) / 4096 for x in lloyd_max(sample, 1 << bits, exact_ends=exact_ends))
    if not all(0.0 <= a < b <= 1.0 for a, b in zip(rounded, rounded[1:])):
        return tuple(c / ((1 << bits) - 1) for c in range(1 << bits))
    return rounded
