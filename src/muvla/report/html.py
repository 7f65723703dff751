"""One self-contained HTML page that shows what a run produced.

Why: the method's quality hinges on steps a loss curve cannot show (which sentences were retrieved for
an image, which phrase was aligned with which detected box). The page puts them side by side, with
hover links between a phrase and its matched boxes, plus the training curves, the evaluations, the
Meta-Ave table and an experiment's results when the run has them. Everything (thumbnails, plots,
CSS, JS) is inlined so the file can be mailed or attached to a CI run and opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from muvla.corpus.layout import CorpusLayout, PairMatch, SentencePhrases
from muvla.corpus.provenance import recorded_source
from muvla.corpus.region_store import ImageRegions
from muvla.report.readers import (
    Card,
    ReportError,
    RunView,
    find_summaries,
    flatten,
    format_value,
    is_run_folder,
    load_run,
    stage_status,
)
from muvla.training.plots import read_metrics, training_curves_png
from muvla.utils.config import ConfigError, setting
from muvla.utils.shards import atomic_file

THUMB_SIDE = 480  # longest side of the embedded JPEG, in pixels
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#469990", "#800000", "#808000", "#000075"]


@dataclass
class ReportConfig:
    """``muvla report RUN_DIR``."""

    run_dir: Path = setting(help="run folder (built by muvla corpus / demo / experiment)")
    out: Path | None = setting(None, help="HTML path (default: RUN_DIR/report.html)")
    max_images: int = setting(50, help="images shown")
    max_boxes: int = setting(6, help="boxes drawn per image at first, highest scores first (a toggle shows all)")


def run_report(cfg: ReportConfig) -> dict[str, str]:
    return {"report": str(write_report(cfg.run_dir, cfg.out, cfg.max_images, cfg.max_boxes))}


def describe(summary: dict[str, str]) -> list[str]:
    return [f"report: {summary['report']}"]


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def color(region: int) -> str:
    return PALETTE[region % len(PALETTE)]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------- images


def image_search_roots(run_dir: Path) -> list[Path]:
    """Folders an index ``file`` may be relative to, best first: the image folder the regions stage
    read (its build record's sources, as given or relative to the run), the cwd, the run."""
    try:
        images = recorded_source(run_dir / "regions", "images")
    except ConfigError:  # an unreadable record: the report still shows what it can
        images = None
    roots = [images, run_dir / images] if images is not None else []
    return roots + [Path("."), run_dir, run_dir / "regions"]


def resolve_image(file: str, roots: list[Path]) -> Path | None:
    """The index stores the path relative to the image folder (or absolute)."""
    p = Path(file)
    for c in ([p] if p.is_absolute() else [root / p for root in roots]):
        if c.is_file():
            return c
    return None


def thumbnail_data_uri(path: Path) -> str:
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit / float scans: stretch to 8 bit, not clip to white
            arr = np.asarray(im, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8))
        im = im.convert("RGB")
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def region_label(regions: ImageRegions, i: int) -> str:
    """Per-region tag when the image has one tag per region, else a neutral name."""
    if len(regions.tags) == regions.num_regions and i < len(regions.tags) and regions.tags[i]:
        return regions.tags[i]
    return f"region {i}"


def shown_regions(regions: ImageRegions, max_boxes: int) -> set[int]:
    """The regions drawn at first: the highest-scored ones, leaving out a whole-image box (the image
    backends' region 0) when there are others."""
    order = [int(i) for i in np.argsort(-np.asarray(regions.scores, dtype=np.float64), kind="stable")]
    area = max(regions.width * regions.height, 1)
    whole = {i for i, (x1, y1, x2, y2) in enumerate(np.asarray(regions.boxes, dtype=np.float64))
             if np.isfinite([x1, y1, x2, y2]).all() and (x2 - x1) * (y2 - y1) >= 0.95 * area}
    if len(order) > len(whole):
        order = [i for i in order if i not in whole]
    return set(order[:max_boxes])


def _place_label(x1: float, y1: float, width: float, height: float, w: float, h: float,
                 placed: list[tuple[float, float, float, float]]) -> tuple[float, float]:
    """Top-left of a label: above its box when there is room, inside the image, not over earlier labels."""
    lx = max(0.0, min(x1, w - width))
    ly = y1 - height if y1 >= height else min(y1, h - height)
    for _ in range(6):
        if not any(lx < px + pw and px < lx + width and ly < py + ph and py < ly + height for px, py, pw, ph in placed):
            break
        ly = min(ly + height, h - height)
    placed.append((lx, ly, width, height))
    return lx, ly


def render_scene(card: Card, image_roots: list[Path], max_boxes: int) -> str:
    """SVG in the image's pixel coordinates: the thumbnail stretched to W x H, boxes on top."""
    regions = card.regions
    if regions is None:
        return ('<svg class="scene" viewBox="0 0 400 300"><rect class="ph-img" width="400" height="300"/>'
                '<text x="200" y="155" text-anchor="middle" class="miss">regions not available</text></svg>')
    w, h = max(regions.width, 1), max(regions.height, 1)
    parts = [f'<svg class="scene" viewBox="0 0 {w} {h}" data-card="{card.index}">']
    path = resolve_image(regions.file, image_roots)
    uri = None
    if path is not None:
        try:
            uri = thumbnail_data_uri(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            card.notes.append(f"image file unreadable: {err}")
    else:
        card.notes.append(f"image file not found: {regions.file}")
    if uri is not None:
        parts.append(f'<image href="{uri}" x="0" y="0" width="{w}" height="{h}" preserveAspectRatio="none"/>')
    else:
        parts.append(f'<rect class="ph-img" width="{w}" height="{h}"/>'
                     f'<text x="{w / 2:.0f}" y="{h / 2:.0f}" text-anchor="middle" class="miss" '
                     f'font-size="{max(w, h) / 25:.0f}">image not available</text>')
    fs = max(w, h) / 30
    first = shown_regions(regions, max_boxes)
    placed: list[tuple[float, float, float, float]] = []
    for i, (box, score) in enumerate(zip(regions.boxes, regions.scores)):
        if not np.isfinite(box).all():
            card.notes.append(f"region {i}: non-finite box {box.tolist()} not drawn")
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((min(max(x1, 0), w), min(max(x2, 0), w)))
        y1, y2 = sorted((min(max(y1, 0), h), min(max(y2, 0), h)))
        label = f"{region_label(regions, i)} {score:.2f}"
        lw, lh = fs * 0.6 * len(label) + fs * 0.6, fs * 1.3
        lx, ly = _place_label(x1, y1, lw, lh, w, h, placed) if i in first else (x1, max(y1 - lh, 0.0))
        cls = "reg" if i in first else "reg extra"
        parts.append(
            f'<g class="{cls}" id="c{card.index}-r{i}" data-region="{i}" style="--c:{color(i)}">'
            f'<title>{esc(region_label(regions, i))} - detector score {score:.3f}</title>'
            f'<rect class="box" x="{x1:.1f}" y="{y1:.1f}" width="{x2 - x1:.1f}" height="{y2 - y1:.1f}"/>'
            f'<rect class="lblbg" x="{lx:.1f}" y="{ly:.1f}" width="{lw:.1f}" height="{lh:.1f}"/>'
            f'<text class="lbl" x="{lx + fs * 0.3:.1f}" y="{ly + lh - fs * 0.35:.1f}" font-size="{fs:.1f}">{esc(label)}</text>'
            f'</g>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- sentences


def render_sentence(card: Card, rank: int, text: str, phrases: SentencePhrases | None,
                    match: PairMatch | None) -> str:
    """Sentence text with its noun phrases wrapped in spans that name their matched regions."""
    if phrases is None:
        return esc(text)
    # phrase index -> [(region, sim)] from the per-region best phrase of matches.parquet
    links: dict[int, list[tuple[int, float]]] = {}
    n_regions = card.regions.num_regions if card.regions is not None else 0
    if match is not None:
        for r, (p, sim) in enumerate(zip(match.region_phrase, match.region_sim)):
            if p >= 0 and r < n_regions:
                links.setdefault(p, []).append((r, sim))
    out: list[str] = []
    cursor = 0
    bad = 0
    spans = [tuple(s) if len(s) == 2 else (-1, -1) for s in phrases.char_spans]
    for p, (start, end) in sorted(enumerate(spans), key=lambda t: t[1]):
        if not (cursor <= start < end <= len(text)):
            bad += 1
            continue
        out.append(esc(text[cursor:start]))
        linked = sorted(links.get(p, []), key=lambda t: -t[1])
        phrase_id = f"c{card.index}-k{rank}-p{p}"
        if linked:
            names = ", ".join(f"{region_label(card.regions, r) if card.regions else r} (sim {s:.2f})" for r, s in linked)
            regs = " ".join(str(r) for r, _ in linked)
            out.append(f'<span class="ph linked" id="{phrase_id}" data-regions="{regs}" '
                       f'data-sim="{" ".join(f"{s:.3f}" for _, s in linked)}" style="--c:{color(linked[0][0])}" '
                       f'title="matched to {esc(names)}">{esc(text[start:end])}'
                       f'<sup>{linked[0][1]:.2f}</sup></span>')
        else:
            out.append(f'<span class="ph" id="{phrase_id}" title="noun phrase, no region matched">'
                       f'{esc(text[start:end])}</span>')
        cursor = end
    out.append(esc(text[cursor:]))
    unknown = sorted(p for p in links if p >= len(spans))
    if unknown:
        card.notes.append(f"rank {rank}: regions matched to phrase index(es) {unknown} that the sentence does not have")
    if bad:
        card.notes.append(f"rank {rank}: {bad} phrase span(s) outside the sentence or overlapping were skipped")
    return "".join(out)


# ----------------------------------------------------------------------------- page


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#aab3c5}main{padding:18px 28px}section{margin-bottom:22px}
h2{font-size:17px;margin:0 0 10px}.stats{display:flex;flex-wrap:wrap;gap:10px}
.stat{background:#fff;border-radius:8px;padding:8px 14px;box-shadow:0 1px 2px #0002}
.stat b{display:block;font-size:20px}.notrun{color:#9aa1ad;font-style:italic}
table{border-collapse:collapse;background:#fff;font-size:13px}td{max-width:560px;overflow-wrap:anywhere}td,th{padding:3px 10px;border-bottom:1px solid #e6e8ec;text-align:left}
.sums{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.sums details{background:#fff;border-radius:8px;padding:6px 10px;box-shadow:0 1px 2px #0002}
.ok{color:#2a8a3e;font-weight:600}.err{color:#b3261e}
.card{display:flex;gap:20px;background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;padding:14px;margin-bottom:16px}
.pic{flex:0 0 440px;max-width:440px}.scene{width:100%;height:auto;max-height:520px;display:block;border-radius:6px}
.info{flex:1;min-width:0}.info h3{margin:0 0 6px;font-size:15px}.info h3 small{color:#7a8190;font-weight:400}
.reg .box{fill:var(--c);fill-opacity:0;stroke:var(--c);stroke-width:2.5px;vector-effect:non-scaling-stroke}
.reg .lblbg{fill:var(--c)}.reg .lbl{fill:#fff;font-family:sans-serif;font-weight:600}
.reg{cursor:pointer;transition:opacity .15s}.scene.focus .reg:not(.hot){opacity:.2}
.reg.hot .box{stroke-width:5px;fill-opacity:.22}
.ph-img{fill:#d9dce2}.miss{fill:#6b7280;font-family:sans-serif}
.chips{margin:4px 0 8px}.chip{display:inline-block;border:2px solid var(--c);border-radius:12px;padding:0 8px;margin:2px 4px 2px 0;font-size:12px;cursor:pointer}
.chip.hot{background:var(--c);color:#fff}
ol.sents{margin:0;padding-left:0;list-style:none}ol.sents li{padding:5px 0;border-top:1px solid #eef0f3}
.score{display:inline-block;min-width:44px;font:12px monospace;color:#fff;background:#4b5563;border-radius:4px;padding:0 4px;margin-right:8px;text-align:center}
.src{color:#9aa1ad;font-size:11px;margin-left:6px}
.ph{border-bottom:2px dashed #b8bec9;padding:0 1px}
.ph.linked{border-bottom:3px solid var(--c);background:color-mix(in srgb,var(--c) 12%,transparent);border-radius:3px;cursor:pointer}
.ph.linked sup{font-size:9px;color:var(--c);margin-left:1px}
.ph.hot{background:var(--c);color:#fff}.ph.hot sup{color:#fff}
.notes{color:#b3261e;font-size:12px;margin-top:6px}.curve{max-width:100%;background:#fff;border-radius:8px}
.legend{color:#6b7280;font-size:12px;margin-bottom:10px}
.scene:not(.all) .reg.extra:not(.hot){display:none}.toggle{font-size:12px;color:#4b5563;margin:4px 0}
.sources{font-size:12px;color:#4b5563}.sources li{overflow-wrap:anywhere}
.exp img{max-width:100%;background:#fff;border-radius:8px}
.overview{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
"""

JS = """
(function(){
  function regs(el){return (el.getAttribute('data-regions')||'').split(' ').filter(Boolean);}
  function clear(card){
    card.querySelectorAll('.hot').forEach(function(e){e.classList.remove('hot');});
    var s=card.querySelector('svg.scene'); if(s) s.classList.remove('focus');
  }
  function apply(card, el){
    var want = el.classList.contains('ph') ? regs(el) : [el.getAttribute('data-region')];
    if(!want.length) return;
    card.querySelectorAll('.reg,.chip').forEach(function(g){
      if(want.indexOf(g.getAttribute('data-region'))>=0) g.classList.add('hot');});
    card.querySelectorAll('.ph.linked').forEach(function(p){
      if(p===el || (!el.classList.contains('ph') && regs(p).some(function(r){return want.indexOf(r)>=0;})))
        p.classList.add('hot');});
    var s=card.querySelector('svg.scene'); if(s) s.classList.add('focus');
  }
  function target(e){return e.target.closest && e.target.closest('.ph.linked,.reg,.chip');}
  function restore(card){clear(card); var pin=card.getAttribute('data-pin');
    if(pin){var el=document.getElementById(pin); if(el) apply(card, el);}}
  document.addEventListener('mouseover', function(e){var t=target(e); if(!t) return;
    var card=t.closest('.card'); clear(card); apply(card, t);});
  document.addEventListener('mouseout', function(e){var t=target(e); if(!t) return; restore(t.closest('.card'));});
  document.addEventListener('click', function(e){var t=target(e); if(!t) return; var card=t.closest('.card');
    if(card.getAttribute('data-pin')===t.id) card.removeAttribute('data-pin'); else card.setAttribute('data-pin', t.id);
    restore(card);});
  document.addEventListener('change', function(e){var t=e.target; if(!t.classList || !t.classList.contains('allboxes')) return;
    var s=t.closest('.card').querySelector('svg.scene'); if(s) s.classList.toggle('all', t.checked);});
  // report.html#pin=<element id> opens with that phrase/box linked (shareable; used by the tests)
  var m=/pin=([^&]+)/.exec(location.hash); var el=m && document.getElementById(decodeURIComponent(m[1]));
  if(el){var card=el.closest('.card'); card.setAttribute('data-pin', el.id); restore(card); card.scrollIntoView();}
})();
"""




def _stat(label: str, value: object) -> str:
    return f'<div class="stat"><b>{esc(format_value(value))}</b>{esc(label)}</div>'


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


STAGE_FILES = (("regions", "regions/index.parquet"), ("text", "text/sentences.parquet"),
               ("retrieval", "retrieval/topk.parquet"), ("phrases", "phrases/matches.parquet"),
               ("pretrain", "pretrain/model/model.safetensors"))


def write_report(run_dir: Path, out_html: Path | None = None, max_images: int = 50, max_boxes: int = 6) -> Path:
    """Write ``<run_dir>/report.html`` (or ``out_html``) for the first ``max_images`` images of a run.

    Missing stage folders are shown as "not run"; a stage output that breaks the format contract is
    shown with its error message, so one bad stage never hides the others. A folder that is not a
    run at all (e.g. an image folder) is refused.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist")
    if not is_run_folder(run_dir):
        raise ReportError(f"{run_dir} is not a muvla run folder (no regions/, text/, retrieval/, phrases/, "
                          "pretrain/ or experiment results inside); give the folder a command wrote with --out")
    if max_images < 0:
        raise ReportError(f"max_images must be >= 0, got {max_images}")
    if max_boxes < 1:
        raise ReportError(f"max_boxes must be >= 1, got {max_boxes}")
    out_html = Path(out_html) if out_html is not None else run_dir / "report.html"
    view = load_run(run_dir, max_images)
    image_roots = image_search_roots(run_dir)
    cards = [render_card(card, view, image_roots, max_boxes) for card in view.cards]
    body = [f"<header><h1>muvla run: {esc(run_dir.resolve().name)}</h1>"
            f'<div class="sub">{esc(run_dir.resolve())}</div></header><main>',
            f'<section><div class="stats">{"".join(_stats(view))}</div></section>',
            f'<section class="overview">{"".join(_overview(view))}</section>']
    experiment = render_experiment(run_dir)
    if experiment:
        body.append(f'<section class="exp"><h2>Experiment</h2>{experiment}</section>')
    body.append(f"<section><h2>Pre-training</h2>{render_curves(run_dir)}</section>")
    evaluation = render_evaluations(run_dir)
    if evaluation:
        body.append(f"<section><h2>Evaluation</h2>{evaluation}</section>")
    body.append(f"<section><h2>Images ({len(view.cards)} of {view.total_images} shown)</h2>"
                '<div class="legend">Underlined words are noun phrases; coloured ones were matched to the box of '
                "the same colour (the small number is the region-phrase similarity). Hover or click a phrase, "
                f"box or tag to link them. The {max_boxes} highest-scored boxes are drawn; tick "
                "'all boxes' to see every region.</div>")
    if not view.cards:
        body.append('<p class="notrun">no images: regions and retrieval not run</p>')
    body += cards
    body.append("</section></main>")
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>muvla report: {esc(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + f"<script>{JS}</script></body></html>")
    with atomic_file(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_html


def _stats(view: RunView) -> list[str]:
    stats = [_stat("images with regions", view.total_images if view.regions_ran else "not run"),
             _stat("images rejected", len(view.rejected) if view.regions_ran else "-"),
             _stat("sentences", view.n_sentences if view.n_sentences is not None else "not run")]
    if view.n_pairs is not None:
        stats.append(_stat("retrieved pairs", view.n_pairs))
    if view.matches:
        stats.append(_stat("region-phrase matches shown", len(view.matches)))
    return stats


def _overview(view: RunView) -> list[str]:
    rows = []
    for stage, rel in STAGE_FILES:
        status = stage_status(view.run_dir / stage, view.run_dir / rel)
        if stage in view.errors:
            cell = f'<span class="err">error: {esc(view.errors[stage])}</span>'
        elif status.startswith("done"):
            cell = f'<span class="ok">{esc(status)}</span>'
        else:
            cell = f'<span class="notrun">{esc(status)}</span>'
        rows.append(f"<tr><th>{esc(stage)}</th><td>{cell}</td></tr>")
    blocks = [f'<div><h2>Stages</h2><table>{"".join(rows)}</table></div>']
    summaries = find_summaries(view.run_dir)
    if summaries:
        items = "".join(f"<details><summary><b>{esc(rel)}</b></summary>{_kv_table(flatten(data)[:40])}</details>"
                        for rel, data in summaries)
        blocks.append(f'<div><h2>Stage summaries</h2><div class="sums">{items}</div></div>')
    if view.regions_ran:
        reasons = Counter(str(r.get("reason", "?")) for r in view.rejected)
        examples: dict[str, str] = {}
        for r in view.rejected:
            examples.setdefault(str(r.get("reason", "?")), str(r.get("file", "?")))
        rows_html = "".join(f"<tr><td>{n}</td><td>{esc(reason)}</td><td>{esc(examples[reason])}</td></tr>"
                            for reason, n in reasons.most_common(20))
        table = (f"<table><tr><th>count</th><th>reason</th><th>example</th></tr>{rows_html}</table>"
                 if view.rejected else "")
        blocks.append(f"<div><h2>Rejected images ({len(view.rejected)})</h2>{table}</div>")
    sources = _sources(view)
    if sources:
        items = "".join(f"<li>[{n}] {esc(src)}</li>" for src, n in sources.items())
        blocks.append(f'<div><h2>Sentence sources</h2><ol class="sources" style="list-style:none;padding:0">'
                      f"{items}</ol></div>")
    return blocks


def _sources(view: RunView) -> dict[str, int]:
    """Each distinct source file of the shown sentences -> its number (shown once, then referred to)."""
    out: dict[str, int] = {}
    for _, source in view.sentences.values():
        out.setdefault(source, len(out) + 1)
    return out


def render_curves(run_dir: Path) -> str:
    """Every logged loss of the pre-training run (the same figure as training_curves.png)."""
    path = run_dir / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        return '<p class="notrun">not run</p>'
    log = read_metrics(path)
    note = f'<p class="err">{log.bad_lines} unreadable line(s) skipped in metrics.jsonl</p>' if log.bad_lines else ""
    if not log.rows:
        return '<p class="notrun">metrics.jsonl has no numeric series</p>' + note
    return f'<img class="curve" alt="training curves" src="{data_uri(training_curves_png(log.rows))}">' + note


def _metric_cells(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{esc(k)} {esc(format_value(v))}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


def render_evaluations(run_dir: Path) -> str:
    """Every evaluation under the run (wherever it was written), with its figure, and every
    Meta-Ave table (``muvla table`` output); '' when there are none."""
    rows, figures = [], []
    for rel, data in find_summaries(run_dir):
        if data.get("stage") != "evaluate":
            continue
        rows.append(f"<tr><th>{esc(rel)}</th><td>{esc(data.get('task', ''))}</td>"
                    f"<td>{esc(data.get('model', ''))}</td><td>{_metric_cells(data.get('metrics') or {})}</td></tr>")
        figure = Path(str(data.get("figure", "")))
        if figure.suffix == ".png" and figure.is_file():
            figures.append(f'<figure><img class="curve" alt="{esc(rel)}" src="{data_uri(figure.read_bytes())}">'
                           f"<figcaption>{esc(rel)}</figcaption></figure>")
    tables = []
    for md in sorted(run_dir.rglob("table.md")):
        tables.append(f"<h3>Meta-Ave table ({esc(md.parent.relative_to(run_dir).as_posix() or '.')})</h3>"
                      + markdown_table(md.read_text(encoding="utf-8")))
        png = md.with_suffix(".png")
        if png.is_file():
            tables.append(f'<img class="curve" alt="Meta-Ave" src="{data_uri(png.read_bytes())}">')
    if not rows and not tables:
        return ""
    table = (f"<table><tr><th>run</th><th>task</th><th>model</th><th>metrics</th></tr>{''.join(rows)}</table>"
             if rows else "")
    return table + "".join(figures) + "".join(tables)


def markdown_table(text: str) -> str:
    """A pipe table (as ``muvla table`` writes it) as HTML; other lines become paragraphs."""
    out, rows = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
        elif line.strip():
            out.append(f"<p>{esc(line)}</p>")
    if rows:
        head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        out.insert(0, f"<table><tr>{head}</tr>{body}</table>")
    return "".join(out)


def render_experiment(run_dir: Path) -> str:
    """An experiment's results.md and plots (``muvla experiment``), when the run is one."""
    results = run_dir / "results.md"
    if not results.is_file():
        return ""
    parts = [markdown_table(results.read_text(encoding="utf-8"))]
    for png in sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []:
        parts.append(f'<figure><img alt="{esc(png.stem)}" src="{data_uri(png.read_bytes())}">'
                     f"<figcaption>{esc(png.stem)}</figcaption></figure>")
    return "".join(parts)


def render_card(card: Card, view: RunView, image_roots: list[Path], max_boxes: int) -> str:
    scene = render_scene(card, image_roots, max_boxes)
    chips = toggle = ""
    if card.regions is not None:
        chips = "".join(
            f'<span class="chip" id="c{card.index}-t{i}" data-region="{i}" style="--c:{color(i)}">'
            f"{esc(region_label(card.regions, i))}</span>" for i in range(card.regions.num_regions))
        if card.regions.num_regions > max_boxes:
            toggle = (f'<label class="toggle"><input type="checkbox" class="allboxes"> all boxes '
                      f"({card.regions.num_regions})</label>")
    sources = _sources(view)
    items: list[str] = []
    for rank, sid, score in card.hits:
        if sid in view.sentences:
            text, source = view.sentences[sid]
            match = view.matches.get((card.image_id, rank))
            if match is not None and match.sentence_id != sid:
                card.notes.append(f"rank {rank}: matches.parquet names sentence {match.sentence_id}, topk {sid}")
                match = None
            if match is not None and card.regions is not None and len(match.region_phrase) != card.regions.num_regions:
                card.notes.append(f"rank {rank}: {len(match.region_phrase)} region matches for "
                                  f"{card.regions.num_regions} regions")
            sentence_html = render_sentence(card, rank, text, view.phrases.get(sid), match)
            src = f'<span class="src" title="{esc(source)}">[{sources[source]}] #{sid}</span>'
        elif view.n_sentences is None:
            sentence_html, src = f'<span class="notrun">sentence {sid} (text stage not run)</span>', ""
        else:
            sentence_html, src = f'<span class="err">sentence {sid} missing from sentences.parquet</span>', ""
        shown_score = "-" if score != score else f"{score:.3f}"  # NaN: a baseline pairing has no score
        items.append(f'<li><span class="score">{shown_score}</span>{sentence_html}{src}</li>')
    if items:
        sents = f'<ol class="sents">{"".join(items)}</ol>'
    elif view.retrieval_ran:
        sents = '<p class="notrun">no retrieved sentences for this image</p>'
    else:
        sents = '<p class="notrun">retrieval not run</p>'
    if view.retrieval_ran and not view.phrases_ran and items:
        sents += '<p class="notrun">phrases stage not run</p>'
    r = card.regions
    size = f"{r.width}x{r.height}, {r.num_regions} regions" if r is not None else ""
    notes = "".join(f"<div>{esc(n)}</div>" for n in card.notes)
    return (f'<div class="card" id="card-{card.index}" data-image-id="{esc(card.image_id)}">'
            f'<div class="pic">{scene}{toggle}</div><div class="info"><h3>{esc(card.image_id)} <small>{esc(size)}'
            f'</small></h3><div class="chips">{chips}</div>{sents}'
            f'{f"<div class=notes>{notes}</div>" if notes else ""}</div></div>')


__all__ = ["CorpusLayout", "ReportConfig", "ReportError", "describe", "run_report", "write_report"]
