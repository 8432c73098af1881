"""What the vLLM tests share: the cards make_cards.py made (`make test-vllm`) and one vLLM engine
with the connector, the reference the answers on cards are compared with."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CARDS = Path(os.environ.get("QKVCOMM_VLLM_CARDS", "build/vllm-cards"))


@pytest.fixture(scope="session")
def made() -> dict:
    if not (CARDS / "rows.json").exists():
        pytest.skip(f"no cards in {CARDS} (make test-vllm makes them)")
    return json.loads((CARDS / "rows.json").read_text())


@pytest.fixture(scope="session")
def llm(made: dict):
    pytest.importorskip("vllm", reason="the vLLM environment (make test-vllm) is not this one")
    from qkvcomm_vllm.connector import transfer_config  # noqa: PLC0415
    from vllm import LLM  # noqa: PLC0415
    from vllm.config import KVTransferConfig  # noqa: PLC0415

    config = KVTransferConfig(**transfer_config(str(CARDS / "store"), made["namespace"]))
    # no prefix caching: every token vLLM does not compute must come from the card
    return LLM(model=made["model_dir"], dtype="float32", max_model_len=4096, enforce_eager=True,
               enable_prefix_caching=False, kv_transfer_config=config, seed=0, block_size=32)
