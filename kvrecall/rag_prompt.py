"""Prompts built at the token level, so a cached prefix is exactly the prefix of every prompt that uses it.

A prompt is ``head + (document + separator) * k + tail``: ``head`` is the chat template up to the user's message
plus a fixed instruction, ``tail`` the question and the end of the template up to the assistant's turn. Each part
is tokenized on its own (no special tokens added), so the token ids of ``head + doc_a + sep`` are the same
whether ``doc_a`` is cached alone or inside a longer prompt. Tokenizers without a chat template get a plain
``Question: ... Answer:`` tail.

Also the planted-passcode helpers used by the RAG and streaming tests and benches.
"""

from __future__ import annotations

import random

import torch

__all__ = ["PromptLayout", "INSTRUCTION", "plant_passcode", "passcode_sentence", "PASSCODE_QUESTION", "random_code"]

INSTRUCTION = "Read the text and answer the question.\n\n"
PASSCODE_QUESTION = "What is the passcode?"
_MARK = "\x00@kvrecall@\x00"


class PromptLayout:
    """Token ids of the fixed parts of a document-QA prompt.

    Parameters
    ----------
    tokenizer : a transformers tokenizer (its chat template is used when it has one).
    instruction : str
        Fixed text right after the start of the user's message.
    separator : str
        Text after every document.
    """

    def __init__(self, tokenizer, instruction: str = INSTRUCTION, separator: str = "\n\n") -> None:
        self.tokenizer = tokenizer
        self.instruction = instruction
        template = getattr(tokenizer, "chat_template", None)
        if template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                                     add_generation_prompt=True)
            self._pre, self._post = rendered.split(_MARK)
        else:
            self._pre, self._post = "", "\nAnswer:"
        self.head_ids = self.encode(self._pre + instruction)
        self.sep_ids = self.encode(separator)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` without special tokens added: ``Tensor[n]`` int64."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    def document_ids(self, text: str) -> torch.Tensor:
        """``document + separator`` ids (the unit stored per document)."""
        return torch.cat([self.encode(text), self.sep_ids])

    def tail_ids(self, question: str) -> torch.Tensor:
        """Question and the rest of the template, up to where the assistant's answer starts."""
        prefix = "" if self._post != "\nAnswer:" else "Question: "
        return self.encode(prefix + question + self._post)

    def prompt(self, documents: list[torch.Tensor], question: str) -> torch.Tensor:
        """Whole prompt ``head + docs + tail`` (``documents`` from :meth:`document_ids`)."""
        return torch.cat([self.head_ids, *documents, self.tail_ids(question)])


def passcode_sentence(code: str) -> str:
    """The planted fact (the phrasing SmolLM2-135M-Instruct answers reliably)."""
    return f"\nThe passcode is {code}. Remember it. {code} is the passcode.\n"


def plant_passcode(text: str, depth: float, code: str) -> str:
    """``text`` with :func:`passcode_sentence` inserted at a line break near fraction ``depth`` of its length."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    at = int(len(text) * depth)
    nl = text.rfind("\n", 0, at)
    at = nl if nl > 0 else at
    return text[:at] + passcode_sentence(code) + text[at:]


def random_code(rng: random.Random) -> str:
    """A five-digit passcode."""
    return str(rng.randint(10000, 99999))
