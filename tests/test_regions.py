"""Regions stage: backbone, image loading, proposals, backends, store, resume and sharding."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from muvla.regions import (
    ButdBackend,
    CropFeaturizer,
    ImageRegions,
    ProposalConfig,
    ProposalsBackend,
    RegionsConfig,
    RegionStore,
    RejectedImage,
    VinVLBackend,
    box_iou,
    imagenet_class_names,
    imagenet_tags,
    list_images,
    load_lite0,
    load_rgb,
    nms,
    preprocess,
    propose_boxes,
    run_regions,
    short_tag,
)
from muvla.regions.efficientnet import default_weights_path
from muvla.utils.config import ConfigError, load_config

os.environ.setdefault("MUVLA_NO_PROGRESS", "1")
# Small settings so every stage run takes a second or two on a busy CPU.
FAST = {"backend": "proposals", "max_regions": 4, "max_proposals": 6, "crop_size": 64, "proposal_max_side": 48,
        "proposal_scales": (100.0,), "batch_size": 8, "num_threads": 1}


@pytest.fixture(scope="module")
def model():
    return load_lite0()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tests run next to other busy processes: one thread avoids thread-pool spinning."""
    yield


# ---------------------------------------------------------------- backbone

def test_weights_load_strictly_and_cover_every_parameter(model):
    shipped = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(shipped)
    for key, value in shipped.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_backbone_shapes(model):
    x = preprocess(np.zeros((70, 50, 3), dtype=np.uint8), 96)
    assert x.shape == (1, 3, 96, 96)
    assert float(x.min()) == -1.0
    with torch.no_grad():
        fmap = model.forward_features(x)
        logits = model.classify(fmap.mean(dim=(2, 3)))
    assert fmap.shape == (1, 1280, 3, 3)
    assert logits.shape == (1, 1000)


def test_classifies_skimage_cat_and_coffee(model):
    import skimage.data

    names = imagenet_class_names()
    with torch.no_grad():
        probs = model(preprocess([skimage.data.chelsea(), skimage.data.coffee()])).softmax(-1)
    top_p, top = probs.max(dim=-1)
    assert "cat" in names[int(top[0])], names[int(top[0])]
    assert any(w in names[int(top[1])] for w in ("espresso", "cup", "coffee")), names[int(top[1])]
    assert float(top_p[0]) > 0.5 and float(top_p[1]) > 0.5


def test_short_tag():
    assert short_tag("tabby, tabby cat") == "tabby cat"
    assert short_tag("hammerhead, hammerhead shark") == "hammerhead shark"
    assert short_tag("great white shark, white shark, man-eater") == "great white shark"
    assert short_tag("Egyptian cat") == "egyptian cat"
    with pytest.raises(ValueError):
        short_tag(" , ")
    tags = imagenet_tags()
    assert len(tags) == 1000 and tags[281] == "tabby cat"
    assert all(t == t.lower() and t for t in tags)


# ---------------------------------------------------------------- boxes

def test_box_iou_and_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32)
    iou = box_iou(boxes, boxes)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(81 / 100)
    assert iou[0, 2] == 0.0
    scores = np.array([0.5, 0.9, 0.8, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.9).tolist() == [1, 2, 0]  # tie 0 vs 3: lower index wins
    with pytest.raises(ValueError):
        nms(boxes, scores[:2], 0.5)


def test_proposals_whole_image_first_and_in_bounds():
    rng = np.random.default_rng(0)
    img = np.zeros((90, 120, 3), dtype=np.uint8)
    img[10:50, 20:70] = (200, 30, 30)
    img[55:85, 80:115] = (30, 200, 30)
    img += rng.integers(0, 10, img.shape, dtype=np.uint8)
    boxes = propose_boxes(img, ProposalConfig(max_proposals=10))
    assert boxes[0].tolist() == [0, 0, 120, 90]
    assert 2 <= len(boxes) <= 10
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 90).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert box_iou(boxes[:1], np.array([[20, 10, 70, 50]])).max() < 1  # sanity: not all whole-image
    assert box_iou(boxes[1:], np.array([[20, 10, 70, 50]])).max() > 0.5  # the red square is found
    assert propose_boxes(np.zeros((1, 1, 3), dtype=np.uint8)).tolist() == [[0, 0, 1, 1]]


# ---------------------------------------------------------------- images

def _exif_rotated_jpeg(path: Path) -> None:
    img = Image.new("RGB", (40, 20), (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(path, exif=exif.tobytes())


def write_odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Unusual but valid images; returns expected (width, height) after loading."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.new("CMYK", (32, 24), (0, 128, 255, 0)).save(folder / "cmyk.jpg")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))
    pal.save(folder / "palette.png", transparency=0)
    _exif_rotated_jpeg(folder / "exif_rotated.jpg")
    Image.new("RGB", (1, 1), (5, 6, 7)).save(folder / "one_pixel.png")
    deep = (np.arange(24 * 36, dtype=np.uint16).reshape(24, 36) * 70).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    return {"gray": (40, 30), "cmyk": (32, 24), "rgba": (20, 20), "palette": (16, 16),
            "exif_rotated": (20, 40), "one_pixel": (1, 1), "deep16": (36, 24)}


def write_bad_files(folder: Path) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("<html>404 not found</html>", encoding="utf-8")
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 99, dtype=np.uint8)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"empty.jpg", "text.jpg", "truncated.jpg"}


def test_load_rgb_odd_images(tmp_path):
    expected = write_odd_images(tmp_path)
    for stem, (w, h) in expected.items():
        path = next(tmp_path.glob(stem + ".*"))
        arr = load_rgb(path)
        assert arr.dtype == np.uint8 and arr.shape == (h, w, 3), stem
    rgba = load_rgb(tmp_path / "rgba.png")
    assert rgba[0, 0].tolist() == [255, 0, 0] and rgba[0, 15].tolist() == [255, 255, 255]
    pal = load_rgb(tmp_path / "palette.png")
    assert pal[0, 0].tolist() == [0, 255, 0] and pal[0, 12].tolist() == [255, 255, 255]
    deep = load_rgb(tmp_path / "deep16.png")
    assert deep[..., 0].max() > 200 and deep[0, 0, 0] == 0  # 16-bit range scaled, not clipped


def test_load_rgb_rejects_bad_files(tmp_path):
    for name in write_bad_files(tmp_path):
        with pytest.raises(RejectedImage) as err:
            load_rgb(tmp_path / name)
        assert err.value.reason
    assert "empty" in str(pytest.raises(RejectedImage, load_rgb, tmp_path / "empty.jpg").value)


def test_list_images_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    for rel in ("b/2.PNG", "a/3.jpg", "1.jpeg", "notes.txt", ".hidden/4.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rels = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rels == ["1.jpeg", "a/3.jpg", "b/2.PNG"]


# ---------------------------------------------------------------- proposals backend

def _scene(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y:y + rng.integers(10, 20), x:x + rng.integers(10, 20)] = rng.integers(0, 255, 3)
    return img


def test_proposals_backend_is_deterministic(model, tmp_path):
    backend = ProposalsBackend(tmp_path, max_regions=4, proposals=ProposalConfig(max_side=48, max_proposals=6),
                               featurizer=CropFeaturizer(model, crop_size=64))
    img = _scene(3)
    a = backend.detect(img)
    b = backend.detect(img)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    boxes, scores, feats, probs = a
    assert boxes[0].tolist() == [0, 0, 96, 72]
    assert 1 <= len(boxes) <= 4 and feats.shape == (len(boxes), 1280) and probs.shape == (len(boxes), 1000)
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and np.allclose(scores, probs.max(1))


def _make_folder(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_scene(10 + i, 56 + 8 * i, 64 + 4 * i)).save(folder / f"{i:012d}.png")


def _arrays(out: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted((out / "parts").glob("*/*.npy"))}


def test_stage_records_rejects_and_reads_back(tmp_path):
    images = tmp_path / "img"
    expected = write_odd_images(images)
    bad = write_bad_files(images)
    cfg = RegionsConfig(out=tmp_path / "out", images=images, unit_size=4, store_class_probs=True, **FAST)
    summary = run_regions(cfg)
    assert summary["merged"] is True
    assert summary["images_seen"] == len(expected) + len(bad)
    assert summary["images_written"] == len(expected)
    assert summary["rejected"] == 3 and sum(summary["rejected_by_reason"].values()) == 3
    rejected = [json.loads(line) for line in (cfg.out / "rejected.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rejected} == bad
    assert json.loads((cfg.out / "summary.json").read_text())["rejected"] == 3
    assert len(json.loads((cfg.out / "classes.json").read_text())["names"]) == 1000
    assert (cfg.out / "config.yaml").exists()

    store = RegionStore(cfg.out)
    assert len(store) == len(expected) and store.feature_dim == 1280
    assert sorted(store.image_ids) == sorted(expected)
    for stem, (w, h) in expected.items():
        r = store[stem]
        assert (r.width, r.height) == (w, h), stem
        assert r.features.dtype == np.float16 and r.features.shape == (r.num_regions, 1280)
        assert r.class_probs is not None and r.class_probs.shape == (r.num_regions, 1000)
        assert r.tags == [store.classes[c] for c in r.class_ids]
        pos = r.position_features()
        assert pos.shape == (r.num_regions, 5) and np.allclose(pos[0], [0, 0, 1, 1, 1])
    streamed = list(store)
    assert [r.image_id for r in streamed] == store.image_ids
    assert np.array_equal(streamed[2].features, store[store.image_ids[2]].features)
    assert store.find("missing") is None
    with pytest.raises(KeyError):
        store["missing"]
    parts = pq.read_table(cfg.out / "index.parquet").column("part").to_pylist()
    # sorted inputs: part-00002 = [text.jpg, truncated.jpg], both rejected -> an empty but valid part
    assert parts == sorted(parts) and set(parts) == {"part-00000", "part-00001"}
    assert np.load(cfg.out / "parts" / "part-00002" / "features.npy").shape == (0, 4, 1280)


def test_resume_recomputes_only_missing_part(tmp_path):
    images = tmp_path / "img"
    _make_folder(images, 5)
    cfg = RegionsConfig(out=tmp_path / "out", images=images, unit_size=2, **FAST)
    first = run_regions(cfg)
    assert first["parts"] == 3 and first["parts_written_now"] == 3
    before = _arrays(cfg.out)
    index_before = pq.read_table(cfg.out / "index.parquet")
    kept_mtime = (cfg.out / "parts" / "part-00000" / "features.npy").stat().st_mtime_ns
    assert run_regions(cfg)["reused"] is True  # complete and up to date: nothing redone
    shutil.rmtree(cfg.out / "parts" / "part-00001")  # a run killed before its merge, with a part lost
    (cfg.out / "index.parquet").unlink()
    second = run_regions(cfg)
    assert second["parts_written_now"] == 1
    assert (cfg.out / "parts" / "part-00000" / "features.npy").stat().st_mtime_ns == kept_mtime
    assert _arrays(cfg.out) == before
    assert pq.read_table(cfg.out / "index.parquet").equals(index_before)
    store = RegionStore(cfg.out)
    assert store.find(3).image_id == "000000000003"  # int COCO-style id finds the zero-padded stem
    assert 3 in store and 99 not in store


def test_two_shards_equal_one_run(tmp_path):
    images = tmp_path / "img"
    _make_folder(images, 5)
    whole = RegionsConfig(out=tmp_path / "whole", images=images, unit_size=2, **FAST)
    run_regions(whole)
    sharded = tmp_path / "sharded"
    s1 = run_regions(RegionsConfig(out=sharded, images=images, unit_size=2, shard=1, num_shards=2, **FAST))
    assert s1["merged"] is False and s1["missing_units"] == ["part-00000", "part-00002"]
    assert not (sharded / "index.parquet").exists()
    s0 = run_regions(RegionsConfig(out=sharded, images=images, unit_size=2, shard=0, num_shards=2, **FAST))
    assert s0["merged"] is True and s0["parts_written_now"] == 2
    assert _arrays(sharded) == _arrays(whole.out)
    assert pq.read_table(sharded / "index.parquet").equals(pq.read_table(whole.out / "index.parquet"))


def test_config_validation_and_settings_guard(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        RegionsConfig(out=tmp_path, backend="yolo", images=tmp_path).validate()
    with pytest.raises(ConfigError, match="images"):
        RegionsConfig(out=tmp_path).validate()
    with pytest.raises(ConfigError, match="nms_iou"):
        RegionsConfig(out=tmp_path, images=tmp_path, nms_iou=0).validate()
    with pytest.raises(ConfigError, match="store_class_probs"):
        RegionsConfig(out=tmp_path, backend="butd-tsv", butd_tsv=tmp_path, store_class_probs=True).validate()
    with pytest.raises(ConfigError, match="shard"):
        RegionsConfig(out=tmp_path, images=tmp_path, shard=2, num_shards=2).validate()
    images = tmp_path / "img"
    _make_folder(images, 1)
    run_regions(RegionsConfig(out=tmp_path / "out", images=images, **FAST))
    with pytest.raises(ConfigError, match=r"other settings: max_regions=4 \(this run: 3\)"):
        run_regions(RegionsConfig(out=tmp_path / "out", images=images, **{**FAST, "max_regions": 3}))
    Image.fromarray(_scene(99)).save(images / "extra.png")  # parts are positional: a new image must not mix in
    with pytest.raises(ConfigError, match="listing changed"):
        run_regions(RegionsConfig(out=tmp_path / "out", images=images, **FAST))
    with pytest.raises(ConfigError, match="no inputs"):
        run_regions(RegionsConfig(out=tmp_path / "empty_out", images=tmp_path / "out" / "parts", **FAST))


def test_old_backend_name_detector_is_read_as_proposals(tmp_path, caplog):
    """Existing configs say ``backend: detector``: accepted, one warning line, and recorded as proposals."""
    config = tmp_path / "regions.yaml"
    config.write_text("backend: detector\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="muvla.utils.config"):
        cfg = load_config(RegionsConfig, config, {"out": tmp_path / "out", "images": tmp_path})
    assert cfg.backend == "proposals"
    assert caplog.messages == ["backend: 'detector' is deprecated, it is now called 'proposals'"]
    caplog.clear()
    built = RegionsConfig(out=tmp_path / "out", images=tmp_path, backend="detector", store_class_probs=True)
    with caplog.at_level("WARNING", logger="muvla.utils.config"):
        built.validate()  # the Python API too: normalised before the backend's rules are checked
    assert built.backend == "proposals" and len(caplog.messages) == 1


# ---------------------------------------------------------------- precomputed features

def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).decode("ascii")


def _write_vinvl(folder: Path, with_lineidx: bool) -> dict:
    rng = np.random.default_rng(7)
    truth = {}
    feat_lines, pred_lines = [], []
    for k, n in enumerate((3, 1, 5)):
        image_id = f"img{k}"
        feats = rng.standard_normal((n, 2054)).astype(np.float32)
        objects = [{"rect": [float(i), float(2 * i), float(10 + i), float(20 + i)], "class": f"c{(i + k) % 4}",
                    "conf": round(0.9 - 0.1 * i, 3)} for i in range(n)]
        feat_lines.append(f"{image_id}\t{n}\t{_b64(feats)}")
        pred_lines.append(f"{image_id}\t" + json.dumps({"image_h": 50 + k, "image_w": 60 + k, "objects": objects}))
        truth[image_id] = (feats, objects)
    for name, lines in (("features", feat_lines), ("predictions", pred_lines)):
        data = "".join(line + "\n" for line in lines)
        (folder / f"{name}.tsv").write_text(data, encoding="utf-8")
        if with_lineidx:
            offsets, pos = [], 0
            for line in lines:
                offsets.append(pos)
                pos += len(line.encode()) + 1
            (folder / f"{name}.lineidx").write_text("".join(f"{o}\n" for o in offsets), encoding="utf-8")
    return truth


@pytest.mark.parametrize("with_lineidx", [False, True])
def test_vinvl_round_trip(tmp_path, with_lineidx):
    truth = _write_vinvl(tmp_path, with_lineidx)
    cfg = RegionsConfig(out=tmp_path / "out", backend="vinvl-tsv", vinvl_features=tmp_path / "features.tsv",
                        vinvl_predictions=tmp_path / "predictions.tsv", max_regions=4, unit_size=2)
    summary = run_regions(cfg)
    assert summary["images_written"] == 3 and summary["counters"] == {"regions_truncated": 1}
    store = RegionStore(cfg.out)
    assert store.feature_dim == 2048 and store.classes == ["c0", "c1", "c2", "c3"]
    for image_id, (feats, objects) in truth.items():
        r = store[image_id]
        keep = list(range(min(len(objects), 4)))  # confidences decrease, so the first 4 are the best
        assert r.tags == [objects[i]["class"] for i in keep]
        assert np.array_equal(r.features, feats[keep, :2048].astype(np.float16))
        assert np.allclose(r.boxes, [objects[i]["rect"] for i in keep])
        assert np.allclose(r.scores, [objects[i]["conf"] for i in keep])
        assert r.width == 60 + int(image_id[-1]) and r.height == 50 + int(image_id[-1])


def test_vinvl_misaligned_files_error(tmp_path):
    _write_vinvl(tmp_path, with_lineidx=False)
    lines = (tmp_path / "predictions.tsv").read_text().splitlines()
    (tmp_path / "predictions.tsv").write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    with pytest.raises(ValueError, match="row-aligned at row 0"):
        VinVLBackend(tmp_path / "features.tsv", tmp_path / "predictions.tsv")
    (tmp_path / "predictions.tsv").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="3 rows"):
        VinVLBackend(tmp_path / "features.tsv", tmp_path / "predictions.tsv")


def test_butd_round_trip_and_bad_row(tmp_path):
    rng = np.random.default_rng(5)
    truth, lines = {}, []
    for k, n in enumerate((2, 4, 1)):
        boxes = rng.uniform(0, 50, (n, 4)).astype(np.float32)
        feats = rng.standard_normal((n, 2048)).astype(np.float32)
        lines.append("\t".join([str(1000 + k), str(80 + k), str(70 + k), str(n), _b64(boxes), _b64(feats)]))
        truth[str(1000 + k)] = (boxes, feats)
    lines.append("\t".join(["2000", "80", "70", "3", _b64(np.zeros((2, 4))), _b64(np.zeros((2, 2048)))]))
    (tmp_path / "butd.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    backend = ButdBackend(tmp_path / "butd.tsv")
    assert backend.feature_dim == 2048
    cfg = RegionsConfig(out=tmp_path / "out", backend="butd-tsv", butd_tsv=tmp_path / "butd.tsv", max_regions=3)
    summary = run_regions(cfg)
    assert summary["images_written"] == 3 and summary["rejected"] == 1
    assert summary["counters"] == {"regions_truncated": 1}
    store = RegionStore(cfg.out)
    for image_id, (boxes, feats) in truth.items():
        r = store[int(image_id)]
        n = min(len(boxes), 3)
        assert np.array_equal(r.boxes, boxes[:n])
        assert np.array_equal(r.features, feats[:n].astype(np.float16))
        assert r.tags == [""] * n and (r.class_ids == -1).all()
    assert store["1001"].width == 81 and store["1001"].height == 71


def test_image_regions_validates_counts():
    with pytest.raises(ValueError, match="region counts"):
        ImageRegions("a", "a.jpg", 10, 10, boxes=np.zeros((2, 4)), tags=["x"], scores=np.zeros(2),
                     class_ids=np.zeros(2, dtype=np.int32), features=np.zeros((2, 8)))


# ---------------------------------------------------------------- real data

@pytest.mark.shared_data
def test_coco_instances_backend_on_coco_mini(tmp_path, shared_data):
    coco = shared_data / "coco-mini"
    data = json.loads((coco / "instances_train2017.json").read_text(encoding="utf-8"))
    chosen = sorted(data["images"], key=lambda im: im["file_name"])[:3]
    ids = {im["id"] for im in chosen}
    subset = {"images": chosen, "categories": data["categories"],
              "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    (tmp_path / "instances.json").write_text(json.dumps(subset), encoding="utf-8")
    cfg = RegionsConfig(out=tmp_path / "out", backend="coco-instances", images=coco / "images",
                        coco_instances=tmp_path / "instances.json", max_regions=8, crop_size=96)
    summary = run_regions(cfg)
    assert summary["images_written"] == 3 and summary["rejected"] == 0
    store = RegionStore(cfg.out)
    cat_names = {c["id"]: c["name"] for c in data["categories"]}
    for im in chosen:
        r = store.find(int(im["id"]))
        assert r is not None and (r.width, r.height) == (im["width"], im["height"])
        anns = [a for a in subset["annotations"] if a["image_id"] == im["id"] and not a.get("iscrowd", 0)]
        assert r.num_regions == min(len(anns), 7) + 1
        assert r.boxes[0].tolist() == [0, 0, im["width"], im["height"]]
        assert r.tags[0] in imagenet_tags()  # whole image tagged by the backbone's top-1
        assert set(r.tags[1:]) <= {cat_names[a["category_id"]] for a in anns}
        assert (r.scores[1:] == 1.0).all()
        assert r.tags == [store.classes[c] for c in r.class_ids]


def test_coco_instances_backend_synthetic(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    Image.fromarray(_scene(1, 60, 80)).save(images / "000000000007.jpg")
    Image.fromarray(_scene(2, 50, 50)).save(images / "000000000008.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "width": 80, "height": 60},
                   {"id": 8, "file_name": "000000000008.jpg", "width": 50, "height": 50},
                   {"id": 9, "file_name": "000000000009.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 5, 30, 20], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [70, 50, 40, 40], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 0, 5], "iscrowd": 0},   # degenerate
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [0, 0, 9, 9], "iscrowd": 1},   # crowd
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco), encoding="utf-8")
    cfg = RegionsConfig(out=tmp_path / "out", images=images, coco_instances=tmp_path / "inst.json",
                        **{**FAST, "backend": "coco-instances"})
    summary = run_regions(cfg)
    assert summary["images_written"] == 2 and summary["rejected_by_reason"] == {"file not found": 1}
    assert summary["images_whole_image_only"] == 1
    assert summary["counters"] == {"annotations_skipped": 2, "images_without_annotations": 1}
    store = RegionStore(cfg.out)
    assert store.classes[:2] == ["person", "dog"] and len(store.classes) == 1002
    r = store[7]
    assert r.tags[1:] == ["dog", "person"] and r.class_ids[1:].tolist() == [1, 0]
    assert np.allclose(r.boxes[1:], [[10, 5, 40, 25], [70, 50, 80, 60]])
    assert r.class_ids[0] >= 2 and r.tags[0] == imagenet_tags()[r.class_ids[0] - 2]
    assert store[8].num_regions == 1
