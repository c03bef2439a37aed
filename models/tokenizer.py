"""Byte-level tokenizer of the enwik8 Reformer checkpoints and of the bundled demo model.

Token id = UTF-8 byte + ``offset`` (2): ids 0 and 1 are reserved (padding, end of sequence), so the vocabulary has
258 entries. Decoding drops reserved ids and replaces invalid UTF-8 (a sampled byte sequence may cut a character).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    offset: int = 2

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def is_special(self, token: int) -> bool:
        """A reserved id (padding, end of sequence): no text of its own."""
        return token < self.offset

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "bytes", "offset": self.offset}, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer: cannot read {path} ({exc}); expected a JSON file") from exc
        offset = data.get("offset") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("type") != "bytes" or isinstance(offset, bool) \
                or not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"tokenizer: {path} has {str(data)[:80]}; expected "
                              "{'type': 'bytes', 'offset': <int >= 0>}")
        return cls(offset=offset)
