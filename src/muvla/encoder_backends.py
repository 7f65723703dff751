"""The two ways to run Sentence-BERT: PyTorch, and ONNX Runtime on a locally exported, cached graph.

Both backends tokenize the same way as sentence-transformers and run strings grouped by exact token
length (see ``run_by_length``), so a string's embedding does not depend on the batch it lands in.

ONNX Runtime runs the same graph faster than PyTorch on CPU, with the same embeddings up to float
rounding. Nothing is downloaded: the graph is exported once from the offline model folder and
cached under ``${MUVLA_CACHE:-~/.cache/muvla}/onnx/<name>-<digest>/``. The digest covers the model
files, the exporter's library versions and the export recipe, so a changed model or library never
reuses a stale export. An export is written into a temporary sibling folder and renamed into place
only once it is complete and verified, so another process sees either a whole export or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the export recipe changes: folders of the old recipe are then ignored, never reused.
EXPORT_RECIPE = "1"
MODEL_FILE = "model.onnx"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
OPSET = 17
# An export whose embeddings differ more than this from the PyTorch model's is refused (fp32: ~3e-7).
VERIFY_ATOL = 1e-4
_VERSIONED = ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime")
_VERIFY_TEXTS = [
    "A man riding a wave on top of a surfboard.",
    "two dogs",
    "",
    "A very long caption " + "that keeps on going " * 80,  # past max_seq_length: truncation
]


class ExportError(RuntimeError):
    """The model could not be exported, or its export disagrees with the PyTorch model."""


# ---- shared by both backends -------------------------------------------------------------------

def token_ids(tokenizer: Any, texts: list[str], max_length: int, lower_case: bool) -> list[list[int]]:
    """Token ids as sentence-transformers makes them (same truncation), without padding."""
    if lower_case:
        texts = [t.lower() for t in texts]
    return tokenizer(list(texts), truncation="longest_first", max_length=max_length, padding=False,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def run_by_length(ids: list[list[int]], batch_size: int, dim: int,
                  run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """L2-normalised float32 embeddings, running strings grouped by exact token length.

    This makes a string's embedding independent of the other strings in the call (so sharded and
    single-process runs agree bit for bit). Equal-length batches need no padding, and both
    backends give a row the same bits whatever else is in a batch of two or more rows; a batch of
    one takes other kernels (float rounding differs, ~1e-7), so a lone string runs as a pair.
    Padding cannot do the same: PyTorch picks attention kernels by padded length and by whether a
    mask has any zero, so a padded string's bits follow its longest batch-mate.
    """
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(ids):
        by_length.setdefault(len(seq), []).append(i)
    out = np.empty((len(ids), dim), dtype=np.float32)
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), max(batch_size, 2)):
            chunk = rows[start:start + max(batch_size, 2)]
            batch = np.asarray([ids[i] for i in chunk], dtype=np.int64)
            if len(chunk) == 1:
                batch = np.repeat(batch, 2, axis=0)
            out[chunk] = run(batch)[:len(chunk)]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, np.float32(1e-12))


def input_names(tokenizer: Any) -> list[str]:
    """Which of the BERT-style inputs this model takes (input_ids is required)."""
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    if "input_ids" not in names:
        raise ExportError(f"tokenizer inputs {tokenizer.model_input_names} have no input_ids")
    return names


def unpadded_feeds(input_ids: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Model inputs for a batch of equal-length strings: nothing is masked, one segment."""
    feeds = {"input_ids": input_ids}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(input_ids)
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(input_ids)
    return feeds


def intra_op_threads() -> int:
    """OMP_NUM_THREADS when set (PyTorch honours it too), else the cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- PyTorch -----------------------------------------------------------------------------------

class TorchEncoder:
    """A loaded SentenceTransformer run module by module (fp16 on CUDA, where it halves the time)."""

    def __init__(self, st: Any, device: str) -> None:
        import torch

        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.st = st.to(dtype=self.dtype)
        self.backend = "torch-fp16" if self.dtype == torch.float16 else "torch"
        self.tokenizer = st.tokenizer
        self.input_names = input_names(self.tokenizer)
        getter = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self.dim = int(getter())
        self.max_seq_length = int(st.max_seq_length)
        self.lower_case = bool(getattr(st[0], "do_lower_case", False))

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        feeds = {k: torch.from_numpy(v).to(self.device) for k, v in unpadded_feeds(input_ids, self.input_names).items()}
        with torch.inference_mode():
            emb = self.st(feeds)["sentence_embedding"]
        return emb.float().cpu().numpy()

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        ids = token_ids(self.tokenizer, texts, self.max_seq_length, self.lower_case)
        return run_by_length(ids, batch_size, self.dim, self._run)


# ---- ONNX Runtime ------------------------------------------------------------------------------

def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_root() -> Path:
    return Path(os.environ.get("MUVLA_CACHE") or "~/.cache/muvla").expanduser() / "onnx"


def library_versions() -> dict[str, str]:
    versions = {"recipe": EXPORT_RECIPE}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@lru_cache(maxsize=8)
def model_digest(model_dir: str) -> str:
    """Hash of every file in the model folder (names and bytes) and of the exporter versions."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps(library_versions(), sort_keys=True).encode("utf-8"))
    return h.hexdigest()[:16]


def export_folder(model_dir: str, name: str) -> Path:
    """Cache folder of one model's export: a readable name plus the digest that keeps it fresh."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return cache_root() / f"{safe}-{model_digest(model_dir)}"


def _traceable(st: Any, names: list[str]) -> Any:
    """The SentenceTransformer as a module of plain tensors in, embeddings out (what export traces)."""
    import torch

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.st(dict(zip(names, inputs)))["sentence_embedding"]

    return Embedder().eval()


def export_to(model_dir: str, out: Path) -> None:
    """Export graph, tokenizer and meta into ``out`` and verify them against the PyTorch model."""
    import torch
    from sentence_transformers import SentenceTransformer

    # Eager attention traces to plain MatMul/Softmax ops, which ONNX Runtime fuses on its own.
    st = SentenceTransformer(model_dir, device="cpu", local_files_only=True,
                             model_kwargs={"attn_implementation": "eager"})
    names = input_names(st.tokenizer)
    # Trace on a padded batch so the attention-mask path is part of the graph.
    sample = st.tokenizer(["a man riding a horse along the beach at sunset", "dogs"], padding=True,
                          return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"sentence_embedding": {0: "batch"}}
    # The tracer's warnings (legacy exporter, shape-dependent Python branches) are expected here and
    # only noise to a corpus-building user; verification below is what decides.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_traceable(st, names), tuple(sample[n] for n in names), str(out / MODEL_FILE),
                          dynamo=False, input_names=names, output_names=["sentence_embedding"],
                          dynamic_axes=axes, opset_version=OPSET)
    st.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    torch_encoder = TorchEncoder(st, "cpu")
    meta = {"input_names": names, "dim": torch_encoder.dim, "max_seq_length": torch_encoder.max_seq_length,
            "do_lower_case": torch_encoder.lower_case, "source": model_dir, "versions": library_versions()}
    (out / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    ref = torch_encoder.encode(_VERIFY_TEXTS, batch_size=len(_VERIFY_TEXTS))
    got = OnnxEncoder(out).encode(_VERIFY_TEXTS, batch_size=len(_VERIFY_TEXTS))
    diff = float(np.abs(got - ref).max())
    if not diff <= VERIFY_ATOL:
        raise ExportError(f"exported graph differs from the PyTorch model by {diff:.2e} > {VERIFY_ATOL}")


def ensure_export(model_dir: str, name: str) -> Path:
    """The cached export folder of ``model_dir``, exporting it first when absent (atomically)."""
    final = export_folder(model_dir, name)
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        export_to(model_dir, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable by others
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():  # not a race lost to another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class OnnxEncoder:
    """An exported Sentence-BERT folder run by ONNX Runtime on CPU with one thread per usable core."""

    backend = "onnx"

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        self.folder = folder
        self.input_names: list[str] = list(meta["input_names"])
        self.dim = int(meta["dim"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.lower_case = bool(meta["do_lower_case"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options,
                                            providers=["CPUExecutionProvider"])

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        return self.session.run(None, unpadded_feeds(input_ids, self.input_names))[0]

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        ids = token_ids(self.tokenizer, texts, self.max_seq_length, self.lower_case)
        return run_by_length(ids, batch_size, self.dim, self._run)
