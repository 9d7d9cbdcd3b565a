"""Long prompts for demos and tests: a passkey-retrieval haystack."""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? Answer with the number only."


@dataclass(frozen=True)
class PasskeyPrompt:
    """A chat prompt hiding ``passkey`` in filler text.  ``input_ids`` is ``(1, n)``."""

    text: str
    passkey: str
    input_ids: "object"
    attention_mask: "object"

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


def passkey_prompt(tokenizer, n_tokens: int = 1500, *, depth: float = 0.5, seed: int = 0) -> PasskeyPrompt:
    """Build a chat-formatted passkey-retrieval prompt of about ``n_tokens`` tokens (filler is added
    until the tokenised prompt reaches ``n_tokens``); the 5-digit key sits at ``depth`` (0..1) of the
    filler.  Deterministic for a given ``seed``."""
    if n_tokens < 64:
        raise ValueError(f"n_tokens must be at least 64, got {n_tokens}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    passkey = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])

    def build(repeats: int):
        at = int(repeats * depth)
        body = FILLER * at + needle + FILLER * (repeats - at)
        messages = [{"role": "user", "content": "There is a pass key hidden in this text. " + body + "\n" + QUESTION}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return body, enc

    repeats = max(1, n_tokens // per_filler)
    body, enc = build(repeats)
    while enc["input_ids"].shape[-1] > n_tokens and repeats > 1:
        repeats -= 1
        body, enc = build(repeats)
    return PasskeyPrompt(body, passkey, enc["input_ids"], enc["attention_mask"])
