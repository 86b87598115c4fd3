"""Token ids to text as they stream, with the bytes that never form UTF-8 shown as U+FFFD.

ORT GenAI's TokenizerStream drops such bytes silently (and ``Tokenizer.decode`` stops at the first), while HF
transformers, vLLM and llama-server write U+FFFD for them: one set of weights would say different things behind
this API. For byte-level BPE tokenizers (GPT-2's scheme: Llama 3, Qwen, Phi-4, the bundled model) the server
knows every token's bytes from tokenizer.json and decodes them itself with Python's incremental UTF-8 decoder,
which holds back an unfinished character and replaces what can never be one, as those engines do. Other
tokenizers keep the runtime's stream.
"""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class TextStream(Protocol):
    """One sequence's decoder: text for each new token, and what is left when the sequence ends."""

    def decode(self, token: int) -> str:
        """The text this token completes (may be empty while a character is unfinished)."""
        ...

    def flush(self) -> str:
        """What is still held back, once no token follows."""
        ...


class ByteStream:
    """Decodes tokens through their bytes: U+FFFD for bytes that cannot be UTF-8."""

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, token: int) -> str:
        """See ``TextStream``."""
        return self._utf8.decode(self._table[token] if 0 <= token < len(self._table) else b"")

    def flush(self) -> str:
        """See ``TextStream``."""
        return self._utf8.decode(b"", final=True)


class RuntimeStream:
    """The runtime's own TokenizerStream, for tokenizers whose bytes the server cannot read."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def decode(self, token: int) -> str:
        """See ``TextStream``."""
        return str(self._stream.decode(token))

    def flush(self) -> str:
        """See ``TextStream``."""
        return ""


def byte_table(model_path: Path) -> list[bytes] | None:
    """Every token's bytes, for a byte-level BPE tokenizer.json; None for any other kind. Special tokens are
    empty, as decoding skips them."""
    try:
        spec = json.loads((model_path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        return None
    to_byte = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab: dict[str, int] = model.get("vocab") or {}
    added = spec.get("added_tokens") or []
    size = max([*vocab.values(), *(t["id"] for t in added)], default=-1) + 1
    table = [b""] * size
    for text, token in vocab.items():
        if not all(char in to_byte for char in text):
            log.info("tokenizer.json is not byte-level throughout: the runtime's decoder is used")
            return None
        table[token] = bytes(to_byte[char] for char in text)
    for token in added:
        table[token["id"]] = b"" if token.get("special") else str(token["content"]).encode()
    return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of every byte to a printable character (the alphabet byte-level BPE vocabularies are written in):
    printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping
