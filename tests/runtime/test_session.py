"""Session: every CPU backend agrees with the PyTorch model; batch invariance; micro-batching; bad input.

The torch backend runs this module's own checkpoint (``SESSION_LM``); the ONNX Runtime backend runs the test
session's shared tiny portable export (``BYTE_LM``, ``helpers/artifacts.py``) -- an export costs half a minute."""

from __future__ import annotations

import concurrent.futures
import inspect
import json

import numpy as np
import pytest
import torch
from helpers.artifacts import BYTE_LM, DOCTOR, Artifacts, TinyModel
from helpers.cli import in_process, one_error_line, real_process

from reformer_rt.models import InputError, InputTypeError, ReformerConfig, ReformerError, ReformerLM
from reformer_rt.models.fused import fused_attention
from reformer_rt.models.lsh_op import KERNELS_ENV, forced_kernels
from reformer_rt.runtime import Session
from reformer_rt.runtime.batching import DEFAULT_MAX_TOKENS, plan_batches

CONFIG = ReformerConfig(
    vocab_size=50, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=48,
    attn_layers=("local", "lsh", "local", "lsh"), axial_pos_shape=(16, 32), axial_pos_embds_dim=(8, 24),
    max_position_embeddings=512, lsh_attn_chunk_length=16, local_attn_chunk_length=16, num_hashes=2,
    num_buckets=(4, 4), hash_seed=1, is_decoder=True)
LENGTHS = [5, 16, 23, 32, 40, 64, 70, 3]  # chunk multiples and not, shorter than a chunk, shared buckets
SESSION_LM = TinyModel("session-lm", CONFIG, scale=0.1)


@pytest.fixture(scope="module")
def checkpoint(artifacts: Artifacts):
    return SESSION_LM.build(), artifacts.checkpoint(SESSION_LM)


@pytest.fixture(scope="module")
def exported(artifacts: Artifacts):
    """The shared tiny model and its portable export: (model, path)."""
    return BYTE_LM.build(), artifacts.export(BYTE_LM)


def _sequences(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in LENGTHS]


def _alone(model: ReformerLM, seq: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([seq]))[0].numpy()


def _check_against_alone(model, result, seqs, tol: float) -> None:
    logits, lengths = result["logits"], result["lengths"]
    assert logits.shape == (len(seqs), max(LENGTHS), model.config.vocab_size)
    assert lengths.tolist() == [len(s) for s in seqs]
    for i, seq in enumerate(seqs):
        diff = np.abs(logits[i, :len(seq)] - _alone(model, seq)).max()
        assert diff <= tol, f"sequence {i} (length {len(seq)}): {diff}"
        assert not logits[i, len(seq):].any()  # padding of the result is zeros


def test_torch_backend_ragged_batch_equals_each_sequence_alone(checkpoint) -> None:
    model, directory = checkpoint
    session = Session(directory, backend="torch", device="cpu")
    assert session.backend == "torch"
    _check_against_alone(model, session.run(_sequences()), _sequences(), tol=1e-5)


def test_onnxruntime_backend_ragged_batch_equals_each_sequence_alone(exported) -> None:
    model, onnx_file = exported
    session = Session(onnx_file, backend="auto", device="cpu")
    assert session.backend == "onnxruntime" and "TensorRT unavailable" in session.backend_reason
    _check_against_alone(model, session.run(_sequences()), _sequences(), tol=1e-4)


def test_micro_batching_does_not_change_results(checkpoint) -> None:
    _, directory = checkpoint
    whole = Session(directory, backend="torch", device="cpu").run(_sequences(1))["logits"]
    tiny = Session(directory, backend="torch", device="cpu", max_tokens_per_batch=20)
    result = tiny.run(_sequences(1))
    split = result["logits"]
    assert len(result.plan.batches) == len(LENGTHS)  # budget below every length: one sequence per batch
    assert np.abs(whole - split).max() <= 1e-5


def test_two_dimensional_input_with_mask_equals_ragged_list(checkpoint) -> None:
    _, directory = checkpoint
    session = Session(directory, backend="torch", device="cpu")
    seqs = _sequences(2)
    array = np.zeros((len(seqs), max(LENGTHS)), dtype=np.int64)
    mask = np.zeros_like(array)
    for i, s in enumerate(seqs):
        array[i, :len(s)], mask[i, :len(s)] = s, 1
    assert np.array_equal(session.run(array, attention_mask=mask)["logits"], session.run(seqs)["logits"])


def test_embed_pools_hidden_states_over_valid_tokens(checkpoint) -> None:
    model, directory = checkpoint
    session = Session(directory, backend="torch", device="cpu")
    seqs = _sequences(3)
    mean, last = session.embed(seqs, pooling="mean"), session.embed(seqs, pooling="last")
    assert mean.shape == (len(seqs), 2 * CONFIG.hidden_size)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            hidden = model.reformer(torch.tensor([seq]))[0].numpy()
        assert np.abs(mean[i] - hidden.mean(0)).max() <= 1e-5
        assert np.abs(last[i] - hidden[-1]).max() <= 1e-5


def test_the_session_and_the_server_share_the_batching_contract_default_budget() -> None:
    from reformer_rt.runtime.serving.scheduler import SchedulerOptions

    session_default = inspect.signature(Session).parameters["max_tokens_per_batch"].default
    assert SchedulerOptions().max_tokens_per_batch == session_default == DEFAULT_MAX_TOKENS


def test_plan_groups_by_padded_length_and_respects_the_budget() -> None:
    plan = plan_batches(CONFIG, LENGTHS, max_tokens_per_batch=64)
    by_length = {b.length: b for b in plan.batches}
    assert sorted(i for b in plan.batches for i in b.indices) == list(range(len(LENGTHS)))
    assert all(b.tokens <= 64 or len(b.indices) == 1 for b in plan.batches)
    assert set(by_length[16].indices) == {0, 1, 7}  # 5, 16 and 3 tokens: no layer pads them; run at 16
    assert set(by_length[32].indices) == {2, 3}  # 23 pads to 32 like 32 itself
    assert 0 < plan.padding_waste < 1


@pytest.mark.parametrize("sequences,error,words", [
    ([], InputError, "empty batch"),
    ([[1, 2], []], InputError, "sequence 1: empty"),
    ([[1, 2, 50]], InputError, "[0, 49]"),
    ([[1, -3]], InputError, "token id -3"),
    ([[1.5, 2.0]], InputTypeError, "integer"),
    ([[0] * 513], InputError, "at most 512"),
    ("hello", InputTypeError, "list of token-id lists"),
    (np.zeros((2, 3, 4), dtype=np.int64), InputError, "[N, L]"),
])
def test_bad_input_is_rejected_and_session_stays_usable(checkpoint, sequences, error, words: str) -> None:
    _, directory = checkpoint
    session = Session(directory, backend="torch", device="cpu")
    with pytest.raises(error) as info:
        session.run(sequences)
    assert words in str(info.value)
    assert session.run([[1, 2, 3]])["logits"].shape == (1, 3, CONFIG.vocab_size)


def test_bad_backend_choices_are_clear(checkpoint, exported, tmp_path) -> None:
    _, directory = checkpoint
    _, onnx_file = exported
    with pytest.raises(InputError, match="backend"):
        Session(directory, backend="jax")
    with pytest.raises(ReformerError, match="needs a checkpoint directory"):
        Session(onnx_file, backend="torch")
    with pytest.raises(InputError, match="does not exist"):
        Session(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ReformerError):
        Session(corrupt, backend="onnxruntime")


def test_plugin_form_is_refused_by_onnxruntime(artifacts: Artifacts) -> None:
    with pytest.raises(ReformerError, match="TensorRT only"):
        Session(artifacts.export(DOCTOR, "plugin"), backend="onnxruntime")


def test_run_command_writes_npy_and_reports(checkpoint, tmp_path) -> None:
    model, directory = checkpoint
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3, 4], list(range(40))]))
    out = tmp_path / "out.npy"
    result = real_process("run", str(directory), "--ids", str(ids), "-o", str(out), "--backend", "torch", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["backend"] == "torch" and summary["lengths"] == [4, 40]
    logits = np.load(out)
    assert np.abs(logits[1] - _alone(model, list(range(40)))).max() <= 1e-5
    assert np.load(tmp_path / "out.lengths.npy").tolist() == [4, 40]


@pytest.mark.parametrize("content,words,real", [("[[1, 2], [99]]", "[0, 49]", True), ("{", "cannot read", False),
                                                ("[]", "empty batch", False)])
def test_run_command_bad_input_exits_2_without_traceback(checkpoint, tmp_path, capsys, content: str, words: str,
                                                         real: bool) -> None:
    """The first case in a real process, the others in this one (``helpers/cli.py``)."""
    ids = tmp_path / "ids.json"
    ids.write_text(content)
    out = tmp_path / "out.npy"
    argv = ["run", str(checkpoint[1]), "--ids", str(ids), "-o", str(out), "--backend", "torch"]
    result = real_process(*argv) if real else in_process(argv, capsys)
    assert result.returncode == 2 and words in one_error_line("run", result.stderr)
    assert not out.exists()


def test_triton_kernels_through_the_session_match_the_reference(checkpoint, monkeypatch) -> None:
    """The torch backend with the Triton kernels forced (Triton's interpreter on this CPU) = the reference."""
    pytest.importorskip("triton")
    from reformer_rt.models.lsh_op import select_implementation

    model, directory = checkpoint
    seqs = [s[:40] for s in _sequences(4)[:3]]
    expected = Session(directory, backend="torch", device="cpu").run(seqs)["logits"]
    with forced_kernels("triton"):
        assert select_implementation(torch.device("cpu")) == "triton"
    monkeypatch.setenv(KERNELS_ENV, "triton")  # read when the torch backend is made
    got = Session(directory, backend="torch", device="cpu").run(seqs)["logits"]
    assert np.abs(got - expected).max() <= 1e-5


def test_the_torch_backend_keeps_its_kernels_in_other_threads(checkpoint, monkeypatch) -> None:
    """Kernels forced where the backend is made hold where it runs: a server's worker thread has no context of its
    own. (On CPU the torch backend runs fused unless the reference is forced.)"""
    from reformer_rt.models import lsh_op

    called = []
    reference = lsh_op._IMPLEMENTATIONS["reference"]
    monkeypatch.setitem(lsh_op._IMPLEMENTATIONS, "reference", lambda *args: called.append(1) or reference(*args))
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    _, directory = checkpoint
    seqs = [s[:40] for s in _sequences(2)]
    with forced_kernels("reference"):
        forced = Session(directory, backend="torch", device="cpu")
    plain = Session(directory, backend="torch", device="cpu")
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        worker.submit(plain.run, seqs).result()
        assert not called
        worker.submit(forced.run, seqs).result()
        assert called


def test_sentencepiece_tokenizer_is_found_next_to_the_model(tmp_path) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    from reformer_rt.runtime.tokenizers import SentencePieceTokenizer, load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"),
                                             vocab_size=40, model_type="unigram", minloglevel=2)
    tokenizer = load_tokenizer(tmp_path, CONFIG)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    ids = tokenizer.encode("the lazy dog")
    assert ids and max(ids) < 40 and tokenizer.decode(ids) == "the lazy dog"


def test_byte_tokenizer_is_the_fallback_for_a_258_token_vocabulary() -> None:
    import dataclasses

    from reformer_rt.models import ConfigError
    from reformer_rt.models.tokenizer import ByteTokenizer
    from reformer_rt.runtime.tokenizers import load_tokenizer

    assert isinstance(load_tokenizer(None, dataclasses.replace(CONFIG, vocab_size=258)), ByteTokenizer)
    with pytest.raises(ConfigError, match="--tokenizer"):
        load_tokenizer(None, CONFIG)


def test_onnxruntime_runs_large_batches_without_the_memory_arena(exported, monkeypatch) -> None:
    """Batches over LEAN_TOKENS use a second, arena-free session; results are the same."""
    from reformer_rt.runtime import backends

    model, onnx_file = exported
    monkeypatch.setattr(backends, "LEAN_TOKENS", 48)
    session = Session(onnx_file, backend="onnxruntime", device="cpu")
    seqs = _sequences(5)
    _check_against_alone(model, session.run(seqs), seqs, tol=1e-4)
    lean = session._backend._lean_session
    assert lean is not None and lean is not session._backend.session


def test_float16_torch_session_equals_the_float16_model_and_other_backends_refuse_it(checkpoint, exported) -> None:
    model, directory = checkpoint
    _, onnx_file = exported
    seqs = _sequences(6)
    half = Session(directory, backend="torch", device="cpu", dtype="float16").run(seqs, outputs=["logits"])
    assert half["logits"].dtype == np.float32  # outputs are float32 whatever the compute precision
    reference = ReformerLM.from_pretrained(directory).half()
    with fused_attention():  # the torch backend's CPU path; float16 rounds differently from the reference forward
        worst = max(float(np.abs(half.rows["logits"][i] - _alone(reference, seq)).max())
                    for i, seq in enumerate(seqs))
    assert worst <= 2.0**-10 * float(np.abs(half["logits"]).max())  # a few fp16 ulps: batch-mates change nothing
    with pytest.raises(InputError, match="precision its file was exported with"):
        Session(onnx_file, backend="onnxruntime", dtype="float16")
    with pytest.raises(InputError, match="dtype: got 'bfloat16'"):
        Session(directory, backend="torch", dtype="bfloat16")


def test_torch_backend_on_cpu_reuses_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from reformer_rt.runtime import backends

    monkeypatch.setenv(backends.HEAP_REUSE_ENV, "0")
    assert backends.reuse_freed_memory() is False  # the opt-out is honoured
    monkeypatch.delenv(backends.HEAP_REUSE_ENV)
    assert backends.reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")
