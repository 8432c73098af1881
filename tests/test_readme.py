"""The README's Python client example runs as pasted, against live services (their addresses put
in for the defaults it names), and prints the answers it promises."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_client_example_runs(services):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if "SenderClient(" in b]
    code = example.replace("localhost:50062", services.sender).replace("localhost:50061", services.receiver)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    printed = out.getvalue()
    assert "600" in printed and "smaller than fp16 KV" in printed and "Lyon" in printed, printed
