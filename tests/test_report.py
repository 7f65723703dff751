"""HTML report: built from a tiny synthetic run folder in exactly the DESIGN.md formats."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from conftest import require_or_skip
from muvla.report import ReportError, write_report

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SENTENCES = [
    "A red square sits next to a blue circle.",
    "Tom & Jerry chase a <b>green</b> triangle across the floor.",
    "A yellow sun shines over the grey sea.",
    "An empty white page.",
]
# per image: boxes (x1, y1, x2, y2), tags, scores
IMAGES = {
    "img_a": ([(10, 10, 70, 70), (90, 20, 150, 80)], ["square", "circle"], [0.91, 0.77]),
    "img_b": ([(20, 30, 100, 90), (5, 5, 40, 40), (110, 50, 150, 95)], ["triangle", "floor", "cat"], [0.88, 0.5, 0.42]),
    "img_c": ([(40, 10, 120, 60), (0, 60, 160, 100)], ["sun", "sea"], [0.95, 0.8]),
}
R, D = 3, 8  # max regions, feature dim


def phrase_spans(text: str, phrases: list[str]) -> list[list[int]]:
    spans = []
    for p in phrases:
        start = text.index(p)
        spans.append([start, start + len(p)])
    return spans


PHRASES = {
    0: ["A red square", "a blue circle"],
    1: ["Tom & Jerry", "a <b>green</b> triangle", "the floor"],
    2: ["A yellow sun", "the grey sea"],
    3: ["An empty white page"],
}


def make_run(root: Path, with_metrics: bool = True) -> Path:
    """A run folder with every stage output, 3 images of 160x100 pixels."""
    run = root / "run"
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    # regions, one part
    part = run / "regions" / "parts" / "part-00000"
    part.mkdir(parents=True)
    n = len(IMAGES)
    boxes = np.zeros((n, R, 4), np.float32)
    scores = np.zeros((n, R), np.float32)
    class_ids = np.full((n, R), -1, np.int32)
    rows = []
    for i, (image_id, (bxs, tags, scs)) in enumerate(IMAGES.items()):
        im = Image.new("RGB", (160, 100), (235, 235, 220))
        draw = ImageDraw.Draw(im)
        for j, b in enumerate(bxs):
            draw.rectangle(b, fill=[(200, 40, 40), (40, 80, 200), (40, 160, 60)][j % 3])
        path = img_dir / f"{image_id}.jpg"
        im.save(path)
        boxes[i, : len(bxs)] = bxs
        scores[i, : len(bxs)] = scs
        class_ids[i, : len(bxs)] = range(len(bxs))
        rows.append({"image_id": image_id, "file": str(path), "width": 160, "height": 100, "row": i,
                     "num_regions": len(bxs), "tags": tags})
    np.save(part / "features.npy", np.random.default_rng(0).normal(size=(n, R, D)).astype(np.float16))
    np.save(part / "boxes.npy", boxes)
    np.save(part / "scores.npy", scores)
    np.save(part / "class_ids.npy", class_ids)
    pq.write_table(pa.Table.from_pylist(rows), part / "index.parquet")
    (part / "rejected.jsonl").write_text(json.dumps({"file": "broken.jpg", "reason": "cannot identify image file"}) + "\n")
    merged = pa.Table.from_pylist([dict(r, part="part-00000") for r in rows])
    pq.write_table(merged, run / "regions" / "index.parquet")
    shutil.copy(part / "rejected.jsonl", run / "regions" / "rejected.jsonl")
    (run / "regions" / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    (run / "regions" / "summary.json").write_text(json.dumps({"images": 3, "rejected": 1, "regions_per_image": 2.33}))
    # text
    (run / "text").mkdir()
    pq.write_table(pa.table({"sentence_id": pa.array(range(len(SENTENCES)), pa.int64()), "text": SENTENCES,
                             "source": ["demo"] * len(SENTENCES)}), run / "text" / "sentences.parquet")
    (run / "text" / "summary.json").write_text(json.dumps({"demo": {"lines": 4, "kept": 4, "duplicates": 0}}))
    # retrieval: 2 sentences per image
    (run / "retrieval").mkdir()
    topk = {"img_a": [0, 3], "img_b": [1, 0], "img_c": [2, 3]}
    trows = [{"image_id": i, "rank": r, "sentence_id": s, "score": 0.8 - 0.1 * r}
             for i, sids in topk.items() for r, s in enumerate(sids)]
    pq.write_table(pa.Table.from_pylist(trows), run / "retrieval" / "topk.parquet")
    # phrases
    (run / "phrases").mkdir()
    prow = [{"sentence_id": s, "phrases": p, "char_spans": phrase_spans(SENTENCES[s], p),
             "token_spans": [[k, k + 2] for k in range(0, 2 * len(p), 2)]} for s, p in PHRASES.items()]
    pq.write_table(pa.Table.from_pylist(prow), run / "phrases" / "sentence_phrases.parquet")
    # region -> best phrase index of the retrieved sentence
    best = {("img_a", 0): [0, 1], ("img_a", 1): [0, 0], ("img_b", 0): [1, 2, -1], ("img_b", 1): [0, 1, 1],
            ("img_c", 0): [0, 1], ("img_c", 1): [-1, 0]}
    mrows = [{"image_id": i, "rank": r, "sentence_id": topk[i][r], "region_phrase": p,
              "region_sim": [0.9 - 0.2 * k for k in range(len(p))]} for (i, r), p in best.items()]
    pq.write_table(pa.Table.from_pylist(mrows), run / "phrases" / "matches.parquet")
    if with_metrics:
        (run / "pretrain").mkdir()
        lines = [json.dumps({"step": s, "loss": 3.0 / (1 + s), "lr": 1e-4, "acc_mlm": s / 20}) for s in range(20)]
        lines.insert(5, "{not json")
        (run / "pretrain" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def card_html(page: str, image_id: str) -> str:
    start = page.index(f'data-image-id="{image_id}"')
    end = page.find('<div class="card"', start)
    return page[start: end if end > 0 else len(page)]


def test_report_is_self_contained_and_links_phrases_to_regions(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    # one scene per image, each with its embedded thumbnail and one box group per region
    assert page.count('<svg class="scene"') == 3
    assert page.count('href="data:image/jpeg;base64,') == 3
    for image_id, (bxs, _, _) in IMAGES.items():
        assert card_html(page, image_id).count('<g class="reg"') == len(bxs)
    # sentences escaped, never raw
    assert "Tom &amp; Jerry</span> chase " in page
    assert "<b>green</b>" not in page and "&lt;b&gt;green&lt;/b&gt; triangle" in page
    # img_b rank 0 is sentence 1: region 0 -> phrase 1 ("a <b>green</b> triangle"), region 1 -> phrase 2
    b = card_html(page, "img_b")
    m = re.search(r'<span class="ph linked" id="c1-k0-p1" data-regions="0" data-sim="0.900"[^>]*>'
                  r"a &lt;b&gt;green&lt;/b&gt; triangle<sup>0.90</sup></span>", b)
    assert m, b
    assert re.search(r'id="c1-k0-p2" data-regions="1"[^>]*>the floor<sup>0.70</sup>', b)
    # phrase 0 of that sentence matched nothing: plain noun-phrase markup, no region link
    assert '<span class="ph" id="c1-k0-p0" title="noun phrase, no region matched">Tom &amp; Jerry</span>' in b
    # img_b rank 1 is sentence 0: regions 1 and 2 both -> phrase 1, best similarity first
    assert re.search(r'id="c1-k1-p1" data-regions="1 2" data-sim="0.700 0.500"', b)
    assert '<g class="reg" id="c1-r2" data-region="2"' in b
    # detector tags and scores drawn as labels, similarity and counts in the page
    assert ">triangle 0.88</text>" in b
    assert "cannot identify image file" in page and "Rejected images (1)" in page
    assert 'src="data:image/png;base64,' in page  # training curve
    assert "1 unreadable line(s) skipped in metrics.jsonl" in page
    assert "regions_per_image" in page and "demo.kept" in page  # stage summaries table


def test_report_missing_stages_say_not_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, with_metrics=False)
    for stage in ("text", "retrieval", "phrases"):
        shutil.rmtree(run / stage)
    page = write_report(run, tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert page.count('<span class="notrun">not run</span>') == 4  # text, retrieval, phrases, pretrain
    assert "retrieval not run" in page and '<svg class="scene"' in page
    # a run with only its text stage still gives a page
    text_only = tmp_path / "text_only"
    shutil.copytree(make_run(tmp_path / "other", with_metrics=False) / "text", text_only / "text")
    page = write_report(text_only).read_text(encoding="utf-8")
    assert page.count('<span class="notrun">not run</span>') == 4  # regions, retrieval, phrases, pretrain
    assert "no images: regions and retrieval not run" in page


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    with pytest.raises(ReportError, match="not a muvla run folder"):
        write_report(images)
    assert not (images / "report.html").exists()


def test_report_phrases_missing_sentence_stage_present(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    shutil.rmtree(run / "phrases")
    page = write_report(run).read_text(encoding="utf-8")
    assert 'class="ph' not in page
    assert "Tom &amp; Jerry chase a" in page and "phrases stage not run" in page


def test_report_bad_inputs_are_reported_not_crashing(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    # image file gone -> placeholder; topk row pointing at an unknown sentence; bad phrase span
    (tmp_path / "images" / "img_c.jpg").unlink()
    t = pq.read_table(run / "retrieval" / "topk.parquet").to_pylist()
    t.append({"image_id": "img_a", "rank": 2, "sentence_id": 99, "score": 0.1})
    pq.write_table(pa.Table.from_pylist(t), run / "retrieval" / "topk.parquet")
    p = pq.read_table(run / "phrases" / "sentence_phrases.parquet").to_pylist()
    p[2]["char_spans"][1] = [30, 500]
    pq.write_table(pa.Table.from_pylist(p), run / "phrases" / "sentence_phrases.parquet")
    # matches with a missing column: the phrases stage shows its error, the rest still renders
    pq.write_table(pa.table({"image_id": ["img_a"], "rank": [0]}), run / "phrases" / "matches.parquet")
    boxes_path = run / "regions" / "parts" / "part-00000" / "boxes.npy"
    boxes = np.load(boxes_path)
    boxes[0, 1, 0] = np.nan
    np.save(boxes_path, boxes)
    page = write_report(run).read_text(encoding="utf-8")
    a = card_html(page, "img_a")
    assert a.count('<g class="reg"') == 1 and "region 1: non-finite box [nan, 20.0, 150.0, 80.0] not drawn" in a
    c = card_html(page, "img_c")
    assert "image not available" in c and "image file not found" in c
    assert "sentence 99 missing from sentences.parquet" in page
    assert "rank 0: 1 phrase span(s) outside the sentence or overlapping were skipped" in c
    assert "missing column(s) [&#x27;sentence_id&#x27;, &#x27;region_phrase&#x27;, &#x27;region_sim&#x27;]" in page
    assert 'class="ph linked"' not in page and '<span class="ph" id="c0-k0-p0"' in page


def test_report_max_images_and_bad_arguments(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    page = write_report(run, max_images=1).read_text(encoding="utf-8")
    assert page.count('<svg class="scene"') == 1 and "Images (1 of 3 shown)" in page
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(ReportError, match="max_images"):
        write_report(run, max_images=-1)


def test_report_broken_region_row_is_a_card_note(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    idx = pq.read_table(run / "regions" / "index.parquet").to_pylist()
    idx[1]["row"] = 7
    pq.write_table(pa.Table.from_pylist(idx), run / "regions" / "index.parquet")
    page = write_report(run).read_text(encoding="utf-8")
    b = card_html(page, "img_b")
    assert "regions unreadable" in b and "row 7 outside part part-00000" in b
    assert '<g class="reg"' not in b and card_html(page, "img_a").count('<g class="reg"') == 2


def screenshot(report: Path, tmp_path: Path, name: str, fragment: str = "") -> Image.Image:
    """Headless Chromium screenshot of the report (no chromium: skips, or fails under CI=true)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require_or_skip(chromium, "chromium", "apt-get install chromium")
    assert chromium is not None
    shot = tmp_path / f"{name}.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / ('profile-' + name)}", f"--screenshot={shot}",
           "--window-size=1280,2000", report.resolve().as_uri() + fragment]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(shot) as im:
        return im.convert("RGB")


def colour_count(im: Image.Image, rgb: tuple[int, int, int]) -> int:
    return int((np.asarray(im) == np.array(rgb, np.uint8)).all(axis=-1).sum())


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    report = write_report(make_run(tmp_path))
    rgb = screenshot(report, tmp_path, "plain")
    assert rgb.size == (1280, 2000)
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is blank"
    # the boxes' palette colours must actually be painted (SVG overlay rendered)
    assert colour_count(rgb, (230, 25, 75)) > 200 and colour_count(rgb, (60, 180, 75)) > 200


def test_report_phrase_link_highlights_in_chromium(tmp_path: Path) -> None:
    """#pin=<phrase id> runs the same JS as a click: the phrase fills with its region colour, the
    other boxes of that image fade."""
    report = write_report(make_run(tmp_path))
    plain = screenshot(report, tmp_path, "plain")
    pinned = screenshot(report, tmp_path, "pinned", "#pin=c1-k0-p1")  # img_b: "a <b>green</b> triangle" -> region 0
    red, blue = (230, 25, 75), (67, 99, 216)  # palette of region 0 and region 2
    assert colour_count(pinned, red) > colour_count(plain, red) + 300  # filled phrase background
    assert colour_count(pinned, blue) < colour_count(plain, blue) - 100  # "cat" box and label dimmed


def make_coco_run(root: Path, n_images: int = 3) -> Path:
    """A run from real coco-mini photos: ground-truth boxes stand in for detections, the images' own
    captions for retrieved sentences, category names found in a caption for its phrases."""
    coco = SHARED_DATA / "coco-mini"
    inst = json.loads((coco / "instances_train2017.json").read_text())
    caps = json.loads((coco / "captions_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    images = sorted(inst["images"], key=lambda im: im["id"])[:n_images]
    run = root / "coco-run"
    part = run / "regions" / "parts" / "part-00000"
    part.mkdir(parents=True)
    r_max = 6
    boxes = np.zeros((len(images), r_max, 4), np.float32)
    scores = np.zeros((len(images), r_max), np.float32)
    rows, sentences, topk, phrases, matches = [], [], [], [], []
    for i, im in enumerate(images):
        anns = sorted((a for a in inst["annotations"] if a["image_id"] == im["id"]), key=lambda a: -a["area"])[:r_max]
        tags = [names[a["category_id"]] for a in anns]
        for j, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            boxes[i, j] = (x, y, x + w, y + h)
            scores[i, j] = 1.0
        rows.append({"image_id": Path(im["file_name"]).stem, "file": str(coco / "images" / im["file_name"]),
                     "width": im["width"], "height": im["height"], "row": i, "num_regions": len(anns),
                     "tags": tags, "part": "part-00000"})
        for rank, cap in enumerate([c["caption"].strip() for c in caps["annotations"] if c["image_id"] == im["id"]][:3]):
            sid = len(sentences)
            sentences.append(cap)
            topk.append({"image_id": rows[-1]["image_id"], "rank": rank, "sentence_id": sid, "score": 0.9 - 0.1 * rank})
            found = sorted({(cap.lower().index(t), t) for t in tags if t in cap.lower()})
            spans = [[s, s + len(t)] for s, t in found]
            phrases.append({"sentence_id": sid, "phrases": [cap[s:e] for s, e in spans], "char_spans": spans,
                            "token_spans": [[k, k + 1] for k in range(len(spans))]})
            words = [t for _, t in found]
            matches.append({"image_id": rows[-1]["image_id"], "rank": rank, "sentence_id": sid,
                            "region_phrase": [words.index(t) if t in words else -1 for t in tags],
                            "region_sim": [0.8 if t in words else 0.0 for t in tags]})
    np.save(part / "boxes.npy", boxes)
    np.save(part / "scores.npy", scores)
    np.save(part / "features.npy", np.zeros((len(images), r_max, 4), np.float16))
    np.save(part / "class_ids.npy", np.full((len(images), r_max), -1, np.int32))
    pq.write_table(pa.Table.from_pylist(rows), run / "regions" / "index.parquet")
    (run / "text").mkdir()
    pq.write_table(pa.table({"sentence_id": pa.array(range(len(sentences)), pa.int64()), "text": sentences,
                             "source": ["coco"] * len(sentences)}), run / "text" / "sentences.parquet")
    (run / "retrieval").mkdir()
    pq.write_table(pa.Table.from_pylist(topk), run / "retrieval" / "topk.parquet")
    (run / "phrases").mkdir()
    pq.write_table(pa.Table.from_pylist(phrases), run / "phrases" / "sentence_phrases.parquet")
    pq.write_table(pa.Table.from_pylist(matches), run / "phrases" / "matches.parquet")
    return run


@pytest.mark.shared_data
def test_report_on_real_coco_photos(tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    run = make_coco_run(tmp_path)
    page = write_report(run).read_text(encoding="utf-8")
    uris = re.findall(r'href="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 3
    for uri in uris:  # real photos are shrunk, not embedded at full size
        with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
            assert max(im.size) == 480
    idx = pq.read_table(run / "regions" / "index.parquet").to_pylist()
    for row in idx:
        card = card_html(page, row["image_id"])
        assert f'viewBox="0 0 {row["width"]} {row["height"]}"' in card
        assert card.count('<g class="reg"') == row["num_regions"]
    assert 'class="ph linked"' in page


def test_report_unknown_phrase_index_and_16bit_image(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    m = pq.read_table(run / "phrases" / "matches.parquet").to_pylist()
    m[0]["region_phrase"] = [0, 5]  # img_a rank 0: sentence 0 has only 2 phrases
    pq.write_table(pa.Table.from_pylist(m), run / "phrases" / "matches.parquet")
    # img_c as a 16-bit greyscale PNG (microscopy-style): must not come out as a flat white thumbnail
    grad = (np.linspace(0, 4000, 160)[None, :] * np.ones((100, 1))).astype(np.uint16)
    png = tmp_path / "images" / "img_c16.png"
    Image.fromarray(grad).save(png)
    idx = pq.read_table(run / "regions" / "index.parquet").to_pylist()
    idx[2]["file"] = str(png)
    pq.write_table(pa.Table.from_pylist(idx), run / "regions" / "index.parquet")
    page = write_report(run).read_text(encoding="utf-8")
    assert "rank 0: regions matched to phrase index(es) [5] that the sentence does not have" in card_html(page, "img_a")
    uri = re.search(r'href="data:image/jpeg;base64,([^"]+)"', card_html(page, "img_c")).group(1)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32)
    assert grey[:, :10].mean() < 40 and grey[:, -10:].mean() > 215


def test_report_module_cli_and_tmp_summaries_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from muvla.report.__main__ import main

    run = make_run(tmp_path)
    tmp_unit = run / "retrieval" / ".part-00001.tmp-123"  # a killed run's half-written unit
    tmp_unit.mkdir()
    (tmp_unit / "summary.json").write_text(json.dumps({"half_written_marker": 1}))
    assert main([str(run), "--out", str(tmp_path / "x.html"), "--max-images", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.html")
    page = (tmp_path / "x.html").read_text(encoding="utf-8")
    assert "Images (2 of 3 shown)" in page and "half_written_marker" not in page
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_shows_every_loss_counts_as_integers_tables_and_evaluations_anywhere(tmp_path: Path) -> None:
    from muvla.training.plots import curve_panels

    rows = [{"step": s, "loss": 3.0, "loss_rt": 1.0, "loss_rt_mlm": 0.5, "loss_rt_mrc": 0.3, "loss_rn": 1.0,
             "loss_rn_pmrtc": 0.4, "loss_is": 1.0, "loss_is_itm": 0.7, "itm_acc": 0.5, "lr": 1e-4} for s in (1, 2)]
    panels = dict(curve_panels(rows))
    assert panels["loss_rt"] == ["loss_rt", "loss_rt_mlm", "loss_rt_mrc"] and "loss_rn_pmrtc" in panels["loss_rn"]
    assert {"loss", "loss_is", "itm_acc", "lr"} <= set(panels)

    run = make_run(tmp_path)
    elsewhere = run / "runs" / "zs"  # an evaluation written outside <run>/evaluation
    elsewhere.mkdir(parents=True)
    (elsewhere / "summary.json").write_text(json.dumps(
        {"stage": "evaluate", "task": "retrieval", "model": "m", "metrics": {"n_images": 13.0, "mean_recall": 0.25}}))
    (run / "evaluation").mkdir()
    (run / "evaluation" / "table.md").write_text("| model | Retrieval mR | Meta-Ave |\n|---|---:|---:|\n"
                                                 "| muvla | 25.0 | 25.0 |\n")
    page = write_report(run).read_text(encoding="utf-8")
    assert "runs/zs" in page and "n_images 13," in page and "13.000" not in page
    assert "Meta-Ave table" in page and "<td>muvla</td><td>25.0</td>" in page
    assert page.count("[1] ") >= 1 and page.count(">demo<") <= 1  # the source is named once, then referred to


def test_report_draws_the_top_boxes_and_a_toggle_for_all(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    page = write_report(run, max_boxes=1).read_text(encoding="utf-8")
    b = card_html(page, "img_b")  # 3 boxes, scores 0.88, 0.5, 0.42
    assert b.count('<g class="reg"') == 1 and b.count('<g class="reg extra"') == 2
    assert 'class="allboxes"' in b and "all boxes (3)" in b
    assert '<g class="reg" id="c1-r0"' in b  # the highest-scored box is the one drawn
