"""Sentence-BERT backends: ONNX Runtime agrees with PyTorch, the export cache, fallbacks, batch independence."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from muvla import encoder_backends, encoders

SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a red frisbee in the park.",
    "a pizza",
    "",
    "   A young woman sits on a sofa next to a café table.   ",
    "The Eiffel Tower at night " * 60,  # longer than max_seq_length: truncated
]
COMPANIONS = [
    "A cat.", "An old red bus parked next to a building on a rainy day in the city centre.",
    "people", "A group of children playing football on a grassy field behind the school.",
    "a plate with a sandwich and some fries", "kites", "Two horses grazing in a field.",
]

needs_onnxruntime = pytest.mark.skipif(not encoder_backends.onnxruntime_available(),
                                       reason="onnxruntime is not installed (pip install onnxruntime)")


def _clear_caches() -> None:
    encoders._onnx_encoder.cache_clear()
    encoder_backends.model_digest.cache_clear()


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private export cache, filled once for the module (leaves the user's cache alone)."""
    root = tmp_path_factory.mktemp("muvla-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MUVLA_CACHE", str(root))
    patch.delenv(encoders.BACKEND_ENV, raising=False)
    _clear_caches()
    yield root
    patch.undo()
    _clear_caches()


@needs_onnxruntime
def test_onnx_matches_torch_and_sentence_transformers(onnx_cache: Path) -> None:
    onnx = encoders.encode(SENTENCES, backend="onnx")
    torch = encoders.encode(SENTENCES, backend="torch")
    reference = encoders.load_sentence_encoder().encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    assert onnx.dtype == np.float32 and onnx.shape == (len(SENTENCES), encoders.embedding_dim())
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert np.abs(onnx - torch).max() < 1e-5
    assert np.abs(torch - reference).max() < 1e-5
    assert encoders.get_encoder(backend="auto").backend == "onnx"


@needs_onnxruntime
def test_export_is_cached_and_reused(onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = encoders.get_encoder(backend="onnx")
    assert first.backend == "onnx"
    folder = first.folder
    assert folder.parent == onnx_cache / "onnx" and folder.name.startswith(encoders.DEFAULT_MODEL_NAME + "-")
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left

    def no_export(model_dir: str, out: Path) -> None:
        raise AssertionError("a cached export must not be exported again")

    # a second process: fresh in-memory caches, same disk cache
    monkeypatch.setattr(encoder_backends, "export_to", no_export)
    _clear_caches()
    second = encoders.get_encoder(backend="onnx")
    assert second is not first and second.folder == folder
    np.testing.assert_array_equal(second.encode(SENTENCES, 8), first.encode(SENTENCES, 8))


def test_digest_follows_model_files_and_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    digests = [encoder_backends.model_digest(str(tmp_path))]
    encoder_backends.model_digest.cache_clear()
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 15 + b"\x01")
    digests.append(encoder_backends.model_digest(str(tmp_path)))
    encoder_backends.model_digest.cache_clear()
    monkeypatch.setattr(encoder_backends, "EXPORT_RECIPE", "test-recipe")
    digests.append(encoder_backends.model_digest(str(tmp_path)))
    encoder_backends.model_digest.cache_clear()
    assert len(set(digests)) == 3


@needs_onnxruntime
def test_failed_export_falls_back_to_torch_with_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MUVLA_CACHE", str(tmp_path))

    def half_written(model_dir: str, out: Path) -> None:
        (out / encoder_backends.MODEL_FILE).write_bytes(b"not a whole graph")
        raise RuntimeError("simulated exporter crash\nsecond line of detail")

    monkeypatch.setattr(encoder_backends, "export_to", half_written)
    _clear_caches()
    with caplog.at_level(logging.WARNING, logger="muvla.encoders"):
        emb = encoders.encode(SENTENCES[:3], backend="onnx")
    _clear_caches()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "encoding with PyTorch" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert list((tmp_path / "onnx").iterdir()) == []  # the half-written export was removed, never used
    np.testing.assert_array_equal(emb, encoders.encode(SENTENCES[:3], backend="torch"))


def test_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    monkeypatch.delenv(encoders.BACKEND_ENV, raising=False)
    assert encoders.resolve_backend("auto", "cpu") == "torch"
    assert encoders.get_encoder(backend="auto").backend == "torch"
    with pytest.raises(RuntimeError, match="pip install onnxruntime"):
        encoders.encode(["a dog"], backend="onnx")


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(encoders.BACKEND_ENV, raising=False)
    assert encoders.resolve_backend("torch", "cpu") == "torch"
    assert encoders.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="unknown encoder backend"):
        encoders.resolve_backend("tensorrt", "cpu")
    with pytest.raises(ValueError, match="CPU only"):
        encoders.resolve_backend("onnx", "cuda:0")
    monkeypatch.setenv(encoders.BACKEND_ENV, "torch")
    assert encoders.resolve_backend("auto", "cpu") == "torch"


def _same_length_sentences(n: int) -> list[str]:
    """Distinct sentences of one token length, so they share full, unpadded batches."""
    tok = encoders.load_wordpiece_tokenizer()
    words = [w for w in ("dog", "cat", "man", "woman", "car", "bus", "tree", "house", "table", "chair",
                         "horse", "bird", "boat", "train", "girl", "boy", "pizza", "cake", "phone", "book")
             if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    out = [f"a {a} next to a {b}" for a in words for b in words if a != b][:n]
    assert len({len(ids) for ids in tok(out)["input_ids"]}) == 1 and len(out) == n
    return out


def _batch_independence(backend: str) -> None:
    same = _same_length_sentences(70)
    targets = SENTENCES + same[:3]
    alone = np.stack([encoders.encode([s], backend=backend)[0] for s in targets])
    rng = np.random.default_rng(0)
    for batch_size in (1, 2, 5, 64):
        mixed = targets + COMPANIONS + same[3:]
        order = rng.permutation(len(mixed))
        emb = encoders.encode([mixed[i] for i in order], batch_size=batch_size, backend=backend)
        np.testing.assert_array_equal(emb[np.argsort(order)][:len(targets)], alone)


def test_embeddings_do_not_depend_on_the_batch_torch() -> None:
    _batch_independence("torch")


@needs_onnxruntime
def test_embeddings_do_not_depend_on_the_batch_onnx(onnx_cache: Path) -> None:
    _batch_independence("onnx")
