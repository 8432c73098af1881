"""Cross-model handoff: turn a sender model's KV cache into a cache a different receiver model can attend to.

Three pieces, all fitted offline by `qkvcomm calibrate pair` and loaded by the receiver:

- Layer map by relative depth: receiver layer j reads sender layer round((j + 1/2)·L_s/L_r − 1/2).
  Read from the receiver's side, every receiver layer gets exactly one source (30 → 18 drops 12
  sender layers; 18 → 30 feeds some sender layers to two receiver layers).
- RoPE is undone with the sender's frequencies and redone with the receiver's at the positions
  the tokens take in the receiver's cache, so the mappings below see position-free keys.
- A feature map per receiver layer, for K and V:
    `stats`: the paper's z-score transfer (x − μ_s)/σ_s · σ_r + μ_r, per channel when the
             feature sizes agree, with scalar statistics otherwise. When they differ, features
             are tiled or cut to the receiver's size first (there is no canonical
             correspondence between 3×64 and 1×256 channels; the results say what this buys).
    `ridge`: a linear map with bias from sender to receiver features, fitted by ridge
             regression on tokens of both models aligned by character offsets.

Statistics are pooled over every element of every calibration text (sums and sums of squares),
not averaged per text. `stats` files are JSON, `ridge` files safetensors; both name the two
model fingerprints, and a receiver refuses a card whose pair it has no file for.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qkv_core.codec import rope
from qkv_core.config import cache_dir
from qkv_core.errors import RequestError, Unsupported
from qkv_core.model.kv import prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.types import Fingerprint, KVCache

_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # ridge strengths tried, relative to the mean feature variance


def layer_sources(sender_layers: int, receiver_layers: int) -> list[int]:
    """For each receiver layer, the sender layer at the same relative depth."""
    return [min(sender_layers - 1, max(0, round((j + 0.5) * sender_layers / receiver_layers - 0.5)))
            for j in range(receiver_layers)]


def inv_freqs(lm: LoadedModel) -> torch.Tensor:
    """Each layer's RoPE inverse frequencies, [layers, head_dim/2]; only plain RoPE is supported."""
    cfg = lm.model.config.get_text_config(decoder=True)
    rotary = lm.model.model.rotary_emb
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    params = getattr(cfg, "rope_parameters", None) or {}
    rows = []
    for kind in types:
        p = params.get(kind, params) if isinstance(params, dict) else {}
        if p.get("rope_type", "default") != "default":
            raise Unsupported(f"{lm.fingerprint.name}: RoPE type {p.get('rope_type')!r} is not supported across models")
        freq = getattr(rotary, f"{kind}_inv_freq", None)  # per layer type (Gemma 3), else one for all
        rows.append(freq if freq is not None else rotary.inv_freq)
    return torch.stack([r.float().cpu() for r in rows])


def _features(x: torch.Tensor) -> torch.Tensor:
    """[heads, tokens, dim] -> [tokens, heads*dim]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Tile or cut the feature axis to `size` (the `stats` shape adapter)."""
    reps = math.ceil(size / x.shape[-1])
    return x.repeat(1, reps)[:, :size]


@dataclass
class Moments:
    """Pooled first and second moments of features: per channel, or one scalar over all of them."""

    mean: list[float]
    std: list[float]

    @classmethod
    def of(cls, x: torch.Tensor, per_channel: bool) -> Moments:
        x = x.double() if per_channel else x.double().reshape(-1, 1)
        mean = x.mean(0)
        std = x.var(0, unbiased=False).sqrt().clamp_min(1e-6)
        return cls(mean.tolist(), std.tolist())


@dataclass
class Alignment:
    """Everything a receiver needs to take cards from one other model."""

    sender: Fingerprint
    receiver: Fingerprint
    method: str
    sources: list[int]
    sender_inv_freq: torch.Tensor  # [sender layers, sender head_dim/2]
    receiver_inv_freq: torch.Tensor  # [receiver layers, receiver head_dim/2]
    maps: list[dict[str, Any]]  # per receiver layer: {"k": ..., "v": ...}: (Moments, Moments) or a weight

    def __post_init__(self) -> None:
        # Each layer's and part's map, made ready once, not per card.
        method, size = METHODS[self.method], self.receiver.num_kv_heads * self.receiver.head_dim
        self._maps = [{p: method.mapper(m[p], size) for p in ("k", "v")} for m in self.maps]

    # -- applying -------------------------------------------------------------------------
    def apply(self, kv: KVCache, device: torch.device, dtype: torch.dtype) -> KVCache:
        """The receiver's cache for a sender cache of all sender layers."""
        r = self.receiver
        keys, values = [], []
        for j, src in enumerate(self.sources):
            k = _features(rope.apply(kv.keys[src].cpu(), self.sender_inv_freq[src], 0, -1.0))
            v = _features(kv.values[src].float().cpu())
            k, v = self._maps[j]["k"](k), self._maps[j]["v"](v)
            k = k.reshape(-1, r.num_kv_heads, r.head_dim).transpose(0, 1)
            v = v.reshape(-1, r.num_kv_heads, r.head_dim).transpose(0, 1)
            keys.append(rope.apply(k, self.receiver_inv_freq[j], 0).to(device, dtype).contiguous())
            values.append(v.to(device, dtype).contiguous())
        return KVCache(keys, values)

    # -- files ------------------------------------------------------------------------------
    def default_path(self) -> Path:
        return default_path(self.sender, self.receiver, self.method)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        head = {"sender": asdict(self.sender), "receiver": asdict(self.receiver), "method": self.method,
                "sources": self.sources}
        METHODS[self.method].save(path, head, self.sender_inv_freq, self.receiver_inv_freq, self.maps)
        return path

    @classmethod
    def load(cls, path: Path) -> Alignment:
        """A file written by `save`: which method by its suffix."""
        path = Path(path)
        method = next((m for m in METHODS.values() if m.suffix == path.suffix), None)
        if method is None:
            raise RequestError(f"{path}: an alignment is a .json (stats) or .safetensors (ridge) file")
        head, inv_s, inv_r, maps = method.load(path)
        return cls(Fingerprint(**head["sender"]), Fingerprint(**head["receiver"]), head["method"], head["sources"],
                   inv_s, inv_r, maps)


def _affine(src: Moments, dst: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − μ_s)/σ_s · σ_r + μ_r written as x · scale + shift."""
    mu_s, sd_s, mu_r, sd_r = (torch.tensor(t, dtype=torch.float32) for t in (src.mean, src.std, dst.mean, dst.std))
    scale = sd_r / sd_s
    return scale, mu_r - mu_s * scale


def default_path(sender: Fingerprint, receiver: Fingerprint, method: str) -> Path:
    suffix = METHODS[method].suffix
    pair = f"{sender.name}-{sender.weights_sha256[:16]}__{receiver.name}-{receiver.weights_sha256[:16]}"
    name = f"{pair}-{method}{suffix}"
    return cache_dir() / "alignments" / name


# -- fitting ----------------------------------------------------------------------------------
def aligned_positions(sender_offsets: list[tuple[int, int]], receiver_offsets: list[tuple[int, int]]) -> list[int]:
    """For each receiver token, the sender token holding the receiver token's last character
    (the last sender token ending at or before it when none does)."""
    out, s = [], 0
    for _, end in receiver_offsets:
        while s + 1 < len(sender_offsets) and sender_offsets[s][1] < end:
            s += 1
        out.append(s)
    return out


def _encode(lm: LoadedModel, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc.input_ids, [tuple(o) for o in enc.offset_mapping]


def _layer_features(lm: LoadedModel, kv: KVCache, inv: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    keys = [_features(rope.apply(k.cpu(), inv[i], 0, -1.0)) for i, k in enumerate(kv.keys)]
    return keys, [_features(v.float().cpu()) for v in kv.values]


def fit(sender: LoadedModel, receiver: LoadedModel, texts: list[str], method: str, max_tokens: int = 512) -> Alignment:
    """Fit an alignment from `sender` to `receiver` on calibration texts both models read."""
    if method not in METHODS:
        raise RequestError(f"unknown alignment method {method!r}; choose one of {', '.join(METHODS)}")
    how = METHODS[method]
    sources = layer_sources(sender.fingerprint.num_layers, receiver.fingerprint.num_layers)
    inv_s, inv_r = inv_freqs(sender), inv_freqs(receiver)
    xs: dict[tuple[int, str], list[torch.Tensor]] = {}
    ys: dict[tuple[int, str], list[torch.Tensor]] = {}
    for text in tqdm(texts, desc=f"fit {method} alignment", disable=None, leave=False):
        ids_s, off_s = _encode(sender, text)
        ids_r, off_r = _encode(receiver, text)
        ids_s, ids_r = ids_s[:max_tokens], ids_r[:max_tokens]
        end = min(off_s[len(ids_s) - 1][1], off_r[len(ids_r) - 1][1])  # both models read the same characters
        ids_r = [t for t, (_, e) in zip(ids_r, off_r) if e <= end]
        ids_s = [t for t, (_, e) in zip(ids_s, off_s) if e <= end]
        if not ids_r or not ids_s:
            continue
        ks, vs = _layer_features(sender, prefill(sender, ids_s)[0], inv_s)
        kr, vr = _layer_features(receiver, prefill(receiver, ids_r)[0], inv_r)
        pick = torch.tensor(aligned_positions(off_s[: len(ids_s)], off_r[: len(ids_r)]))
        for j, src in enumerate(sources):
            for part, x, y in (("k", ks[src], kr[j]), ("v", vs[src], vr[j])):
                xs.setdefault((j, part), []).append(x[pick] if how.paired else x)
                ys.setdefault((j, part), []).append(y)
    if not xs:
        raise ValueError("no calibration text gave tokens to both models")
    maps = []
    for j in range(len(sources)):
        layer = {}
        for part in ("k", "v"):
            x, y = torch.cat(xs[j, part]), torch.cat(ys[j, part])
            layer[part] = how.fit(x, y)
        maps.append(layer)
    return Alignment(sender.fingerprint, receiver.fingerprint, method, sources, inv_s, inv_r, maps)


class StatsMap:
    """`stats`: the z-score transfer, per channel when the feature sizes agree, scalar otherwise
    (features tiled or cut to the receiver's size first). Fitted on all tokens of each model;
    saved as JSON (the moments)."""

    name, suffix, paired = "stats", ".json", False

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Moments, Moments]:
        per_channel = x.shape[-1] == y.shape[-1]
        if not per_channel:
            x = _resize(x, y.shape[-1])
        return Moments.of(x, per_channel), Moments.of(y, per_channel)

    def mapper(self, fitted: tuple[Moments, Moments], size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        scale, shift = _affine(*fitted)  # (x - mu_s)/sd_s * sd_r + mu_r as one affine map
        return lambda x: (x if x.shape[-1] == size else _resize(x, size)) * scale + shift

    def save(self, path: Path, head: dict, inv_s: torch.Tensor, inv_r: torch.Tensor, maps: list[dict]) -> None:
        layers = [{p: {"sender": asdict(m[p][0]), "receiver": asdict(m[p][1])} for p in ("k", "v")} for m in maps]
        body = {**head, "sender_inv_freq": inv_s.tolist(), "receiver_inv_freq": inv_r.tolist(), "layers": layers}
        path.write_text(json.dumps(body, indent=1))

    def load(self, path: Path) -> tuple[dict, torch.Tensor, torch.Tensor, list[dict]]:
        body = json.loads(path.read_text())
        maps = [{p: (Moments(**m[p]["sender"]), Moments(**m[p]["receiver"])) for p in ("k", "v")}
                for m in body["layers"]]
        return body, torch.tensor(body["sender_inv_freq"]), torch.tensor(body["receiver_inv_freq"]), maps


class RidgeMap:
    """`ridge`: a linear map with bias, fitted by ridge regression on token pairs of the two
    models aligned by character offsets (the strength picked on a held-out fifth); saved as
    safetensors (the weights), with the header fields as metadata."""

    name, suffix, paired = "ridge", ".safetensors", True

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weights [features_x + 1, features_y] (last row: bias)."""
        x, y = x.double(), y.double()
        xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        cut = len(x) * 4 // 5
        scale = x.var(0).mean().item() or 1.0

        def solve(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
            reg = torch.eye(a.shape[1], dtype=a.dtype) * alpha * scale * len(a)
            reg[-1, -1] = 0  # the bias is not shrunk
            return torch.linalg.solve(a.T @ a + reg, a.T @ b)

        errors = {a: ((xb[cut:] @ solve(xb[:cut], y[:cut], a) - y[cut:]) ** 2).mean().item() for a in _ALPHAS}
        return solve(xb, y, min(errors, key=lambda a: errors[a])).float()

    def mapper(self, w: torch.Tensor, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: x @ w[:-1] + w[-1]

    def save(self, path: Path, head: dict, inv_s: torch.Tensor, inv_r: torch.Tensor, maps: list[dict]) -> None:
        tensors = {"sender_inv_freq": inv_s, "receiver_inv_freq": inv_r}
        for j, m in enumerate(maps):
            tensors[f"layer{j}.k"], tensors[f"layer{j}.v"] = m["k"].contiguous(), m["v"].contiguous()
        save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in head.items()})

    def load(self, path: Path) -> tuple[dict, torch.Tensor, torch.Tensor, list[dict]]:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), "pt") as f:
            head = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = load_file(str(path))
        maps = [{p: tensors[f"layer{j}.{p}"] for p in ("k", "v")} for j in range(len(head["sources"]))]
        return head, tensors["sender_inv_freq"], tensors["receiver_inv_freq"], maps


METHODS = {m.name: m for m in (StatsMap(), RidgeMap())}
