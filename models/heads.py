"""Task heads over ``ReformerModel`` (HF-identical), the task table, and the loader that picks the class a checkpoint
was saved as.

* ``ReformerForSequenceClassification``: logits [B, num_labels] from the first position's hidden state (HF's
  ``ReformerClassificationHead``: dense -> tanh -> out_proj; dropout is off at inference).
* ``ReformerForQuestionAnswering``: start and end logits [B, L] from one linear layer over every position (HF's
  ``qa_outputs``; it needs ``num_labels`` = 2).
* ``load_pretrained(path)``: the class named by ``config.json``'s ``architectures`` (transformers' AutoModel rule);
  with none listed, an LM when the weights carry an LM head, else the bare model.

``TASKS`` is the one table of what each class computes: per task, its raw outputs (``RawOutput``: name, per
position or per sequence, width, how the head computes it from the last hidden state) -- first those its
``forward`` returns, which are the exported graph's outputs in order, then any the PyTorch model gives cheaply
beside them (the LM's logits at each row's last position). The exporter, the export metadata check, the backends,
the Session's outputs and the Triton repository all read it instead of testing classes or task names. The loss a
head was trained with (``problem_type``) matters at inference only for turning logits into probabilities, which
the runtime does.

A new head is one class and one row; everything downstream follows (export, metadata, every backend, the Session's
and the server's outputs, each raw output passed through under its graph name)::

    class ReformerForTokenClassification(_PretrainedMixin, nn.Module):
        ARCHITECTURE = "ReformerForTokenClassification"
        HEAD_PREFIXES = ("classifier.",)
        ...  # __init__: self.reformer, self.classifier; forward: self.classifier(self.reformer(ids, mask))

    TASKS = {...,  # its row:
             ReformerForTokenClassification: Task("token_classification", (
                 RawOutput("token_logits", True, "labels", lambda model, hidden, mask: model.classifier(hidden),
                           "class logits of every position", graph_name="logits"),))}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


#: The widths a raw output's last dimension can have (``RawOutput.size``).
WIDTHS = ("vocab", "labels", "hidden", "none")
#: (model, last hidden state [B, L, 2*hidden], mask [B, L]) -> one raw output of that model's head.
Compute = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RawOutput:
    """One array a model computes for a batch of B rows of length L: per position [B, L, ...] or per sequence
    [B, ...], ending in a dimension of ``width`` ("none": no such dimension, [B, L] scalars)."""

    name: str  # unique across tasks: the runtime derives its outputs from it (``runtime/outputs.py``)
    per_position: bool
    width: str
    compute: Compute
    doc: str  # what it holds, for the callers it is passed through to
    #: Its name in the model's graph when that is not ``name`` (a graph output name may mean other things in
    #: other tasks: the classification graph calls its class logits "logits", like the LM's).
    graph_name: str | None = None

    def __post_init__(self) -> None:
        if self.width not in WIDTHS:
            raise ConfigError(f"raw output {self.name!r}: width {self.width!r}; expected one of {WIDTHS}")

    @property
    def exported_name(self) -> str:
        """Its name as a graph (or engine) output, and as the output callers ask for it by."""
        return self.graph_name or self.name

    def size(self, config: ReformerConfig) -> int | None:
        """The size of its last dimension for ``config`` (None for "none")."""
        return {"vocab": config.vocab_size, "labels": config.num_labels,
                "hidden": 2 * config.hidden_size}.get(self.width)


def _last_position_logits(model: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    last = (mask != 0).sum(dim=1).clamp(min=1) - 1  # [B]: the last valid position of each row
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, 2*hidden]
    return model.lm_head(rows[:, None])  # [B, 1, vocab]


#: The body's own output, which the PyTorch model gives for every task (the base model's only one).
HIDDEN_STATE = RawOutput("last_hidden_state", True, "hidden", lambda model, hidden, mask: hidden,
                         "final hidden states at every position")
LM_LOGITS = RawOutput("logits", True, "vocab", lambda model, hidden, mask: model.lm_head(hidden),
                      "logits at every position")
#: The LM head at each row's last valid position only, [B, 1, vocab]: the last-position outputs for a fraction of
#: the cost of ``LM_LOGITS``.
LAST_LOGITS = RawOutput("logits_at_last", True, "vocab", _last_position_logits,
                        "logits of each row's last position")
CLASS_LOGITS = RawOutput("class_logits", False, "labels", lambda model, hidden, mask: model.classifier(hidden),
                         "class logits", graph_name="logits")
START_LOGITS = RawOutput("start_logits", True, "none", lambda model, hidden, mask: model.qa_outputs(hidden)[..., 0],
                         "answer-start logit of every position")
END_LOGITS = RawOutput("end_logits", True, "none", lambda model, hidden, mask: model.qa_outputs(hidden)[..., 1],
                       "answer-end logit of every position")


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model class computes: ``graph``, the outputs its ``forward`` returns (= its exported graph's, in
    order), and ``extra``, further raw outputs the PyTorch model gives from the same forward pass."""

    name: str
    graph: tuple[RawOutput, ...]
    extra: tuple[RawOutput, ...] = ()

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph's output names, in order."""
        return tuple(raw.exported_name for raw in self.graph)

    @property
    def per_position(self) -> tuple[bool, ...]:
        """Per graph output: whether it has one row per position."""
        return tuple(raw.per_position for raw in self.graph)

    @property
    def default_outputs(self) -> tuple[str, ...]:
        """What ``Session.run`` gives when no outputs are named: the model's own outputs, as they are."""
        return self.outputs

    @property
    def raw_outputs(self) -> tuple[RawOutput, ...]:
        """Every raw output the PyTorch model gives, primary first: the graph's, the extras, the hidden state."""
        return tuple({raw.name: raw for raw in (*self.graph, *self.extra, HIDDEN_STATE)}.values())


TASKS: dict[type, Task] = {
    ReformerLM: Task("lm", (LM_LOGITS,), (LAST_LOGITS,)),
    ReformerModel: Task("base", (HIDDEN_STATE,)),
    ReformerForSequenceClassification: Task("classification", (CLASS_LOGITS,)),
    ReformerForQuestionAnswering: Task("question_answering", (START_LOGITS, END_LOGITS)),
}
#: ``architectures`` entries -> class: each class's own (HF's names), and an encoder LM saved as ReformerForMaskedLM.
ARCHITECTURES: dict[str, type] = {**{cls.ARCHITECTURE: cls for cls in TASKS}, "ReformerForMaskedLM": ReformerLM}


def task_of(model: nn.Module) -> Task:
    try:
        return TASKS[type(model)]
    except KeyError:
        raise ConfigError(f"model: got {type(model).__name__}; expected one of "
                          f"{sorted(c.__name__ for c in TASKS)}") from None


def task_named(name: str) -> Task:
    """The task called ``name`` (as an export's metadata records it)."""
    for task in TASKS.values():
        if task.name == name:
            return task
    raise ConfigError(f"task: got {name!r}; expected one of {[task.name for task in TASKS.values()]}")


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
