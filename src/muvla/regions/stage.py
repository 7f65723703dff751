"""The regions stage: images (or precomputed features) -> `<out>/parts/*`, index.parquet, classes.json.

Work is split into units of ``unit_size`` inputs in listing order; each unit becomes one part folder,
written atomically. A rerun skips finished parts, shards own ``unit % num_shards == shard``, and
the main process merges them once every part exists (a shard that finishes after it reruns it, as
``muvla corpus`` does), so outputs never depend on the number of processes or on interruptions.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from muvla.corpus.layout import RegionsOutput
from muvla.corpus.provenance import StageRun, Step, StepResult, digest_file, digest_json, run_step
from muvla.corpus.region_store import ImageRegions, RegionPartWriter, merge_region_parts, read_rejected
from muvla.regions.backends import (
    ButdBackend,
    CocoInstancesBackend,
    CropFeaturizer,
    InputItem,
    ProposalsBackend,
    VinVLBackend,
)
from muvla.regions.images import RejectedImage
from muvla.regions.object_regions import ObjectDetectorBackend
from muvla.regions.proposals import ProposalConfig
from muvla.utils.config import ConfigError, check_choices, output_settings, setting, setting_aliases
from muvla.utils.device import NUM_THREADS_HELP, check_num_threads, torch_num_threads
from muvla.utils.progress import progress
from muvla.utils.shards import ShardSpec, UnitPlan, clean_stale_tmp, unit_ranges

BACKENDS = ("proposals", "coco-instances", "vinvl-tsv", "butd-tsv", "centernet", "transformers", "auto")
IMAGE_BACKENDS = ("proposals", "coco-instances", "centernet", "transformers", "auto")
BACKEND_ALIASES = {"detector": "proposals"}  # the old name of the proposals backend (it detects nothing)
INPUT_FIELDS = ("images", "coco_instances", "vinvl_features", "vinvl_predictions", "butd_tsv", "weights",
                "vocabulary", "tag_words")


@dataclass(kw_only=True)
class RegionsSettings:
    """What the regions stage computes and from which inputs (see docs/DESIGN.md "regions")."""

    backend: str = setting("auto", choices=BACKENDS, aliases=BACKEND_ALIASES,
                           help="proposals: offline proposals + ImageNet tags ('detector' is its deprecated "
                                "name); centernet: offline COCO-80 detector (fetched weights); transformers: any "
                                "HuggingFace detector; auto: centernet when its weights are cached, else "
                                "proposals; coco-instances: ground-truth COCO boxes (oracle); vinvl-tsv / "
                                "butd-tsv: precomputed detector features")
    images: Path | None = setting(None, help="folder of image files (image backends)")
    coco_instances: Path | None = setting(None, help="COCO instances JSON (coco-instances backend)")
    vinvl_features: Path | None = setting(None, help="VinVL features.tsv (vinvl-tsv backend)")
    vinvl_predictions: Path | None = setting(None, help="VinVL predictions.tsv (vinvl-tsv backend)")
    butd_tsv: Path | None = setting(None, help="bottom-up-attention TSV (butd-tsv backend)")
    max_regions: int = setting(36, help="regions kept per image (image backends: region 0 is the whole image)")
    nms_iou: float = setting(0.5, help="IoU above which the detector drops the lower-scored of two boxes")
    min_box_frac: float = setting(0.01, help="smallest proposal kept, as a fraction of the image area")
    crop_size: int | None = setting(None, help="side of the square crop fed to the feature backbone, in pixels "
                                               "(default: 224; 128 for centernet/transformers)")
    unit_size: int = setting(64, help="inputs per work unit (one resumable part folder each)")
    store_class_probs: bool = setting(False, help="also store each region's class distribution (proposals backend)")
    proposal_max_side: int = setting(128, help="longest image side when computing felzenszwalb proposals")
    proposal_scales: tuple[float, ...] = setting((400.0, 150.0, 50.0),
                                                 help="felzenszwalb scales of the proposals, coarse to fine")
    max_proposals: int = setting(48, help="crops classified per image by the proposals backend")
    weights: Path | None = setting(None, help="EfficientNet-Lite0 weights file (default: the installed package's)")
    min_score: float = setting(0.15, help="centernet/transformers: detections scored below this are not stored")
    detector_weights: Path | None = setting(None, help="centernet: folder with centernet.json/.bin "
                                                       "(default: the verified cache)")
    detector_model: str | None = setting(None, help="transformers: HuggingFace hub name or local detector folder")
    vocabulary: Path | None = setting(None, help="transformers zero-shot: class names, one per line "
                                                 "(default: the shipped Visual Genome object list)")
    tag_words: Path | None = setting(None, help="JSON {class name: caption word} (default: the shipped COCO table)")
    detector_batch_size: int = setting(4, help="images per detector call (their crops share backbone batches)",
                                       runtime=True)
    device: str = setting("auto", help="transformers: auto (GPU when present), cpu or cuda[:i]", runtime=True)
    batch_size: int = setting(32, help="crops per backbone forward pass", runtime=True)
    num_threads: int | None = setting(None, help=NUM_THREADS_HELP, runtime=True)
    progress: bool = setting(True, help="show a progress bar", runtime=True)

    def validate(self) -> None:
        check_choices(self, "regions")
        needed = {
            "proposals": ("images",),
            "coco-instances": ("images", "coco_instances"),
            "vinvl-tsv": ("vinvl_features", "vinvl_predictions"),
            "butd-tsv": ("butd_tsv",),
            "centernet": ("images",),
            "transformers": ("images", "detector_model"),
            "auto": ("images",),
        }[self.backend]
        for name in needed:
            if getattr(self, name) is None:
                raise ConfigError(f"regions backend {self.backend!r} needs --{name.replace('_', '-')}")
        if self.max_regions < 1:
            raise ConfigError(f"max_regions must be >= 1, got {self.max_regions}")
        if self.backend in IMAGE_BACKENDS and self.max_regions < 2:
            raise ConfigError("max_regions must be >= 2 for image backends (region 0 is the whole image)")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if not 0.0 <= self.min_box_frac < 1.0:
            raise ConfigError(f"min_box_frac must be in [0, 1), got {self.min_box_frac}")
        if self.crop_size is not None and not 32 <= self.crop_size <= 1024:
            raise ConfigError(f"crop_size must be in [32, 1024], got {self.crop_size}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.detector_batch_size < 1:
            raise ConfigError(f"detector_batch_size must be >= 1, got {self.detector_batch_size}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_num_threads(self.num_threads)
        if self.unit_size < 1:
            raise ConfigError(f"unit_size must be >= 1, got {self.unit_size}")
        if self.store_class_probs and self.backend != "proposals":
            raise ConfigError("store_class_probs is only available with the 'proposals' backend")
        if self.proposal_max_side < 8:
            raise ConfigError(f"proposal_max_side must be >= 8, got {self.proposal_max_side}")
        if not self.proposal_scales or any(s <= 0 for s in self.proposal_scales):
            raise ConfigError(f"proposal_scales must be positive numbers, got {self.proposal_scales}")
        if self.max_proposals < self.max_regions and self.backend == "proposals":
            raise ConfigError(f"max_proposals ({self.max_proposals}) must be >= max_regions ({self.max_regions})")

    def check_inputs(self) -> None:
        """The input files and folders exist (cheap; run before any work)."""
        for name in ("images",):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise ConfigError(f"regions: image folder not found: {path}")
        for name in ("coco_instances", "vinvl_features", "vinvl_predictions", "butd_tsv", "weights", "vocabulary",
                     "tag_words"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"regions: {name.replace('_', ' ')} file not found: {path}")

    def proposal_config(self) -> ProposalConfig:
        return ProposalConfig(max_side=self.proposal_max_side, scales=tuple(self.proposal_scales),
                              min_box_frac=self.min_box_frac, max_proposals=self.max_proposals)


@dataclass
class RegionsConfig(RegionsSettings, StageRun):
    """``muvla regions``: the settings plus where the region store goes."""

    out: Path = setting(help="output folder: the region store (index.parquet, parts/, classes.json)")

    def validate(self) -> None:
        super().validate()
        self.shard_spec()


RegionBackend = ProposalsBackend | CocoInstancesBackend | VinVLBackend | ButdBackend | ObjectDetectorBackend


def build_backend(cfg: RegionsConfig) -> RegionBackend:
    """The backend named by ``cfg.backend`` (the backbone is loaded only for image backends)."""
    from muvla.regions.object_detectors import (  # imports the weights module
        build_detector_backend,
        resolve_auto_backend,
    )

    if cfg.backend == "auto":
        cfg = dataclasses.replace(cfg, backend=resolve_auto_backend())
    if cfg.backend in IMAGE_BACKENDS:
        if not Path(cfg.images).is_dir():
            raise ConfigError(f"image folder not found: {cfg.images}")
        from muvla.regions.efficientnet import load_lite0

        crop_size = cfg.crop_size or (128 if cfg.backend in ("centernet", "transformers") else 224)
        featurizer = CropFeaturizer(load_lite0(cfg.weights), crop_size=crop_size, batch_size=cfg.batch_size)
        if cfg.backend in ("centernet", "transformers"):
            return build_detector_backend(cfg, featurizer)
        if cfg.backend == "proposals":
            return ProposalsBackend(cfg.images, max_regions=cfg.max_regions, nms_iou=cfg.nms_iou,
                                    proposals=cfg.proposal_config(), featurizer=featurizer)
        if not Path(cfg.coco_instances).is_file():
            raise ConfigError(f"COCO instances JSON not found: {cfg.coco_instances}")
        return CocoInstancesBackend(cfg.images, cfg.coco_instances, max_regions=cfg.max_regions,
                                    featurizer=featurizer)
    if cfg.backend == "vinvl-tsv":
        return VinVLBackend(cfg.vinvl_features, cfg.vinvl_predictions, max_regions=cfg.max_regions)
    return ButdBackend(cfg.butd_tsv, max_regions=cfg.max_regions)


def input_digests(cfg: RegionsSettings, items: list[InputItem]) -> dict[str, str]:
    """Digests of what the regions are computed from: the input listing (parts are positional, so an
    added or removed image would shift every later part) and every input file."""
    inputs = {"listing": digest_json([[it.image_id, it.file, it.reject or ""] for it in items])}
    for name in INPUT_FIELDS:
        path = getattr(cfg, name)
        if path is not None and Path(path).is_file():
            inputs[name] = digest_file(Path(path))
    return inputs


def _process_unit(backend: RegionBackend, items: list[InputItem], cfg: RegionsConfig, folder: Path,
                  bar_update: Callable[[], None]) -> None:
    writer = RegionPartWriter(max_regions=cfg.max_regions, feature_dim=backend.feature_dim,
                              capacity=len(items), num_classes=len(backend.classes),
                              store_class_probs=cfg.store_class_probs)
    batched: dict[int, tuple[ImageRegions, dict[str, int]] | RejectedImage] = {}
    if isinstance(backend, ObjectDetectorBackend):  # several images per detector call
        todo = [i for i, it in enumerate(items) if it.reject is None]
        for s in range(0, len(todo), cfg.detector_batch_size):
            chunk = todo[s:s + cfg.detector_batch_size]
            batched.update(zip(chunk, backend.process_batch([items[i] for i in chunk])))
    for pos, item in enumerate(items):
        if item.reject is not None:
            writer.reject(item.file, item.reject, item.image_id)
        else:
            try:
                result = batched[pos] if pos in batched else backend.process(item)
                if isinstance(result, RejectedImage):
                    raise result
                regions, stats = result
            except RejectedImage as rej:
                writer.reject(item.file, rej.reason, item.image_id)
            else:
                if not cfg.store_class_probs:
                    regions.class_probs = None
                writer.add(regions)
                for key, value in stats.items():
                    writer.count(key, value)
        bar_update()
    writer.write(folder)


def _reason_key(reason: str) -> str:
    """Group rejections by their reason's prefix ("corrupt image: OSError: ..." -> "corrupt image")."""
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()


def _merged_summary(out: Path, n_inputs: int, n_parts: int, stats: dict[str, int], backend: str) -> dict:
    import pyarrow.parquet as pq

    index = pq.read_table(out / "index.parquet", columns=["num_regions"]).column("num_regions").to_pylist()
    rejected = read_rejected(out / "rejected.jsonl")
    whole_only = sum(1 for n in index if n == 1) if backend in IMAGE_BACKENDS else 0
    return {
        "stage": "regions",
        "backend": backend,
        "merged": True,
        "images_seen": n_inputs,
        "images_written": len(index),
        "regions_written": int(sum(index)),
        "mean_regions_per_image": round(sum(index) / len(index), 3) if index else 0.0,
        "images_whole_image_only": whole_only,
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(_reason_key(r["reason"]) for r in rejected).items())),
        "parts": n_parts,
        "counters": dict(sorted(stats.items())),
    }


def run_regions(cfg: RegionsConfig) -> dict:
    """Run (or resume) the regions stage for this process's shard; merge when every part exists."""
    cfg.validate()
    with torch_num_threads(cfg.num_threads):
        return _run(cfg)


def _run(cfg: RegionsConfig) -> dict:
    output = RegionsOutput(Path(cfg.out))
    shard = cfg.shard_spec()
    cfg.check_inputs()
    if cfg.backend == "auto":  # record the backend actually used, so parts of two backends never mix
        from muvla.regions.object_detectors import resolve_auto_backend

        cfg = dataclasses.replace(cfg, backend=resolve_auto_backend())
    backend = build_backend(cfg)
    items = backend.list_inputs()
    if not items:
        raise ConfigError(f"no inputs found for regions backend {cfg.backend!r} (nothing to do)")
    step = Step("regions", output.root, output_settings(cfg, exclude=INPUT_FIELDS), input_digests(cfg, items),
                output.outputs(), cfg, sources={k: getattr(cfg, k) for k in INPUT_FIELDS},
                work=[output.parts, output.rejected], redo_on_input_change=False, aliases=setting_aliases(cfg))
    return run_step(step, lambda _start: _detect(cfg, shard, output, backend, items), overwrite=cfg.overwrite,
                    rank=shard.rank)


def _detect(cfg: RegionsConfig, shard: ShardSpec, output: RegionsOutput, backend: RegionBackend,
            items: list[InputItem]) -> StepResult:
    """This process's units; then, on the main process once every part exists, the merge."""
    units = unit_ranges(len(items), cfg.unit_size)
    plan = UnitPlan(output.parts, "part", len(units), shard)
    output.parts.mkdir(parents=True, exist_ok=True)
    if shard.world == 1:  # with several shards another process may be writing its temporary part now
        clean_stale_tmp(output.parts)
    todo = plan.todo()
    n_todo = sum(units[u][1] - units[u][0] for u in todo)
    bar = progress(range(n_todo), desc=f"detect regions [{backend.name}]", total=n_todo,
                   enabled=cfg.progress, unit="img")
    ticks = iter(bar)

    def tick() -> None:
        next(ticks, None)

    for u in todo:
        start_i, stop_i = units[u]
        with plan.write(u) as tmp:
            _process_unit(backend, items[start_i:stop_i], cfg, tmp, tick)
    next(ticks, None)  # let the bar close

    if not shard.is_main or not plan.complete():  # only the main process merges (docs/DESIGN.md)
        status = plan.waiting("regions") if not plan.complete() else {"status": "shard_done"}
        return StepResult({**status, "backend": backend.name, "merged": False, "shard": shard.rank,
                           "num_shards": shard.world, "parts_written_now": len(todo), "images_seen": len(items)},
                          complete=False)
    output.write_classes(backend.classes)
    stats = merge_region_parts(output.root)
    summary = _merged_summary(output.root, len(items), len(units), stats, backend.name)
    summary["parts_written_now"] = len(todo)
    return StepResult(summary)


def describe(summary: dict) -> list[str]:
    """The few lines ``muvla regions`` prints at the end (details in summary.json)."""
    if summary.get("status") == "waiting_for_shards":
        return [f"regions: this shard is done; {summary['note']}"]
    lines = [f"regions [{summary.get('backend')}]: {summary.get('images_written')} images, "
             f"{summary.get('mean_regions_per_image')} regions per image"
             + (" (reused: already built)" if summary.get("reused") else "")]
    if summary.get("rejected"):
        lines.append(f"  {summary['rejected']} input(s) rejected: {summary.get('rejected_by_reason')} "
                     "(see rejected.jsonl)")
    return lines
