"""Task heads over ``ReformerModel`` (HF-identical), and the loader that picks the class a checkpoint was saved as.

* ``ReformerForSequenceClassification``: logits [B, num_labels] from the first position's hidden state (HF's
  ``ReformerClassificationHead``: dense -> tanh -> out_proj; dropout is off at inference).
* ``ReformerForQuestionAnswering``: start and end logits [B, L] from one linear layer over every position (HF's
  ``qa_outputs``; it needs ``num_labels`` = 2).
* ``load_pretrained(path)``: the class named by ``config.json``'s ``architectures`` (transformers' AutoModel rule);
  with none listed, an LM when the weights carry an LM head, else the bare model.

``TASKS`` names what each class computes (its outputs and whether they are per position): the exporter, the
runtime and the server read it instead of testing classes one by one. The loss a head was trained with
(``problem_type``) matters at inference only for turning logits into probabilities, which the runtime does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .checkpoint import CONFIG_FILE
from .config import ReformerConfig
from .errors import CheckpointError, ConfigError
from .modeling import ReformerLM, ReformerModel, _PretrainedMixin


class ClassificationHead(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(hidden[:, 0])))  # [B, 2*hidden] of the first token -> [B, C]


class ReformerForSequenceClassification(_PretrainedMixin, nn.Module):
    """``model(input_ids, attention_mask=None)`` -> logits [B, num_labels] (HF's
    ``ReformerForSequenceClassification``)."""

    ARCHITECTURE = "ReformerForSequenceClassification"
    HEAD_PREFIXES = ("classifier.",)

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.reformer = ReformerModel(config)
        self.config = self.reformer.config
        self.classifier = ClassificationHead(self.config)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.reformer(input_ids, attention_mask))


class QuestionAnsweringOutput(NamedTuple):
    start_logits: torch.Tensor  # [B, L]
    end_logits: torch.Tensor  # [B, L]


class ReformerForQuestionAnswering(_PretrainedMixin, nn.Module):
    """``model(input_ids, attention_mask=None)`` -> (start_logits, end_logits), each [B, L] (HF
    ``ReformerForQuestionAnswering``)."""

    ARCHITECTURE = "ReformerForQuestionAnswering"
    HEAD_PREFIXES = ("qa_outputs.",)

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        if config.num_labels != 2:
            raise ConfigError(f"num_labels: got {config.num_labels} for question answering; expected 2 (a start "
                              "and an end logit per position, as HF's head splits them)")
        self.reformer = ReformerModel(config)
        self.config = self.reformer.config
        self.qa_outputs = nn.Linear(2 * self.config.hidden_size, 2)
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> QuestionAnsweringOutput:
        start, end = self.qa_outputs(self.reformer(input_ids, attention_mask)).unbind(dim=-1)  # [B, L] each
        return QuestionAnsweringOutput(start, end)


Reformer = ReformerLM | ReformerModel | ReformerForSequenceClassification | ReformerForQuestionAnswering


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model class computes: its outputs in order, and which of them have one row per position."""

    name: str
    outputs: tuple[str, ...]
    per_position: tuple[bool, ...]


TASKS: dict[type, Task] = {
    ReformerLM: Task("lm", ("logits",), (True,)),
    ReformerModel: Task("base", ("last_hidden_state",), (True,)),
    ReformerForSequenceClassification: Task("classification", ("logits",), (False,)),
    ReformerForQuestionAnswering: Task("question_answering", ("start_logits", "end_logits"), (True, True)),
}
#: ``architectures`` entries -> class (HF's names; an encoder LM is saved as ReformerForMaskedLM).
ARCHITECTURES: dict[str, type] = {
    "ReformerModelWithLMHead": ReformerLM, "ReformerForMaskedLM": ReformerLM, "ReformerModel": ReformerModel,
    "ReformerForSequenceClassification": ReformerForSequenceClassification,
    "ReformerForQuestionAnswering": ReformerForQuestionAnswering,
}


def task_of(model: nn.Module) -> Task:
    try:
        return TASKS[type(model)]
    except KeyError:
        raise ConfigError(f"model: got {type(model).__name__}; expected one of "
                          f"{sorted(c.__name__ for c in TASKS)}") from None


def model_class(directory: Path) -> type | None:
    """The class ``config.json``'s ``architectures`` names (None: none listed, or unreadable -- the loader then
    reports the config with its own message)."""
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    names = data.get("architectures") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names:
        return None
    known = [ARCHITECTURES[name] for name in names if name in ARCHITECTURES]
    if not known:
        raise ConfigError(f"architectures: got {names}; expected one of {sorted(ARCHITECTURES)}")
    return known[0]


def load_pretrained(path: str | Path, max_length: int | None = None) -> Reformer:
    """The model a checkpoint directory was saved as (see the module docstring)."""
    directory = Path(path)
    cls = model_class(directory)
    if cls is not None:
        return cls.from_pretrained(directory, max_length)
    try:
        return ReformerLM.from_pretrained(directory, max_length)
    except CheckpointError as lm_error:
        try:
            return ReformerModel.from_pretrained(directory, max_length)
        except CheckpointError:
            raise lm_error from None  # neither loads: the first reason is the one to fix
