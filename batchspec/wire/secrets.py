"""Which keys are secrets to take out of what we record and show.

A gateway a team runs itself (vLLM, a LiteLLM proxy without auth, Ollama) ignores the key,
and the key its clients are given is a placeholder: vLLM's docs use ``EMPTY``, others ``x``
or ``none``. Replacing every occurrence of such a word by ``[redacted]`` would rewrite the
model's answers (every ``x`` in every result) and garble messages, and hide nothing: a key
of a few characters protects nothing. A key shorter than ``MIN_SECRET_LENGTH`` is therefore
taken out only where it stands as a word of its own (``Bearer x``), and never out of answers.
"""

from __future__ import annotations

import re

#: real provider keys are tens of characters long; shorter ones are placeholders
MIN_SECRET_LENGTH = 8

#: characters of a word: a short key is redacted only where none of these touch it
_WORD_CHARACTERS = r"A-Za-z0-9_\-"


def is_placeholder(key: str) -> bool:
    return len(key) < MIN_SECRET_LENGTH


def redact_word(text: str, form: str, replacement: str) -> str:
    """``text`` with ``form`` replaced where it stands alone, not inside a longer word."""
    pattern = rf"(?<![{_WORD_CHARACTERS}]){re.escape(form)}(?![{_WORD_CHARACTERS}])"
    return re.sub(pattern, replacement, text)
