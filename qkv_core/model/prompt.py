"""The one prompt format per model, and where it is cut between sender and receiver.

The full prompt is  head + "Context:\\n" + context + "\\n" + "Question: " + question + tail,
where head/tail come from the model's chat template (or a plain "Answer:" format for base
models). The sender prefills everything up to and including the newline after the context;
the receiver's prompt starts at "Question:". Cutting there, before a non-space character,
keeps byte-level BPE from merging across the cut, so sender tokens + receiver tokens equal
the tokens of the one-piece prompt (a test checks this on real data).
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from qkv_core.config import Limits
from qkv_core.errors import RequestError

SYSTEM = "You are a helpful assistant. Answer the question in a few words, using the context when one is given."
_MARK = "\x00QKVCOMM\x00"


@dataclass(frozen=True)
class PromptFormat:
    head: str
    tail: str

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        if tokenizer.chat_template:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _MARK}]
            text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            head, tail = text.split(_MARK)
            return cls(head, tail)
        bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
        return cls(f"{bos}{SYSTEM}\n\n", "\nAnswer:")

    def context_part(self, context: str) -> str:
        """What the sender prefills: everything up to the newline after the context."""
        return f"{self.head}Context:\n{context.strip()}\n"

    def query_part(self, question: str, facts: str = "") -> str:
        """What the receiver prefills after the cache: the query (and the fact summary)."""
        lead = f"Facts: {facts}\n" if facts else ""
        return f"{lead}Question: {question.strip()}{self.tail}"

    def baseline(self, question: str, facts: str = "") -> str:
        """The question alone, no context (with `facts`: the fact summary alone): the baseline."""
        return f"{self.head}{self.query_part(question, facts)}"

    def full(self, context: str, question: str, facts: str = "") -> str:
        """Context and question as text in one prompt: the skyline."""
        return self.context_part(context) + self.query_part(question, facts)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt piece; special tokens are spelled out in the text itself."""
    return tokenizer(text, add_special_tokens=False).input_ids


CHARS_PER_TOKEN_MAX = 16  # a cheap bound before tokenizing: longer texts are refused unread


def context_ids(tokenizer: PreTrainedTokenizerBase, prompt: PromptFormat, context: str, limits: Limits) -> list[int]:
    """The context's prompt tokens; refused when empty or past max_context_tokens (checked on the
    characters first, so a megabyte is refused without tokenizing it)."""
    if not context.strip():
        raise RequestError("the context is empty")
    limits.check("max_context_tokens", len(context) // CHARS_PER_TOKEN_MAX, "the context (characters / 16)")
    ids = encode(tokenizer, prompt.context_part(context))
    limits.check("max_context_tokens", len(ids), "the context (tokens)")
    return ids
