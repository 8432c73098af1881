"""Model names a user types: Hugging Face hub ids (offline, from a cache the test builds), local
directories, GGUF files, the embedded names, and clear errors for everything else."""
import shutil

import pytest

from qkv_core.config import RuntimeConfig
from qkv_core.model.loading import load_model, model_source

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_of(source, root, commit=COMMIT):
    """A Hugging Face hub cache holding `source` as REPO at `commit` (main points there), the layout
    `hf download` leaves (snapshot files; the real cache links them to blobs)."""
    repo = root / "hub" / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, embedded):
    hf_home = hub_cache_of(model_source("smollm2-135m"), tmp_path / "hf")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


@pytest.mark.integration
def test_a_hub_id_loads_from_the_cache_offline_as_the_same_model(offline_hub, embedded):
    assert model_source(REPO) == offline_hub / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    lm = load_model(RuntimeConfig(model=REPO, device="cpu", dtype="float32"))
    assert lm.fingerprint.name == REPO
    assert lm.fingerprint.mismatch(embedded.fingerprint) == []  # the same weights and tokenizer


@pytest.mark.integration
def test_a_pinned_revision_resolves_and_an_uncached_one_is_a_clear_error(offline_hub):
    assert model_source(REPO, COMMIT).name == COMMIT
    with pytest.raises(ValueError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE is set"):
        model_source(REPO, "f" * 40)
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        model_source("meta-llama/Llama-3.1-8B-Instruct")


def test_names_that_are_no_model_are_refused_with_the_accepted_forms(tmp_path):
    for name in ("no-such-model", str(tmp_path / "missing.gguf"), str(tmp_path), "./a/b"):
        with pytest.raises(ValueError, match="Hugging Face id"):
            model_source(name)


def test_a_local_directory_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_source(str(tmp_path)) == tmp_path
