"""TensorRT optimization profiles: batch x length bounds for ``input_ids`` and ``attention_mask``.

``parse_batch_length("4x8192", "--max")`` reads a command-line shape; ``make_profile`` fills the defaults and checks
min <= opt <= max against the longest input the ONNX export accepts. Plain Python: no TensorRT here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from reformer_rt.models import InputError

from .batching import DEFAULT_MAX_TOKENS


class ProfileError(InputError):
    """A bad ``--min/--opt/--max`` shape."""


class BatchLength(NamedTuple):
    batch: int
    length: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.length}"


_BXL = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def parse_batch_length(text: str, option: str) -> BatchLength:
    """``"4x8192"`` -> BatchLength(4, 8192); ``option`` names the flag in errors."""
    match = _BXL.fullmatch(text)
    if match is None:
        raise ProfileError(f"{option}: got {text!r}; expected BxL (batch x length in tokens), such as 4x8192")
    shape = BatchLength(int(match.group(1)), int(match.group(2)))
    if shape.batch < 1 or shape.length < 1:
        raise ProfileError(f"{option}: got {text!r}; expected batch >= 1 and length >= 1")
    return shape


@dataclasses.dataclass(frozen=True)
class Profile:
    """The one optimization profile of an engine: B x L bounds shared by ``input_ids`` and ``attention_mask``."""

    min: BatchLength
    opt: BatchLength
    max: BatchLength

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def __str__(self) -> str:
        return f"min {self.min}, opt {self.opt}, max {self.max}"


def make_profile(min_shape: BatchLength | None, opt_shape: BatchLength | None, max_shape: BatchLength | None,
                 max_length: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> Profile:
    """A checked profile; defaults: max = (max_tokens // max_length) x max_length, min = 1x1, opt = max."""
    maximum = max_shape or BatchLength(max(1, max_tokens // max_length), max_length)
    profile = Profile(min_shape or BatchLength(1, 1), opt_shape or maximum, maximum)
    if profile.max.length > max_length:
        raise ProfileError(f"--max: got length {profile.max.length}; expected at most {max_length}, the longest "
                           "input the ONNX file was exported for (re-export with a larger --max-length)")
    for name, low, high in (("--opt", profile.min, profile.opt), ("--max", profile.opt, profile.max)):
        if low.batch > high.batch or low.length > high.length:
            raise ProfileError(f"{name}: got {high}, below {low}; expected min <= opt <= max in both batch and "
                               f"length (profile {profile})")
    return profile
