"""The regions stage: images (or precomputed features) -> `<out>/parts/*`, index.parquet, classes.json.

Work is split into units of ``unit_size`` inputs in listing order; each unit becomes one part folder,
written atomically. A rerun skips finished parts, shards own ``unit % num_shards == shard``, and
whichever process finds every part complete merges them (normally the main rank; with torchrun the
last one to finish), so outputs never depend on the number of processes or on interruptions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from muvla.corpus.regions import ImageRegions, RegionPartWriter, merge_region_parts, read_rejected
from muvla.regions.detector import (
    ButdBackend,
    CocoInstancesBackend,
    CropFeaturizer,
    DetectorBackend,
    InputItem,
    VinVLBackend,
)
from muvla.regions.images import RejectedImage
from muvla.regions.object_regions import ObjectDetectorBackend
from muvla.regions.proposals import ProposalConfig
from muvla.utils.config import ConfigError, save_config
from muvla.utils.progress import progress
from muvla.utils.shards import atomic_dir, atomic_file, clean_stale_tmp, resolve_shard, unit_name, unit_ranges

BACKENDS = ("detector", "coco-instances", "vinvl-tsv", "butd-tsv", "centernet", "transformers", "auto")
IMAGE_BACKENDS = ("detector", "coco-instances", "centernet", "transformers", "auto")
# Fields that only change speed or who does the work; all others change the outputs.
_RUNTIME_FIELDS = ("batch_size", "shard", "num_shards", "progress", "num_threads", "detector_batch_size", "device")


@dataclass
class RegionsConfig:
    """Regions stage settings (see DESIGN.md "regions")."""

    out: Path
    backend: str = "detector"
    images: Path | None = None
    coco_instances: Path | None = None
    vinvl_features: Path | None = None
    vinvl_predictions: Path | None = None
    butd_tsv: Path | None = None
    max_regions: int = 36
    nms_iou: float = 0.5
    min_box_frac: float = 0.01
    crop_size: int | None = None     # crop side for region features (None: 224, or 128 for centernet/transformers)
    batch_size: int = 32
    unit_size: int = 64
    store_class_probs: bool = False
    shard: int | None = None
    num_shards: int | None = None
    proposal_max_side: int = 128
    proposal_scales: tuple[float, ...] = (400.0, 150.0, 50.0)
    max_proposals: int = 48
    weights: Path | None = None
    min_score: float = 0.15          # centernet/transformers: detections scored below this are not stored
    detector_weights: Path | None = None  # centernet: folder with centernet.json/.bin (None = verified cache)
    detector_model: str | None = None     # transformers: HF hub name or local folder of a detector
    vocabulary: Path | None = None   # transformers zero-shot: class names, one per line (None = shipped VG-size list)
    tag_words: Path | None = None    # JSON {class name: caption word} (None = shipped COCO table)
    detector_batch_size: int = 4     # images per detector call (their crops share backbone batches)
    device: str = "auto"             # transformers: auto (GPU when present) | cpu | cuda[:i]
    num_threads: int | None = None    # torch CPU threads for this run (None = torch default)
    progress: bool = True

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"regions backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        needed = {
            "detector": ("images",),
            "coco-instances": ("images", "coco_instances"),
            "vinvl-tsv": ("vinvl_features", "vinvl_predictions"),
            "butd-tsv": ("butd_tsv",),
            "centernet": ("images",),
            "transformers": ("images", "detector_model"),
            "auto": ("images",),
        }[self.backend]
        for name in needed:
            if getattr(self, name) is None:
                raise ConfigError(f"regions backend {self.backend!r} needs {name!r}")
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
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.unit_size < 1:
            raise ConfigError(f"unit_size must be >= 1, got {self.unit_size}")
        if self.store_class_probs and self.backend != "detector":
            raise ConfigError("store_class_probs is only available with the 'detector' backend")
        if self.proposal_max_side < 8:
            raise ConfigError(f"proposal_max_side must be >= 8, got {self.proposal_max_side}")
        if not self.proposal_scales or any(s <= 0 for s in self.proposal_scales):
            raise ConfigError(f"proposal_scales must be positive numbers, got {self.proposal_scales}")
        if self.max_proposals < self.max_regions and self.backend == "detector":
            raise ConfigError(f"max_proposals ({self.max_proposals}) must be >= max_regions ({self.max_regions})")
        try:
            resolve_shard(self.shard, self.num_shards)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def proposal_config(self) -> ProposalConfig:
        return ProposalConfig(max_side=self.proposal_max_side, scales=tuple(self.proposal_scales),
                              min_box_frac=self.min_box_frac, max_proposals=self.max_proposals)


RegionBackend = DetectorBackend | CocoInstancesBackend | VinVLBackend | ButdBackend | ObjectDetectorBackend


def build_backend(cfg: RegionsConfig) -> RegionBackend:
    """The backend named by ``cfg.backend`` (the backbone is loaded only for image backends)."""
    from muvla.regions.detectors import (  # imports the weights module
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
        if cfg.backend == "detector":
            return DetectorBackend(cfg.images, max_regions=cfg.max_regions, nms_iou=cfg.nms_iou,
                                   proposals=cfg.proposal_config(), featurizer=featurizer)
        if not Path(cfg.coco_instances).is_file():
            raise ConfigError(f"COCO instances JSON not found: {cfg.coco_instances}")
        return CocoInstancesBackend(cfg.images, cfg.coco_instances, max_regions=cfg.max_regions,
                                    featurizer=featurizer)
    if cfg.backend == "vinvl-tsv":
        return VinVLBackend(cfg.vinvl_features, cfg.vinvl_predictions, max_regions=cfg.max_regions)
    return ButdBackend(cfg.butd_tsv, max_regions=cfg.max_regions)


def _output_settings(cfg: RegionsConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for key in _RUNTIME_FIELDS:
        d.pop(key, None)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _check_same_settings(cfg: RegionsConfig, out: Path, items: list[InputItem]) -> None:
    """Refuse to mix parts computed with different settings or a different input list in one folder.

    Parts are positional (unit i = inputs [i*U, (i+1)*U)), so an added or removed image would
    silently shift every later part: the listing's hash is part of the settings.
    """
    path = out / "regions_settings.json"
    listing = "\n".join(f"{it.image_id}\t{it.file}\t{it.reject or ''}" for it in items)
    current = {**_output_settings(cfg), "num_inputs": len(items),
               "inputs_sha1": hashlib.sha1(listing.encode("utf-8")).hexdigest()}
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if diff:
            raise ConfigError(f"{out} holds regions computed with different settings or inputs ({diff}); "
                              "use another --out or delete the folder")
        return
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True), encoding="utf-8")


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
    if cfg.num_threads is None:
        return _run(cfg)
    # Oversubscribed CPUs make torch's thread pool spin (measured 10x slower on a busy 2-core box),
    # so the thread count is configurable; restore it afterwards, it is process-global.
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: RegionsConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shard = resolve_shard(cfg.shard, cfg.num_shards)
    if cfg.backend == "auto":  # record the backend actually used, so parts of two backends never mix
        from muvla.regions.detectors import resolve_auto_backend

        cfg = dataclasses.replace(cfg, backend=resolve_auto_backend())
    backend = build_backend(cfg)
    items = backend.list_inputs()
    if not items:
        raise ConfigError(f"no inputs found for regions backend {cfg.backend!r} (nothing to do)")
    _check_same_settings(cfg, out, items)
    units = unit_ranges(len(items), cfg.unit_size)
    parts_dir = out / "parts"
    parts_dir.mkdir(exist_ok=True)
    if shard.world == 1:  # with several shards another process may be writing its temporary part now
        clean_stale_tmp(parts_dir)
    todo = [u for u in range(len(units)) if shard.owns(u) and not (parts_dir / unit_name(u)).exists()]
    n_todo = sum(units[u][1] - units[u][0] for u in todo)
    bar = progress(range(n_todo), desc=f"regions [{backend.name}]", total=n_todo,
                   enabled=cfg.progress, unit="img")
    ticks = iter(bar)

    def tick() -> None:
        next(ticks, None)

    for u in todo:
        start, stop = units[u]
        with atomic_dir(parts_dir / unit_name(u)) as tmp:
            _process_unit(backend, items[start:stop], cfg, tmp, tick)
    next(ticks, None)  # let the bar close

    with atomic_file(out / "classes.json") as tmp:
        tmp.write_text(json.dumps({"names": list(backend.classes)}, ensure_ascii=False), encoding="utf-8")
    inputs = {"images": cfg.images, "coco_instances": cfg.coco_instances, "vinvl_features": cfg.vinvl_features,
              "vinvl_predictions": cfg.vinvl_predictions, "butd_tsv": cfg.butd_tsv, "num_inputs": len(items)}
    save_config(cfg, out, inputs={k: v for k, v in inputs.items() if v is not None})

    missing = [unit_name(u) for u in range(len(units)) if not (parts_dir / unit_name(u)).exists()]
    if missing:
        summary = {"stage": "regions", "backend": backend.name, "merged": False,
                   "reason": f"{len(missing)} of {len(units)} parts not yet written by other shards",
                   "missing_parts": missing, "shard": shard.rank, "num_shards": shard.world,
                   "parts_written_now": len(todo), "images_seen": len(items)}
        path = out / f"summary.shard-{shard.rank}-of-{shard.world}.json"
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        return summary
    stats = merge_region_parts(out)
    summary = _merged_summary(out, len(items), len(units), stats, backend.name)
    summary["parts_written_now"] = len(todo)
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
