"""Text <-> token ids for the models this project runs.

* Byte level (enwik8 checkpoints and the bundled demo model): id = byte + 2, vocabulary 258. Chosen when the
  model directory has our ``tokenizer.json``, or the vocabulary is 258 and there is no SentencePiece model.
* SentencePiece (crime-and-punishment checkpoints): ``spiece.model`` in the model directory; needs the
  ``sentencepiece`` package (imported only then).

A tokenizer whose ids do not fit the model's vocabulary is refused when it is loaded, not at the first out-of-range
id; a directory named explicitly (``--tokenizer``) must hold one of the two files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from reformer_rt.models import ConfigError, InputError, ReformerConfig
from reformer_rt.models.tokenizer import TOKENIZER_FILE, ByteTokenizer

SPIECE_FILE = "spiece.model"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def is_special(self, token: int) -> bool:
        """A control id (padding, end of sequence, unknown) rather than a piece of text."""
        ...


class SentencePieceTokenizer:
    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError as exc:
            raise ConfigError(f"tokenizer: {path} needs the sentencepiece package; pip install sentencepiece") from exc
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            loaded = self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:  # sentencepiece raises RuntimeError for a corrupt model file
            raise ConfigError(f"tokenizer: cannot load {path} ({str(exc).splitlines()[0]}); expected a "
                              "SentencePiece model file -- re-download it") from exc
        if not loaded:
            raise ConfigError(f"tokenizer: cannot load {path}; expected a SentencePiece model file")
        self.vocab_size = int(self._sp.GetPieceSize())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    def is_special(self, token: int) -> bool:
        return bool(self._sp.IsControl(token) or self._sp.IsUnknown(token))


def load_tokenizer(directory: Path | None, config: ReformerConfig, required: bool = False) -> Tokenizer:
    """The tokenizer stored with a model (``directory`` may be None for an ONNX file without one beside it).
    ``required``: ``directory`` was named by the user, so it must hold a tokenizer (no byte-level fallback)."""
    tokenizer: ByteTokenizer | SentencePieceTokenizer
    if directory is not None and (directory / TOKENIZER_FILE).exists():
        tokenizer = ByteTokenizer.load(directory)
    elif directory is not None and (directory / SPIECE_FILE).exists():
        tokenizer = SentencePieceTokenizer(directory / SPIECE_FILE)
    elif required:
        raise ConfigError(f"tokenizer: {directory} holds neither {TOKENIZER_FILE} nor {SPIECE_FILE}; expected the "
                          "directory of the model's tokenizer")
    elif config.vocab_size == ByteTokenizer().vocab_size:
        return ByteTokenizer()
    else:
        raise ConfigError(f"tokenizer: none found for a model with vocab_size={config.vocab_size}; expected "
                          f"{TOKENIZER_FILE} or {SPIECE_FILE} in the model directory (pass --tokenizer DIR)")
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer: the one in {directory} gives ids up to {tokenizer.vocab_size - 1}; the model's "
                          f"vocabulary has {config.vocab_size} ids -- is it this model's tokenizer?")
    return tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A ``--prompt``'s token ids, or an error for an empty prompt or one that is not UTF-8 text."""
    try:
        ids = tokenizer.encode(prompt)
    except UnicodeEncodeError as exc:  # undecodable command-line bytes arrive as lone surrogates
        raise InputError(f"--prompt: got bytes that are not UTF-8 text ({exc.reason}); expected UTF-8 text") from exc
    if not ids:
        raise InputError("--prompt: got an empty prompt; expected at least one character")
    return list(ids)


class TextStream:
    """Token ids in, newly complete text out: decodes everything so far and returns what was not printed yet,
    holding back a trailing replacement character (a UTF-8 character still missing bytes)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._printed = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids).rstrip("\ufffd")
        if not text.startswith(self._printed):  # a tokenizer that rewrote earlier text: print from the change
            common = next((i for i, (a, b) in enumerate(zip(text, self._printed)) if a != b), len(self._printed))
            self._printed = self._printed[:common]
        new, self._printed = text[len(self._printed):], text
        return new

    def flush(self) -> str:
        """What is held back at the end (an incomplete character, as the replacement character)."""
        text = self._tokenizer.decode(self._ids)
        return text[len(self._printed):]
