"""Sessions: a dialogue's context kept at the sender, so each call sends only its new text.

A call in session S with text T hands on the context  (S's context so far) + "\\n" + T,  and that
becomes S's context once the handoff succeeds. A call whose text repeats the session's last turn
exactly is that turn again (a client's retry after a lost reply), and appends nothing. The prompt
format cuts the context after a newline
(qkv_core.model.prompt), so the previous context's tokens are a prefix of the new one's and the
card can be a delta. Sessions are per tenant, in memory, least recently used dropped past
`max_bytes` of text; calls within one session are meant to come one after another (a dialogue).
"""
from __future__ import annotations

import re

from qkv_core.errors import RequestError
from qkv_core.store.lru import ByteLRU

SESSION_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class Sessions:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._texts: ByteLRU[tuple[str, str]] = ByteLRU(lambda held: len(held[0].encode()))  # (context, last turn)

    def context(self, tenant: str, session: str, text: str) -> str:
        """The context a call in `session` hands on: the session's so far, then `text` (which may be
        empty: the same context again, e.g. another question)."""
        if not SESSION_ID.fullmatch(session):
            raise RequestError("a session id is 1 to 128 letters, digits or ._:@/+=-")
        text = text.strip()
        held = self._texts.get((tenant, session))
        if held is None:
            if not text:
                raise RequestError(f"session {session!r} is not open here (new, or expired), and the context is empty")
            return text
        context, last = held
        return f"{context}\n{text}" if text and text != last else context

    def commit(self, tenant: str, session: str, context: str, text: str) -> None:
        """`context` is now the session's, `text` the turn that made it (after its handoff succeeded)."""
        key = (tenant, session)
        held = self._texts.pop(key)
        self._texts.add(key, (context.strip(), text.strip() or (held[1] if held else "")))
        self._texts.shrink_to(self.max_bytes, keep=key)

    def __len__(self) -> int:
        return len(self._texts)
