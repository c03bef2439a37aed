"""Text <-> token ids for the models this project runs.

* Byte level (enwik8 checkpoints and the bundled demo model): id = byte + 2, vocabulary 258. Chosen when the
  model directory has our ``tokenizer.json``, or the vocabulary is 258 and there is no SentencePiece model.
* SentencePiece (crime-and-punishment checkpoints): ``spiece.model`` in the model directory; needs the
  ``sentencepiece`` package (imported only then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from reformer_rt.models import ConfigError, ReformerConfig
from reformer_rt.models.tokenizer import TOKENIZER_FILE, ByteTokenizer

SPIECE_FILE = "spiece.model"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError as exc:
            raise ConfigError(f"tokenizer: {path} needs the sentencepiece package; pip install sentencepiece") from exc
        self._sp = sentencepiece.SentencePieceProcessor()
        if not self._sp.Load(str(path)):
            raise ConfigError(f"tokenizer: cannot load {path}")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))


def load_tokenizer(directory: Path | None, config: ReformerConfig) -> Tokenizer:
    """The tokenizer stored with a model (``directory`` may be None for an ONNX file without one beside it)."""
    if directory is not None and (directory / TOKENIZER_FILE).exists():
        return ByteTokenizer.load(directory)
    if directory is not None and (directory / SPIECE_FILE).exists():
        return SentencePieceTokenizer(directory / SPIECE_FILE)
    if config.vocab_size == ByteTokenizer().vocab_size:
        return ByteTokenizer()
    raise ConfigError(f"tokenizer: none found for a model with vocab_size={config.vocab_size}; expected "
                      f"{TOKENIZER_FILE} or {SPIECE_FILE} in the model directory (pass --tokenizer DIR)")
