"""Sequence-classification and question-answering heads against transformers (random weights, every parameter
perturbed, fp32): logits equal within 1e-4 on decoder and encoder configurations, ragged padded batches and lengths
that are not a chunk multiple; the loader picks the class from ``architectures``; saved heads load in transformers;
bad head configs are the project's errors."""

from __future__ import annotations

import pytest
import torch
from helpers.hf_models import ARCHITECTURES, make_hf_model

from reformer_rt.models import (
    ConfigError, ReformerConfig, ReformerForQuestionAnswering, ReformerForSequenceClassification, ReformerLM,
    ReformerModel, load_pretrained,
)
from reformer_rt.models.heads import ARCHITECTURES as CLASSES
from reformer_rt.models.heads import LAST_LOGITS, TASKS
from reformer_rt.models.presets import random_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _inputs(vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length - length // 3:] = 0  # ragged rows: right padding
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["crime_shrunk", "encoder", "enwik8_like"])
def test_sequence_classification_equals_transformers(arch: str, tmp_path) -> None:
    hf = make_hf_model(arch, transformers.ReformerForSequenceClassification, seed=1, num_labels=3,
                       problem_type="single_label_classification")
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, ReformerForSequenceClassification)
    assert ours.config.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert ours.config.problem_type == "single_label_classification"
    for length in (12, 75):  # one chunk or less (but the encoder's 8), and not a chunk multiple
        ids, mask = _inputs(ours.config.vocab_size, length)
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask).logits
            got = ours(ids, mask)
        assert got.shape == (3, 3) and (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["crime_shrunk", "encoder", "enwik8_like"])
def test_question_answering_equals_transformers(arch: str, tmp_path) -> None:
    hf = make_hf_model(arch, transformers.ReformerForQuestionAnswering, seed=1)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, ReformerForQuestionAnswering)
    for length in (12, 75):
        ids, mask = _inputs(ours.config.vocab_size, length)
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask)
            got = ours(ids, mask)
        valid = mask.bool()
        for ours_logits, theirs in ((got.start_logits, expected.start_logits), (got.end_logits, expected.end_logits)):
            assert ours_logits.shape == (3, length)
            assert (ours_logits - theirs)[valid].abs().max().item() <= TOL


def test_saved_heads_load_in_transformers_with_equal_outputs(tmp_path) -> None:
    config = ReformerConfig.from_dict(dict(ARCHITECTURES["encoder"], hash_seed=3, id2label={"0": "no", "1": "yes"},
                                           problem_type="multi_label_classification"))
    ours = random_model(config, ReformerForSequenceClassification, scale=0)
    ours.save_pretrained(tmp_path)
    hf = transformers.ReformerForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label == {0: "no", 1: "yes"} and hf.config.problem_type == "multi_label_classification"
    ids, mask = _inputs(config.vocab_size, 40)
    with torch.no_grad():
        assert (ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits).abs().max().item() <= TOL
    assert type(load_pretrained(tmp_path)) is ReformerForSequenceClassification


def test_loader_picks_the_class_from_architectures(tmp_path) -> None:
    lm = make_hf_model("crime_shrunk", transformers.ReformerModelWithLMHead, seed=1)
    lm.save_pretrained(tmp_path / "lm")
    assert type(load_pretrained(tmp_path / "lm")) is ReformerLM
    qa = make_hf_model("crime_shrunk", transformers.ReformerForQuestionAnswering, seed=1)
    qa.save_pretrained(tmp_path / "qa")
    assert type(load_pretrained(tmp_path / "qa")) is ReformerForQuestionAnswering
    # the LM class reads a QA checkpoint's body but has no head to load
    with pytest.raises(Exception, match="lm_head"):
        ReformerLM.from_pretrained(tmp_path / "qa")


@pytest.mark.parametrize("fields,words", [
    ({"num_labels": 0}, "num_labels: got 0"),
    ({"id2label": {"0": "a", "2": "b"}}, "expected the ids 0..1"),
    ({"id2label": {"0": "a"}, "num_labels": 2}, "num_labels: got 2; expected 1"),
    ({"id2label": ["a", "b"]}, "expected an object mapping ids"),
    ({"problem_type": "ranking"}, "problem_type: got 'ranking'"),
])
def test_bad_head_configs_are_config_errors(fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ReformerConfig.from_dict(dict(ARCHITECTURES["encoder"], **fields))


def test_question_answering_needs_two_labels() -> None:
    config = ReformerConfig.from_dict(dict(ARCHITECTURES["encoder"], num_labels=3))
    with pytest.raises(ConfigError, match="num_labels: got 3 for question answering; expected 2"):
        ReformerForQuestionAnswering(config)


@pytest.mark.parametrize("cls", list(TASKS), ids=lambda cls: cls.__name__)
def test_the_task_row_computes_what_the_forward_returns(cls) -> None:
    """Each row's graph outputs, computed from the body's hidden state as the torch backend does, equal what the
    class's forward (which the exporter traces) returns; every raw output has the row's shape."""
    config = ReformerConfig.from_dict(dict(ARCHITECTURES["encoder"], hash_seed=3,
                                           num_labels=2 if cls is ReformerForQuestionAnswering else 3))
    torch.manual_seed(0)
    model, task = cls(config), TASKS[cls]
    ids, mask = _inputs(config.vocab_size, 20)
    with torch.no_grad():
        returned = model(ids, mask)
        returned = tuple(returned) if isinstance(returned, tuple) else (returned,)
        hidden = (model if isinstance(model, ReformerModel) else model.reformer)(ids, mask)
        assert len(returned) == len(task.graph) == len(task.outputs)
        for raw, expected in zip(task.graph, returned):
            assert torch.equal(raw.compute(model, hidden, mask), expected)
        for raw in task.raw_outputs:
            rows = ((3, 1 if raw is LAST_LOGITS else 20) if raw.per_position else (3,))
            width = () if raw.width == "none" else (raw.size(config),)
            assert tuple(raw.compute(model, hidden, mask).shape) == rows + width, raw.name


def test_each_raw_output_name_means_one_thing_across_tasks() -> None:
    rows: dict = {}
    for task in TASKS.values():
        for raw in task.raw_outputs:
            assert rows.setdefault(raw.name, raw) is raw, raw.name
    assert set(CLASSES.values()) == set(TASKS)
