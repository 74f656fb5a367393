"""Triton serving without a server: request validation, the model repository, the stub environment."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from redrafter.runtime.config import DecodeConfig
from redrafter.cli import main
from redrafter.runtime.sampling import SamplingParams
from redrafter.runtime.scheduler import MeasuredBeamPolicy
from redrafter.serving.protocol import (INPUTS, MAX_STOP_WORD_BYTES, MAX_STOP_WORDS, MAX_TEXT_BYTES, OUTPUTS,
                                       StopMatcher, parse_request)
from redrafter.serving.repository import ModelSource, model_config, write_repository
from redrafter.serving.server import TritonServer, backend_directory, find_tritonserver, stub_environment

VOCAB = 100
MAX_SEQ_LEN = 64


def request(**inputs):
    """`get` for parse_request: every value given as Triton delivers it, batch dimension first."""
    arrays = {}
    for name, value in inputs.items():
        a = np.asarray(value)
        arrays[name] = a.reshape(1, *a.shape) if name in ("input_ids", "stop_words_list", "stop_words") else a.reshape(1, 1)
    return arrays.get


def parse(**inputs):
    return parse_request(request(**inputs), VOCAB, MAX_SEQ_LEN)


def test_token_request_maps_tensorrt_llm_inputs_to_sampling_params():
    p = parse(input_ids=np.array([5, 6, 7, 8], np.int32), input_lengths=np.int32(3),
              request_output_len=np.int32(9), end_id=np.int32(2), pad_id=np.int32(0), streaming=True,
              temperature=np.float32(0.5), runtime_top_k=np.int32(7), runtime_top_p=np.float32(0.75),
              random_seed=np.uint64(11))
    assert p.prompt == [5, 6, 7] and not p.text and p.stream and not p.echo_prompt
    assert p.params == SamplingParams(max_new_tokens=9, temperature=0.5, top_k=7, top_p=0.75, seed=11,
                                      stop_token_ids=(2,), ignore_eos=True)


def test_text_request_and_defaults():
    p = parse(text_input=np.array("héllo".encode(), dtype=object), max_tokens=np.int32(4),
              stop_words=np.array([b"\n\n", b""], dtype=object))
    assert p.prompt == "héllo" and p.text and not p.stream
    assert p.params == SamplingParams(max_new_tokens=4, stop=("\n\n",))  # "" means none, as TRT-LLM sends


def test_non_streaming_token_output_echoes_the_prompt_unless_excluded():
    ids = np.array([1, 2], np.int32)
    assert parse(input_ids=ids, request_output_len=np.int32(3)).echo_prompt
    assert not parse(input_ids=ids, request_output_len=np.int32(3), exclude_input_in_output=True).echo_prompt


def test_stop_words_list_in_tensorrt_llm_layout():
    # two sequences: [3, 4] and [9]; offsets are cumulative ends, padded with -1
    words = np.array([[3, 4, 9], [2, 3, -1]], np.int32)
    p = parse(input_ids=np.array([1], np.int32), request_output_len=np.int32(5), stop_words_list=words)
    assert p.stop_sequences == ((3, 4), (9,))


@pytest.mark.parametrize("inputs, message", [
    (dict(request_output_len=np.int32(3)), "give exactly one prompt"),
    (dict(input_ids=np.array([1], np.int32), text_input=np.array(b"x", dtype=object), max_tokens=np.int32(1)),
     "give exactly one prompt"),
    (dict(input_ids=np.array([1], np.int32)), "number of tokens to generate"),
    (dict(input_ids=np.zeros(0, np.int32), request_output_len=np.int32(3)), "empty prompt"),
    (dict(text_input=np.array(b"  ", dtype=object), max_tokens=np.int32(3)), "empty prompt"),
    (dict(text_input=np.array(b"\xff", dtype=object), max_tokens=np.int32(3)), "UTF-8"),
    (dict(input_ids=np.array([1, VOCAB], np.int32), request_output_len=np.int32(3)), "outside the vocabulary"),
    (dict(input_ids=np.array([1, 2], np.int32), input_lengths=np.int32(3), request_output_len=np.int32(3)),
     "input_lengths=3"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(0)), "request_output_len=0 must be >= 1"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(-4)), "max_tokens=-4 must be >= 1"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), temperature=np.float32(-0.1)),
     "temperature"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), temperature=np.float32("nan")),
     "temperature"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), top_p=np.float32(0)), "top_p=0.0"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), top_k=np.int32(-1)), "top_k=-1"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), random_seed=np.uint64(2**63)),
     "random_seed"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), request_output_len=np.int32(2)),
     "mean the same thing"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), end_id=np.int32(1)),
     "'end_id' applies to requests with 'input_ids' only"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words=np.array([b"a"], dtype=object)), "'stop_words' applies to requests with 'text_input' only"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2), end_id=np.int32(-1)), "end_id=-1"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.array([[3, 4], [2, 1]], np.int32)), "must increase"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.array([[3, 4], [3, -1]], np.int32)), "stay within"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.array([[3, -1], [-1, 1]], np.int32)), "followed only by -1"),
    # the limits (protocol module doc)
    (dict(input_ids=np.ones(MAX_SEQ_LEN + 1, np.int32), request_output_len=np.int32(1)),
     f"holds {MAX_SEQ_LEN + 1} token ids, more than the engine's max_seq_len {MAX_SEQ_LEN}"),
    (dict(text_input=np.array(b"x" * (MAX_TEXT_BYTES + 1), dtype=object), max_tokens=np.int32(1)),
     f"'text_input' holds {MAX_TEXT_BYTES + 1} bytes, more than the limit"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(1),
          stop_words=np.array([b"a"] * (MAX_STOP_WORDS + 1), dtype=object)), "stop_words holds 17 strings"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(1),
          stop_words=np.array([b"a" * (MAX_STOP_WORD_BYTES + 1)], dtype=object)), "'stop_words' holds 257 bytes"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(1),
          stop_words=np.array([b"\xc3\x28"], dtype=object)), "'stop_words' is not valid UTF-8"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.array([list(range(17)), list(range(1, 18))], np.int32)), "holds 17 sequences"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.array([[1] * 65, [65] + [-1] * 64], np.int32)), "sequence of 65 tokens"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.ones((2, MAX_STOP_WORDS * 64 + 1), np.int32)), "holds 1025 ids"),
    (dict(input_ids=np.array([1], np.int32), request_output_len=np.int32(2),
          stop_words_list=np.array([[3, VOCAB], [2, -1]], np.int32)), "outside the vocabulary"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), temperature=np.float32(1e-30)),
     "use 0 for greedy"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), temperature=np.float32("inf")),
     "temperature=inf"),
    (dict(text_input=np.array(b"x", dtype=object), max_tokens=np.int32(2), top_p=np.float32("nan")), "top_p=nan"),
])
def test_invalid_requests_name_the_problem(inputs, message):
    with pytest.raises(ValueError, match=message):
        parse(**inputs)


def test_more_than_one_sequence_per_request_is_rejected():
    get = {"input_ids": np.ones((2, 3), np.int32), "request_output_len": np.full((2, 1), 3, np.int32)}.get
    with pytest.raises(ValueError, match="one sequence per request"):
        parse_request(get, VOCAB, MAX_SEQ_LEN)


def test_stop_matcher_finds_sequences_across_deltas():
    m = StopMatcher(((7, 8, 9), (5,)))
    assert m.feed([1, 7]) is None
    assert m.feed([8]) is None
    assert m.feed([9, 4, 4]) == 1  # completes 7 8 9 with its first token
    assert StopMatcher(((7, 8, 9), (5,))).feed([3, 5, 7]) == 2
    assert StopMatcher(()).feed([1, 2]) is None


def test_model_config_is_a_valid_triton_config(tmp_path):
    source = ModelSource.create(base=tmp_path / "base", drafter="none", max_batch_size=6, max_seq_len=300)
    cfg = text_format.Parse(model_config("my-model", source, instances=3), model_config_pb2.ModelConfig())
    assert cfg.name == "my-model" and cfg.backend == "python" and cfg.max_batch_size == 6
    assert cfg.model_transaction_policy.decoupled
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input] == \
        [(s.name, s.dtype, list(s.dims), True) for s in INPUTS]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == \
        [(s.name, s.dtype, list(s.dims)) for s in OUTPUTS]
    assert cfg.instance_group[0].count == 3
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert ModelSource.from_parameters(params) == source
    assert params["base"] == str((tmp_path / "base").resolve())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(), ValueError, "either an engine"),
    (dict(engine="e", base="b"), ValueError, "either an engine"),
    (dict(base="b", beam_policy="greedy"), ValueError, "beam policy"),
    (dict(base="b", max_seq_len=0), ValueError, "max_seq_len=0 is invalid"),
    (dict(engine="/nonexistent/engine"), FileNotFoundError, "not an engine directory"),
    (dict(base="b", drafter="none", decode=DecodeConfig(2, 3)), ValueError,
     r"drafting \(a beam length above 1, a lookup beam or a search tree\) needs a drafter"),
])
def test_model_source_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        ModelSource(**kwargs)


def test_base_and_drafter_source_opens_a_session_with_its_options(tiny_hf_dir):
    base, drafter = tiny_hf_dir
    source = ModelSource.create(base=base, drafter=drafter, max_batch_size=3, max_seq_len=64, decode=DecodeConfig(beam_width=2, beam_length=3, tree="search", lookup_ngram=3, lookup_length=5))
    assert ModelSource.from_parameters(source.parameters()) == source  # what the Triton model reads back
    with source.open_session() as s:
        assert (s.max_batch_size, s.max_seq_len) == (3, 64)
        assert (s.decoder.config.beam_width, s.decoder.config.beam_length, s.decoder.speculative) == (2, 3, True)
        assert s.decoder.config == DecodeConfig(2, 3, "search", lookup_ngram=3, lookup_length=5)
    with ModelSource.create(base=base, drafter="none").open_session() as s:
        assert s.max_batch_size == 8 and not s.decoder.speculative


def test_base_and_drafter_source_defaults_to_the_cpus_beams_chosen_by_measurement(tiny_hf_dir):
    """W1 L2 on the CPU, with the adaptive policy choosing between it and plain decoding per batch size."""
    base, drafter = tiny_hf_dir
    with ModelSource.create(base=base, drafter=drafter).open_session() as s:
        assert (s.decoder.config.beam_width, s.decoder.config.beam_length) == (1, 2)
        assert isinstance(s.beam_policy, MeasuredBeamPolicy)
        assert s.beam_policy.candidates == ((1, 1), (1, 2))


def test_write_repository_replaces_a_repository_and_refuses_other_directories(tmp_path):
    source = ModelSource.create(base="default")
    repo = write_repository(tmp_path / "repo", source, name="a")
    assert (repo / "a" / "config.pbtxt").is_file()
    assert "from redrafter.serving.model import TritonPythonModel" in (repo / "a" / "1" / "model.py").read_text()
    write_repository(repo, source, name="b")
    assert sorted(p.name for p in repo.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temporary left behind
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a Triton model repository"):
        write_repository(other, source)
    assert (other / "keep.txt").read_text() == "x"


def test_triton_repo_cli(tmp_path, capsys):
    assert main(["triton-repo", "--base", "default", "--drafter", "none", "--output", str(tmp_path / "r"),
                 "--name", "m", "--instances", "2", "--max-batch-size", "4"]) == 0
    cfg = text_format.Parse((tmp_path / "r" / "m" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.instance_group[0].count == 2 and cfg.max_batch_size == 4
    assert cfg.parameters["drafter"].string_value == "none"
    assert main(["triton-repo", "--engine", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "not an engine directory" in capsys.readouterr().err


def test_stub_environment_runs_this_python_with_numpy_1_and_our_packages(tmp_path):
    """The pytriton stub's pybind11 reads NumPy 1.x arrays; the overlay gives it NumPy 1.x
    in front of this environment's packages (the stub finds it as `python3` on PATH)."""
    env = stub_environment(tmp_path / "py")
    out = subprocess.run([str(env / "bin" / "python3"), "-c",
                          "import sys, numpy, redrafter.serving.protocol; print(sys.prefix, numpy.__version__)"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0] == str(env) and out[1].startswith("1.")


def test_stub_environment_without_numpy_1_says_how_to_install_it(tmp_path, monkeypatch):
    import redrafter.serving.server as server

    monkeypatch.setattr(server, "STUB_SITE", tmp_path / "empty")
    monkeypatch.setattr(server, "_numpy_major", lambda: 2)
    with pytest.raises(FileNotFoundError, match="pip install --target"):
        stub_environment(tmp_path / "py")
    stub_environment(tmp_path / "py2", numpy1=False)  # a stub built for NumPy 2 needs nothing more


def test_backend_directory_has_the_stub_for_this_python(tmp_path):
    install = find_tritonserver()
    assert install.binary.is_file()
    python = backend_directory(install, tmp_path / "b") / "python"
    assert {p.name for p in python.iterdir()} >= {"libtriton_python.so", "triton_python_backend_stub"}


def test_server_refuses_a_directory_without_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="redrafter triton-repo"):
        TritonServer(tmp_path)
