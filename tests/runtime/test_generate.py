"""``Session.generate`` / ``generate_stream`` and ``reformer-rt generate``: ragged batches equal each prompt alone,
seeded sampling, stop ids, streamed events, and the errors a caller can cause."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.artifacts import BYTE_LM, Artifacts, TinyModel
from helpers.cli import in_process, one_error_line, real_process

from reformer_rt.models import ConfigError, InputError, InputTypeError, ReformerConfig
from reformer_rt.models.presets import demo_model_dir, random_model
from reformer_rt.models.tokenizer import ByteTokenizer
from reformer_rt.runtime import GenerationOptions, Session
from reformer_rt.runtime.errors import BackendUnavailable
from reformer_rt.runtime.generation import TokenEvent
from reformer_rt.runtime.tokenizers import TextStream

CONFIG = ReformerConfig(
    vocab_size=50, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=48,
    attn_layers=("local", "lsh", "local", "lsh"), axial_pos_shape=(16, 32), axial_pos_embds_dim=(8, 24),
    max_position_embeddings=512, lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2,
    num_buckets=(4, 4), hash_seed=1, is_decoder=True)
LENGTHS = [70, 5, 16, 33]  # padded prompts, one shorter than a chunk, one exactly a chunk (and prompt 0 again)
SAMPLING = dict(strategy="sample", temperature=0.9, top_k=12, top_p=0.9)
#: The model every generation test decodes with: ``CONFIG``, every parameter perturbed by 0.3.
GENERATOR = TinyModel("generate-lm", CONFIG, scale=0.3)


@pytest.fixture(scope="module")
def session(artifacts: Artifacts) -> Session:
    return Session(artifacts.checkpoint(GENERATOR), backend="torch", device="cpu")


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in LENGTHS]
    return [*prompts, prompts[0]]


def test_greedy_batch_equals_each_prompt_alone(session: Session) -> None:
    prompts = _prompts()
    result = session.generate(prompts, GenerationOptions(24))
    assert result.finish_reasons == ("length",) * len(prompts)
    assert [len(t) for t in result.tokens] == [24] * len(prompts)
    assert result.tokens[0] == result.tokens[4]  # the same prompt twice
    for i, prompt in enumerate(prompts):
        assert session.generate([prompt], GenerationOptions(24)).tokens[0] == result.tokens[i]
    assert result.prefill_s > 0 and result.decode_s > 0 and result.tokens_per_s > 0


def test_sampling_is_seeded_per_prompt(session: Session) -> None:
    prompts = _prompts()
    first = session.generate(prompts, GenerationOptions(20, seed=7, **SAMPLING))
    assert session.generate(prompts, GenerationOptions(20, seed=7, **SAMPLING)).tokens == first.tokens
    assert session.generate(prompts, GenerationOptions(20, seed=8, **SAMPLING)).tokens != first.tokens
    for i, prompt in enumerate(prompts):  # prompt i draws from seed + i, whatever shares its batch
        assert session.generate([prompt], GenerationOptions(20, seed=7 + i, **SAMPLING)).tokens[0] == first.tokens[i]


def test_stop_ids_end_their_prompt_and_the_batch_carries_on(session: Session) -> None:
    prompts = _prompts()
    free = session.generate(prompts, GenerationOptions(16))
    stop = free.tokens[1][3]  # prompt 1 produces it at step 3 (or earlier)
    result = session.generate(prompts, GenerationOptions(16, stop_ids=[stop]))
    for tokens, free_tokens, reason in zip(result.tokens, free.tokens, result.finish_reasons):
        cut = free_tokens.index(stop) + 1 if stop in free_tokens else len(free_tokens)
        assert tokens == free_tokens[:cut]
        assert reason == ("stop" if stop in free_tokens else "length")
    assert result.finish_reasons[1] == "stop" and len(result.tokens[1]) <= 4


def test_stream_yields_every_token_as_an_event(session: Session) -> None:
    prompts = _prompts()[:3]
    events = list(session.generate_stream(prompts, GenerationOptions(5, seed=1, **SAMPLING)))
    result = session.generate(prompts, GenerationOptions(5, seed=1, **SAMPLING))
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [(e.step, e.prompt) for e in events] == [(s, p) for s in range(5) for p in range(3)]
    for i in range(3):
        mine = [e for e in events if e.prompt == i]
        assert tuple(e.token for e in mine) == result.tokens[i]
        assert [e.finished for e in mine] == [False] * 4 + [True]
        assert mine[-1].reason == "length" and mine[0].reason is None
    with pytest.raises(InputError, match="stop_ids"):  # checked at the call, not at the first event
        session.generate_stream(prompts, GenerationOptions(5, stop_ids=[CONFIG.vocab_size]))


def test_small_token_budget_decodes_in_several_batches(session: Session) -> None:
    prompts = _prompts()
    whole = session.generate(prompts, GenerationOptions(10))
    session.max_tokens_per_batch, budget = 100, session.max_tokens_per_batch
    try:
        split = session.generate(prompts, GenerationOptions(10))
    finally:
        session.max_tokens_per_batch = budget
    assert (split.tokens, split.finish_reasons) == (whole.tokens, whole.finish_reasons)


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10, strategy="beam"), "strategy"),
    (dict(max_new_tokens=10, temperature=0), "temperature"),
    (dict(max_new_tokens=10, top_p=1.5), "top_p"),
    (dict(max_new_tokens=10, top_k=2.5), "top_k"),
    (dict(max_new_tokens=10, seed=-1), "seed"),
    (dict(max_new_tokens=10, stop_ids=["a"]), "stop_ids"),
    (dict(max_new_tokens=10, stop_ids=[50]), "stop_ids"),
    (dict(max_new_tokens=500), "max_position_embeddings"),
])
def test_bad_arguments_raise_input_errors(session: Session, kwargs: dict, words: str) -> None:
    with pytest.raises(InputError, match=words):
        session.generate([[1, 2, 3], list(range(30))], GenerationOptions(**kwargs))


@pytest.mark.parametrize("options", [24, {"max_new_tokens": 24}, None])
def test_options_travel_as_one_object(session: Session, options: object) -> None:
    for generate in (session.generate, session.generate_stream):
        with pytest.raises(InputTypeError, match="options: got .*; expected a GenerationOptions"):
            generate([[1, 2, 3]], options)


def test_other_backends_and_encoders_refuse_with_a_reason(artifacts: Artifacts, tmp_path) -> None:
    exported = Session(artifacts.export(BYTE_LM), backend="onnxruntime")  # an exported file: no decoding step
    assert not exported.can_decode  # declared by the backend, not read from its name
    with pytest.raises(BackendUnavailable, match="torch backend"):
        exported.generate([[1, 2, 3]], GenerationOptions(4))
    encoder = tmp_path / "encoder"
    random_model(ReformerConfig.from_dict({**CONFIG.to_dict(), "is_decoder": False})).save_pretrained(encoder)
    masked_lm = Session(encoder, backend="torch")
    assert masked_lm.can_decode  # the backend decodes; the model is what refuses
    with pytest.raises(ConfigError, match="is_decoder"):
        masked_lm.generate([[1, 2, 3]], GenerationOptions(4))


def test_text_stream_holds_back_a_split_character() -> None:
    tokenizer = ByteTokenizer()
    stream = TextStream(tokenizer)
    ids = tokenizer.encode("aé€b")
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["a", "", "é", "", "", "€", "b"]
    assert stream.flush() == ""


def test_cli_streams_ids_as_json_lines(session: Session, tmp_path, capsys) -> None:
    prompts = _prompts()[:2]
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(prompts))
    done = in_process(["generate", str(session.path), "--ids", str(ids), "--max-new-tokens", "6", "--device", "cpu"],
                      capsys)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    expected = session.generate(prompts, GenerationOptions(6))
    for i in range(2):
        assert tuple(e["token"] for e in events if e["prompt"] == i) == expected.tokens[i]
    assert "generated 12 tokens" in done.stderr


def test_cli_continues_text_and_reports_errors_in_one_line(capsys) -> None:
    done = in_process(["generate", str(demo_model_dir()), "--prompt", "def ", "--max-new-tokens", "12", "--device",
                       "cpu"], capsys)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ") and len(done.stdout.encode()) >= len("def ") + 1
    bad = in_process(["generate", str(demo_model_dir()), "--prompt", "x", "--strategy", "sample", "--top-p", "2"],
                     capsys)
    assert bad.returncode == 2 and "top_p" in one_error_line("generate", bad.stderr)


@pytest.mark.slow
def test_bench_generate_measures_every_variant_and_reports_slopes(session: Session, tmp_path) -> None:
    """The benchmark command end to end on a tiny model (figures are not checked: benchmarks, not tests)."""
    out = tmp_path / "bench"
    done = real_process("bench", "generate", "--models", str(session.path), "--lengths", "40,100", "--steps", "2",
                        "--recompute-steps", "1", "--threads", "1", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "generate.json").read_text())
    points = {(r["impl"], r["length"]): r for r in report["rows"]}
    assert set(points) == {(v, n) for v in ("cached", "hf", "recompute") for n in (40, 100)}
    assert all(r["seconds"] > 0 and r["details"]["steps"] == (1 if v == "recompute" else 2)
               for (v, _), r in points.items())
    assert set(report["slopes"]) == {f"{session.path} {v}" for v in ("cached", "hf", "recompute")}
    assert "| ours / transformers |" in done.stdout and "ms per 1K prompt tokens" in done.stdout


def test_bench_generate_refuses_a_prompt_longer_than_the_model(session: Session, tmp_path, capsys) -> None:
    done = in_process(["bench", "generate", "--models", str(session.path), "--lengths", "600", "--out",
                       str(tmp_path / "o")], capsys)
    assert done.returncode == 2 and "--lengths" in one_error_line("bench generate", done.stderr)
    assert not (tmp_path / "o" / "generate.json").exists()


def test_cli_refuses_an_exported_file_naming_the_checkpoint(artifacts: Artifacts) -> None:
    """The command's contract in a real process (the other cases run in this one: ``helpers/cli.py``)."""
    done = real_process("generate", str(artifacts.export(BYTE_LM)), "--prompt", "x")
    assert done.returncode == 2 and "expected a checkpoint directory" in one_error_line("generate", done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1
