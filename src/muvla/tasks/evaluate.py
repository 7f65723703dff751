"""Downstream evaluation (``muvla evaluate``): official metrics + prediction files (METHOD.md section 8).

``run_evaluate`` scores a fine-tuned task model (``<finetune out>/model`` with task.json) on one
split, or, for tasks that allow it (retrieval), any muvla model zero-shot through its pre-training
ITM head. What fine-tuning recorded in task.json is read back: the task, the text truncation
(``max_text_len``) and the answer vocabulary; a value given explicitly wins (a differing one is
logged as one warning line), except the task, where a mismatch is an error.

Outputs (``out`` is a folder, or a ``*.json`` results path whose parent holds the rest):
results.json in the ``muvla table`` schema (only when the split has labels), the predictions in the
benchmark's submission format, rejected.jsonl (the readers' records), summary.json and config.yaml,
plus the task's extra outputs (retrieval: the score matrix and a recall figure).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muvla.corpus.layout import RegionsOutput
from muvla.corpus.provenance import (
    OutputPolicy,
    Step,
    StepResult,
    digest_file,
    digest_model,
    run_step,
    summary_path,
)
from muvla.corpus.region_store import RegionStore
from muvla.retrieval.queries import QUERY_MODES
from muvla.tasks.batch import DEFAULT_MAX_TEXT_LEN, has_regions_fn
from muvla.tasks.files import LoadReport
from muvla.tasks.model import (
    ANSWER_VOCAB_FILE,
    TaskInfo,
    TaskModel,
    load_encoder,
    read_task_info,
    resolve_model_folder,
    tokenizer_source,
)
from muvla.tasks.registry import get_task, task_names
from muvla.tasks.results import write_results
from muvla.tasks.spec import DEFAULT_RERANK_QUERY, EvalOptions, Evaluation, ReadOptions, TaskSpec
from muvla.tasks.vocab import AnswerVocab
from muvla.utils.config import ConfigError, check_choices, check_max_text_len, output_settings, setting
from muvla.utils.device import (
    DEVICES,
    NUM_THREADS_HELP,
    PRECISION_HELP,
    PRECISIONS,
    check_num_threads,
    pick_device,
    resolve_precision,
    torch_num_threads,
)

logger = logging.getLogger(__name__)


@dataclass
class EvaluateConfig(OutputPolicy):
    """``muvla evaluate`` settings."""

    out: Path = setting(help="results JSON path, or a folder (-> <out>/results.json)")
    task: str | None = setting(None, help=f"one of {', '.join(task_names())} (default: the fine-tuned model's task, "
                                          "from its task.json)")
    model: str = setting("default", help="fine-tuned model folder (with task.json), or for zero-shot retrieval any "
                                         "muvla or BERT model ('default' = the bundled MiniLM)")
    split: str = setting("val", help="split name (RefCOCO+ split inside the refer files; also names the outputs)")
    data: list[Path] = setting(default_factory=list, help="the task's data files in their official formats")
    regions: Path | None = setting(None, help="region store of the task's images (built by muvla regions)")
    images: Path | None = setting(None, help="NLVR2 / SNLI-VE image folder; retrieval: an image folder to build "
                                             "the regions from when no --regions is given (regions stage defaults)")
    captions: Path | None = setting(None, help="retrieval: captions with image ids (COCO captions .json, JSON lines "
                                               "{image, caption} .jsonl, or TSV image<TAB>caption); same as --data")
    answer_vocab: Path | None = setting(None, help="VQA answer vocabulary (default: the copy in the model folder)")
    max_images: int = setting(0, help="retrieval: first N images only (0 = all)")
    max_captions_per_image: int = setting(0, help="retrieval: captions per image (0 = all)")
    batch_size: int = setting(32, help="encoder rows per batch", runtime=True)
    max_text_len: int | None = setting(None, help="tokens per text (default: the fine-tuned model's, from task.json)")
    device: str = setting("auto", choices=DEVICES, help="auto: CUDA when available, else CPU", runtime=True)
    model_name: str = setting("muvla", help="row name of this model in results.json and the Meta-Ave table")
    num_threads: int | None = setting(None, help=NUM_THREADS_HELP, runtime=True)
    precision: str = setting("auto", choices=PRECISIONS, help=PRECISION_HELP + " (the resolved one is recorded)")
    rerank_k: int = setting(0, help="retrieval: two-stage scoring; the ITM head re-scores only the top k captions per "
                                    "image and top k images per caption of a Sentence-BERT first stage (the image's "
                                    "tag query vs the caption); pairs outside a top k rank below every re-scored "
                                    "one (0 = score every pair)")
    rerank_query: str = setting(DEFAULT_RERANK_QUERY, choices=QUERY_MODES,
                                help="retrieval, rerank_k > 0: the first stage's tag query, as the retrieval stage's "
                                     "query_mode")

    def data_files(self) -> list[Path]:
        return [Path(self.captions)] if self.captions is not None else [Path(p) for p in self.data]

    def validate(self) -> None:
        check_choices(self, "evaluate")
        spec = _resolve_task(self.task, self.model)
        self.task = spec.name
        if not self.data_files():
            raise ConfigError(f"task {spec.name} needs its data files (data, or captions for a captions file): "
                              f"{spec.files}")
        spec.check_files(self.data_files(), "data", labelled=False)
        if self.regions is None and not (spec.regions_from_images and self.images is not None):
            alternative = " or an image folder (images)" if spec.regions_from_images else ""
            raise ConfigError(f"task {spec.name} needs a region store (regions){alternative}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_max_text_len(self.max_text_len)
        if self.max_images < 0 or self.max_captions_per_image < 0:
            raise ConfigError("max_images and max_captions_per_image must be >= 0 (0 = all)")
        if self.rerank_k < 0:
            raise ConfigError(f"rerank_k must be >= 0 (0 = score every pair), got {self.rerank_k}")
        check_num_threads(self.num_threads)


def _model_info(model: str | Path) -> tuple[Path | None, TaskInfo | None]:
    """(muvla model folder, its task.json) behind ``model``; (None, None) for a BERT name/folder."""
    try:
        folder = resolve_model_folder(model)
        return folder, read_task_info(folder) if folder is not None else None
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _resolve_task(task: str | None, model: str | Path) -> TaskSpec:
    """The task given, else the one in the model's task.json; a model fine-tuned for another task is an error."""
    folder, info = _model_info(model)
    if task is None:
        if info is None:
            raise ConfigError(f"task: give the task to evaluate ({model} has no task.json to read it from)")
        task = info.task
    spec = get_task(task)
    if info is not None and get_task(info.task) is not spec:
        raise ConfigError(f"{folder} was fine-tuned for {info.task!r}, not {spec.name!r}")
    return spec


def output_paths(out: Path) -> tuple[Path, Path]:
    """(results.json path, folder for predictions / rejected / summary)."""
    out = Path(out)
    if out.suffix == ".json":
        return out, out.parent
    return out / "results.json", out


def read_back_max_text_len(given: int | None, info: TaskInfo | None) -> int:
    """The text truncation to evaluate with: the given one (a difference from fine-tuning is one
    warning line), else the one fine-tuning recorded, else the default."""
    trained = info.max_text_len if info is not None else None
    if given is None:
        return trained if trained is not None else DEFAULT_MAX_TEXT_LEN
    if trained is not None and given != trained:
        logger.warning("max_text_len %d (given) differs from %d used in fine-tuning (task.json); using %d",
                       given, trained, given)
    return given


def _load_model(spec: TaskSpec, model: str, feature_dim: int) -> tuple[TaskModel, TaskInfo | None, Path | None]:
    """The fine-tuned model (+ its task.json and folder), or for zero-shot tasks a plain encoder + fresh head."""
    folder, info = _model_info(model)
    if info is None or folder is None:
        if not spec.zero_shot:
            raise ConfigError(f"{model} is not a fine-tuned {spec.name} model (no task.json): run muvla finetune first")
        return spec.build_model(load_encoder(model, feature_dim)), None, folder
    task_model = spec.load_model(folder)
    if task_model.encoder.config.region_feature_dim != feature_dim:
        raise ConfigError(f"{folder} expects region features of size {task_model.encoder.config.region_feature_dim}, "
                          f"the region store has {feature_dim}")
    return task_model, info, folder


def _answer_vocab(spec: TaskSpec, given: Path | None, model: TaskModel, info: TaskInfo | None,
                  folder: Path | None) -> AnswerVocab | None:
    """The fine-tuned model's answer vocabulary (or the given one, which wins); None for fixed classes."""
    if not spec.learns_answers:
        return None
    trained = folder / (info.answer_vocab or ANSWER_VOCAB_FILE) if folder is not None and info is not None else None
    path = Path(given) if given is not None else trained
    if path is None or not path.is_file():
        raise ConfigError(f"{spec.name} evaluation needs answer_vocab (none found in the model folder)")
    try:
        vocab = AnswerVocab.from_file(path)
        if given is not None and trained is not None and trained.is_file() and AnswerVocab.from_file(trained) != vocab:
            logger.warning("answer_vocab %s (given) differs from the model's %s; using %s", path, trained, path)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if len(vocab) != model.n_answers:
        raise ConfigError(f"answer vocabulary {path} has {len(vocab)} answers, the model {model.n_answers}")
    return vocab


def _build_regions(cfg: EvaluateConfig, folder: Path) -> Path:
    """No region store given: run the regions stage on ``cfg.images`` into ``<folder>/regions``."""
    from muvla.regions.stage import RegionsConfig, run_regions

    rcfg = RegionsConfig(out=folder / "regions", images=cfg.images, progress=False)
    run_regions(rcfg)
    return rcfg.out


def _write_outputs(spec: TaskSpec, cfg: EvaluateConfig, evaluation: Evaluation, report: LoadReport,
                   folder: Path, results_path: Path) -> dict[str, Any]:
    """The task's extra files, rejected.jsonl and results.json (only when the split has labels)."""
    written: dict[str, Any] = {}
    if spec.extra_outputs is not None:
        written.update(spec.extra_outputs(evaluation, folder, spec.output_stem(cfg.split), cfg.model_name))
    report.write_rejected(folder / "rejected.jsonl")
    written["results"] = None
    if spec.headline in evaluation.metrics:
        written["results"] = str(write_results(results_path, cfg.model_name, spec.name, cfg.split,
                                               evaluation.metrics))
    else:  # e.g. VQA test-dev questions without annotations: predictions only, scored by the server
        logger.warning("%s/%s has no labels: wrote predictions only (%s)", spec.name, cfg.split,
                       spec.prediction_path(folder, cfg.split))
    return written


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate one task on one split; write results.json, predictions, rejected.jsonl, summary.json.

    A step of the protocol (``muvla.corpus.provenance``): the same settings, model, regions and data
    reuse the finished evaluation; changed settings are refused unless ``overwrite``; a changed model
    or input file evaluates again."""
    cfg.validate()
    spec = get_task(str(cfg.task))
    results_path, folder = output_paths(cfg.out)
    regions_root = Path(cfg.regions) if cfg.regions is not None else _build_regions(cfg, folder)
    inputs = {"regions": RegionsOutput(regions_root).digest(), "model": digest_model(cfg.model)}
    inputs.update({f"data:{i}:{p.name}": digest_file(p) for i, p in enumerate(cfg.data_files())})
    if cfg.answer_vocab is not None:
        inputs["answer_vocab"] = digest_file(Path(cfg.answer_vocab))
    pred_path = spec.prediction_path(folder, cfg.split)
    settings = output_settings(cfg, exclude=("out", "data", "captions", "regions", "images", "model", "answer_vocab"))
    settings["precision"] = resolve_precision(cfg.precision, pick_device(cfg.device))  # what auto means here
    if cfg.rerank_k == 0:
        del settings["rerank_query"]  # no first stage: the query mode changes nothing
    step = Step("evaluate", folder, settings, inputs, [pred_path, summary_path(folder)], cfg,
                sources={"data": cfg.data_files(), "regions": regions_root, "model": cfg.model,
                         "answer_vocab": cfg.answer_vocab},
                work=[results_path, folder / "rejected.jsonl"])
    with torch_num_threads(cfg.num_threads):
        return run_step(step, lambda _start: StepResult(_evaluate(cfg, spec, regions_root, results_path, folder)),
                        overwrite=cfg.overwrite)


def _evaluate(cfg: EvaluateConfig, spec: TaskSpec, regions_root: Path, results_path: Path,
              folder: Path) -> dict[str, Any]:
    from muvla.encoders import load_wordpiece_tokenizer
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    store = RegionStore(regions_root)
    model, info, model_folder = _load_model(spec, cfg.model, store.feature_dim)
    cfg = dataclasses.replace(cfg, max_text_len=read_back_max_text_len(cfg.max_text_len, info))
    vocab = _answer_vocab(spec, cfg.answer_vocab, model, info, model_folder)
    read = ReadOptions(images=cfg.images, split=cfg.split, has_regions=has_regions_fn(store), vocab=vocab)
    examples, report = spec.load(cfg.data_files(), read)
    options = EvalOptions(store, load_wordpiece_tokenizer(tokenizer_source(cfg.model)), device,
                          batch_size=cfg.batch_size, max_text_len=int(cfg.max_text_len), vocab=vocab,
                          max_images=cfg.max_images, max_captions_per_image=cfg.max_captions_per_image,
                          zero_shot=info is None, label=cfg.model_name, precision=precision,
                          rerank_k=cfg.rerank_k, rerank_query=cfg.rerank_query)
    pred_path = spec.prediction_path(folder, cfg.split)
    evaluation = spec.score(model.to(device), examples, report, options, pred_path)
    written = _write_outputs(spec, cfg, evaluation, report, folder, results_path)
    logger.info("evaluate %s/%s: %s (%s)", spec.name, cfg.split, evaluation.metrics, report.summary())
    return {"task": spec.name, "split": cfg.split, "model": str(cfg.model),
            "regions": str(regions_root), "device": str(device), "precision": precision,
            "max_text_len": cfg.max_text_len, "scoring": evaluation.info,
            **{k: v for k, v in written.items() if k != "results"},
            "metrics": evaluation.metrics, "load_report": report.to_dict(),
            "results": written["results"], "predictions": str(pred_path)}


def describe(summary: dict[str, Any]) -> list[str]:
    """The few lines ``muvla evaluate`` prints at the end (details in summary.json)."""
    reused = " (reused: same settings, model and data)" if summary.get("reused") else ""
    metrics = summary.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))[:200]
    lines = [f"evaluate [{summary.get('task')}/{summary.get('split')}] {summary.get('model')}{reused}",
             f"  {shown or 'no labels: predictions only'}", f"  predictions: {summary.get('predictions')}"]
    scoring = summary.get("scoring") or {}
    if "pairs_scored" in scoring:
        how = f"top {scoring['rerank_k']} re-scored" if scoring.get("rerank_k") else "every pair"
        lines.append(f"  scored {scoring['pairs_scored']} pairs ({how}, {summary.get('precision')}) "
                     f"in {scoring.get('scoring_s')} s")
    if summary.get("results"):
        lines.append(f"  results: {summary['results']}")
    return lines
