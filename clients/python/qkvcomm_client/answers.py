"""Answers as they stream in: text pieces, then one stats message (HandoffStats from a sender's
Ask, GenerateStats from a receiver's Generate)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from qkvcomm_client.errors import raised_as_qkvcomm

OnText = Callable[[str], None]


@dataclass
class Answer:
    text: str
    stats: Message | None  # qkvcomm.v1.HandoffStats (Ask) or GenerateStats (Generate); None if cut short

    def to_dict(self) -> dict[str, Any]:
        """The answer and every stats field (uint64 as numbers, not proto3 JSON's strings)."""
        stats = {}
        if self.stats is not None:
            stats = MessageToDict(self.stats, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
            _uint64_as_int(self.stats.DESCRIPTOR, stats)
        return {"answer": self.text.strip(), **stats}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _uint64_as_int(descriptor: Any, data: dict[str, Any]) -> None:
    """Proto3 JSON spells 64-bit integers as strings; make them numbers again, nested messages included."""
    for f in descriptor.fields:
        if f.name not in data:
            continue
        if f.type in (f.TYPE_UINT64, f.TYPE_INT64):
            data[f.name] = [int(v) for v in data[f.name]] if isinstance(data[f.name], list) else int(data[f.name])
        elif f.message_type is not None:
            for item in data[f.name] if isinstance(data[f.name], list) else [data[f.name]]:
                _uint64_as_int(f.message_type, item)


class _Pieces:
    """What the sync and async streams share: sorting each reply into text or stats."""

    def __init__(self, call: Any, on_text: OnText | None):
        self._call, self._on_text = call, on_text
        self.pieces: list[str] = []
        self.stats: Message | None = None

    def _take(self, reply: Message) -> str | None:
        if reply.HasField("stats"):
            self.stats = reply.stats
            return None
        self.pieces.append(reply.text)
        if self._on_text:
            self._on_text(reply.text)
        return reply.text

    @property
    def answer(self) -> Answer:
        """What has arrived so far (all of it once the stream is exhausted)."""
        return Answer("".join(self.pieces), self.stats)

    def cancel(self) -> None:
        self._call.cancel()


class AnswerStream(_Pieces):
    """Iterate for the text pieces; `stats` is set when the stream ends. `drain()` returns the Answer."""

    def __iter__(self) -> Iterator[str]:
        with raised_as_qkvcomm():
            for reply in self._call:
                if (text := self._take(reply)) is not None:
                    yield text

    def drain(self) -> Answer:
        for _ in self:
            pass
        return self.answer


class AsyncAnswerStream(_Pieces):
    """`async for` the text pieces; `stats` is set when the stream ends. `await drain()` returns the Answer."""

    async def __aiter__(self) -> AsyncIterator[str]:
        with raised_as_qkvcomm():
            async for reply in self._call:
                if (text := self._take(reply)) is not None:
                    yield text

    async def drain(self) -> Answer:
        async for _ in self:
            pass
        return self.answer
