"""Sessions: a dialogue's context kept at the sender, so each call sends only its new text.

A call in session S with text T hands on the context  (S's context so far) + "\\n" + T,  and that
becomes S's context once the handoff succeeds. A call whose text repeats the session's last turn
exactly is that turn again (a client's retry after a lost reply), and appends nothing. A session
remembers the codec its last turn named, so a turn that names none keeps it (and stays a delta
card) instead of falling back to the sender's default. The prompt
format cuts the context after a newline
(qkv_core.model.prompt), so the previous context's tokens are a prefix of the new one's and the
card can be a delta. Sessions are per tenant, in memory; calls within one session are meant to
come one after another (a dialogue).

Bounds: `max_bytes` counts the memory a session holds (its strings as Python holds them and the
entry around them, `held_bytes`), least recently used dropped past it across all tenants; and a
tenant holds at most `max_per_tenant` sessions, its own least recently used dropped past that, so
one tenant's many small sessions cannot push out everyone else's.
"""
from __future__ import annotations

import re
import sys
from collections import OrderedDict

from qkv_core.errors import RequestError
from qkv_core.store.lru import ByteLRU

SESSION_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# What Python holds beyond the strings (tracemalloc): a session's key and value tuples and its
# places in two ordered maps; a tenant's own map of its sessions.
ENTRY_BYTES = 330
TENANT_BYTES = 480


def held_bytes(session: str, context: str, last: str, codec: str = "") -> int:
    """The memory one session takes: its strings and its entry."""
    return sum(map(sys.getsizeof, (session, context, last, codec))) + ENTRY_BYTES


class Sessions:
    def __init__(self, max_bytes: int, max_per_tenant: int = 4096):
        self.max_bytes, self.max_per_tenant = max_bytes, max_per_tenant
        # (session, context, last turn, codec)
        self._texts: ByteLRU[tuple[str, str], tuple[str, str, str, str]] = ByteLRU(lambda held: held_bytes(*held))
        self._of: dict[str, OrderedDict[str, None]] = {}  # tenant -> its sessions, least recently used first

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
        _, context, last, _ = held
        return f"{context}\n{text}" if text and text != last else context

    def codec(self, tenant: str, session: str) -> str:
        """The codec the session's last turn named ("" for a new session)."""
        held = self._texts.peek((tenant, session))
        return held[3] if held is not None else ""

    def commit(self, tenant: str, session: str, context: str, text: str, codec: str = "") -> None:
        """`context` is now the session's, `text` the turn that made it and `codec` the codec it named
        (after its handoff succeeded)."""
        key = (tenant, session)
        before = self._texts.pop(key)
        self._texts.add(key, (session, context.strip(), text.strip() or (before[2] if before else ""), codec))
        own = self._of.setdefault(tenant, OrderedDict())
        own[session] = None
        own.move_to_end(session)
        while len(own) > self.max_per_tenant:
            self._texts.pop((tenant, own.popitem(last=False)[0]))
        for gone_tenant, gone in self._texts.shrink_to(self.max_bytes - TENANT_BYTES * len(self._of), keep=key):
            held = self._of[gone_tenant]
            held.pop(gone, None)
            if not held:
                del self._of[gone_tenant]

    @property
    def nbytes(self) -> int:
        """The memory the sessions hold, as counted against max_bytes."""
        return self._texts.nbytes + TENANT_BYTES * len(self._of)

    def __len__(self) -> int:
        return len(self._texts)
