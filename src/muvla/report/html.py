"""One self-contained HTML page that shows what a corpus run produced.

Why: the method's quality hinges on steps a loss curve cannot show (which sentences were retrieved for
an image, which phrase was aligned with which detected box). The page puts them side by side, with
hover links between a phrase and its matched boxes. Everything (thumbnails, plot, CSS, JS) is inlined
so the file can be mailed or attached to a CI run and opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from muvla.report.readers import (
    BoxReader,
    ImageEntry,
    MatchRow,
    Metrics,
    RegionBoxes,
    ReportError,
    SentencePhrases,
    count_rows,
    find_summaries,
    flatten,
    read_jsonl,
    read_matches,
    read_metrics,
    read_region_index,
    read_sentence_phrases,
    read_sentences,
    read_topk,
    read_topk_image_ids,
)
from muvla.utils.shards import atomic_file

THUMB_SIDE = 480  # longest side of the embedded JPEG, in pixels
DRAWN_BOXES = 10  # boxes always drawn per image (highest scores); the others appear when linked or hovered
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#469990", "#800000", "#808000", "#000075"]
STAGES = [("regions", "regions/index.parquet"), ("text", "text/sentences.parquet"),
          ("retrieval", "retrieval/topk.parquet"), ("phrases", "phrases/matches.parquet"),
          ("pretrain", "pretrain/metrics.jsonl")]


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def color(region: int) -> str:
    return PALETTE[region % len(PALETTE)]


@dataclass
class Card:
    """Everything shown for one image."""

    index: int
    image_id: str
    entry: ImageEntry | None
    regions: RegionBoxes | None = None
    notes: list[str] = field(default_factory=list)
    hits: list[tuple[int, int, float]] = field(default_factory=list)  # rank, sentence_id, score


# ----------------------------------------------------------------------------- images


def image_search_roots(run_dir: Path) -> list[Path]:
    """Folders an index ``file`` may be relative to, best first: the image folder the regions stage
    read (recorded in regions/config.yaml, as given or relative to the run), the cwd, the run."""
    import yaml

    roots: list[Path] = []
    try:
        record = yaml.safe_load((run_dir / "regions" / "config.yaml").read_text(encoding="utf-8")) or {}
        images = (record.get("config") or {}).get("images")
    except (OSError, yaml.YAMLError):
        images = None
    if images:
        roots += [Path(images), run_dir / images]
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


def region_label(entry: ImageEntry, i: int) -> str:
    """Per-region tag when the index has one tag per region, else a neutral name."""
    if len(entry.tags) == entry.num_regions and i < len(entry.tags):
        return entry.tags[i]
    return f"region {i}"


def render_scene(card: Card, image_roots: list[Path]) -> str:
    """SVG in the image's pixel coordinates: the thumbnail stretched to W x H, boxes on top."""
    entry = card.entry
    if entry is None:
        return ('<svg class="scene" viewBox="0 0 400 300"><rect class="ph-img" width="400" height="300"/>'
                '<text x="200" y="155" text-anchor="middle" class="miss">regions stage not run</text></svg>')
    w, h = max(entry.width, 1), max(entry.height, 1)
    parts = [f'<svg class="scene" viewBox="0 0 {w} {h}" data-card="{card.index}">']
    path = resolve_image(entry.file, image_roots)
    uri = None
    if path is not None:
        try:
            uri = thumbnail_data_uri(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            card.notes.append(f"image file unreadable: {err}")
    else:
        card.notes.append(f"image file not found: {entry.file}")
    if uri is not None:
        parts.append(f'<image href="{uri}" x="0" y="0" width="{w}" height="{h}" preserveAspectRatio="none"/>')
    else:
        parts.append(f'<rect class="ph-img" width="{w}" height="{h}"/>'
                     f'<text x="{w / 2:.0f}" y="{h / 2:.0f}" text-anchor="middle" class="miss" '
                     f'font-size="{max(w, h) / 25:.0f}">image not available</text>')
    if card.regions is not None:
        fs = max(w, h) / 32
        # a real detector stores up to ~36 boxes: draw the best ones, keep the rest for the phrase links
        order = np.argsort(-np.asarray(card.regions.scores, dtype=np.float64), kind="stable")
        shown = set(order[:DRAWN_BOXES].tolist())
        for i, (box, score) in enumerate(zip(card.regions.boxes, card.regions.scores)):
            if not np.isfinite(box).all():
                card.notes.append(f"region {i}: non-finite box {box.tolist()} not drawn")
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            x1, x2 = sorted((min(max(x1, 0), w), min(max(x2, 0), w)))
            y1, y2 = sorted((min(max(y1, 0), h), min(max(y2, 0), h)))
            label = f"{region_label(entry, i)} {score:.2f}"
            lw = fs * 0.62 * len(label) + fs * 0.6
            ly = y1 if y1 >= fs * 1.3 else min(y1 + fs * 1.3, h)
            parts.append(
                f'<g class="reg{"" if i in shown else " minor"}" id="c{card.index}-r{i}" data-region="{i}" '
                f'style="--c:{color(i)}">'
                f'<title>{esc(region_label(entry, i))} - detector score {score:.3f}</title>'
                f'<rect class="box" x="{x1:.1f}" y="{y1:.1f}" width="{x2 - x1:.1f}" height="{y2 - y1:.1f}"/>'
                f'<rect class="lblbg" x="{x1:.1f}" y="{ly - fs * 1.3:.1f}" width="{lw:.1f}" height="{fs * 1.3:.1f}"/>'
                f'<text class="lbl" x="{x1 + fs * 0.3:.1f}" y="{ly - fs * 0.35:.1f}" font-size="{fs:.1f}">{esc(label)}</text>'
                f'</g>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- sentences


def render_sentence(card: Card, rank: int, text: str, phrases: SentencePhrases | None,
                    match: MatchRow | None) -> str:
    """Sentence text with its noun phrases wrapped in spans that name their matched regions."""
    if phrases is None:
        return esc(text)
    # phrase index -> [(region, sim)] from the per-region best phrase of matches.parquet
    links: dict[int, list[tuple[int, float]]] = {}
    n_regions = len(card.regions.boxes) if card.regions is not None else 0
    if match is not None:
        for r, (p, sim) in enumerate(zip(match.region_phrase, match.region_sim)):
            if p >= 0 and r < n_regions:
                links.setdefault(p, []).append((r, sim))
    out: list[str] = []
    cursor = 0
    bad = 0
    for p, (start, end) in sorted(enumerate(phrases.char_spans), key=lambda t: t[1]):
        if not (cursor <= start < end <= len(text)):
            bad += 1
            continue
        out.append(esc(text[cursor:start]))
        linked = sorted(links.get(p, []), key=lambda t: -t[1])
        phrase_id = f"c{card.index}-k{rank}-p{p}"
        if linked:
            names = ", ".join(f"{region_label(card.entry, r) if card.entry else r} (sim {s:.2f})" for r, s in linked)
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
    unknown = sorted(p for p in links if p >= len(phrases.char_spans))
    if unknown:
        card.notes.append(f"rank {rank}: regions matched to phrase index(es) {unknown} that the sentence does not have")
    if bad:
        card.notes.append(f"rank {rank}: {bad} phrase span(s) outside the sentence or overlapping were skipped")
    return "".join(out)


# ----------------------------------------------------------------------------- plot


def metrics_png(metrics: Metrics) -> str | None:
    """Training curves (one panel per numeric key, loss first) as a PNG data URI."""
    if not metrics.series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted(metrics.series, key=lambda k: (k != "loss", k))[:9]
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig = Figure(figsize=(4.2 * ncols, 2.6 * nrows), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        xs, ys = zip(*metrics.series[key])
        ax.plot(xs, ys, color="#4363d8", lw=1.4, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
.reg.hot .box{stroke-width:5px;fill-opacity:.22}.reg.minor{display:none}.reg.minor.hot{display:inline}
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
  // report.html#pin=<element id> opens with that phrase/box linked (shareable; used by the tests)
  var m=/pin=([^&]+)/.exec(location.hash); var el=m && document.getElementById(decodeURIComponent(m[1]));
  if(el){var card=el.closest('.card'); card.setAttribute('data-pin', el.id); restore(card); card.scrollIntoView();}
})();
"""


def _stat(label: str, value: object) -> str:
    return f'<div class="stat"><b>{esc(value)}</b>{esc(label)}</div>'


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(run_dir: Path, out_html: Path | None = None, max_images: int = 50) -> Path:
    """Write ``<run_dir>/report.html`` (or ``out_html``) for the first ``max_images`` images of a run.

    Missing stage folders are shown as "not run"; a stage output that breaks the DESIGN.md contract
    is shown with its error message, so one bad stage never hides the others.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist")
    if max_images < 0:
        raise ReportError(f"max_images must be >= 0, got {max_images}")
    out_html = Path(out_html) if out_html is not None else run_dir / "report.html"

    errors: dict[str, str] = {}  # stage -> why its output could not be used
    stats: list[str] = []

    # --- regions
    entries: list[ImageEntry] | None = None
    rejected: list[dict] = []
    regions_dir = run_dir / "regions"
    if (regions_dir / "index.parquet").is_file():
        try:
            entries = read_region_index(regions_dir)
        except ReportError as err:
            errors["regions"] = str(err)
        if (regions_dir / "rejected.jsonl").is_file():
            rejected, bad = read_jsonl(regions_dir / "rejected.jsonl")
            if bad:
                rejected.extend({"file": "?", "reason": "unparsable line in rejected.jsonl"} for _ in range(bad))
    stats.append(_stat("images with regions", len(entries)) if entries is not None
                 else _stat("images with regions", "not run"))
    stats.append(_stat("images rejected", len(rejected) if entries is not None else "-"))

    # --- text
    sentences_path = run_dir / "text" / "sentences.parquet"
    n_sentences: int | None = None
    if sentences_path.is_file():
        try:
            n_sentences = count_rows(sentences_path)
        except ReportError as err:
            errors["text"] = str(err)
    stats.append(_stat("sentences", n_sentences if n_sentences is not None else "not run"))

    # --- choose the shown images: region index order, else retrieval order
    topk_path = run_dir / "retrieval" / "topk.parquet"
    if entries is not None:
        shown = [(e.image_id, e) for e in entries[:max_images]]
        total_images = len(entries)
    else:
        ids: list[str] = []
        if topk_path.is_file():
            try:
                ids = read_topk_image_ids(topk_path)
            except ReportError as err:
                errors["retrieval"] = str(err)
        shown = [(i, None) for i in ids[:max_images]]
        total_images = len(ids)
    shown_ids = [i for i, _ in shown]
    cards = [Card(index=k, image_id=i, entry=e) for k, (i, e) in enumerate(shown)]

    boxes = BoxReader(regions_dir)
    for card in cards:
        if card.entry is not None:
            try:
                card.regions = boxes.read(card.entry)
            except ReportError as err:
                card.notes.append(f"regions unreadable: {err}")

    # --- retrieval / text / phrases for the shown images only
    topk: dict[str, list[tuple[int, int, float]]] = {}
    if topk_path.is_file() and "retrieval" not in errors:
        try:
            topk = read_topk(topk_path, shown_ids)
            stats.append(_stat("retrieved pairs", count_rows(topk_path)))
        except ReportError as err:
            errors["retrieval"] = str(err)
    for card in cards:
        card.hits = topk.get(card.image_id, [])
    wanted_sids = sorted({sid for c in cards for _, sid, _ in c.hits})

    sentences: dict[int, tuple[str, str]] = {}
    if n_sentences is not None:
        try:
            sentences = read_sentences(sentences_path, wanted_sids)
        except ReportError as err:
            errors["text"] = str(err)

    phrases: dict[int, SentencePhrases] = {}
    matches: dict[tuple[str, int], MatchRow] = {}
    phrases_dir = run_dir / "phrases"
    if (phrases_dir / "sentence_phrases.parquet").is_file():
        try:
            phrases = read_sentence_phrases(phrases_dir / "sentence_phrases.parquet", wanted_sids)
        except ReportError as err:
            errors["phrases"] = str(err)
    if (phrases_dir / "matches.parquet").is_file():
        try:
            matches = read_matches(phrases_dir / "matches.parquet", shown_ids)
            stats.append(_stat("region-phrase matches", count_rows(phrases_dir / "matches.parquet")))
        except ReportError as err:
            errors["phrases"] = str(err)

    # --- pretraining curve
    metrics_path = run_dir / "pretrain" / "metrics.jsonl"
    curve_html = '<p class="notrun">not run</p>'
    if metrics_path.is_file():
        metrics = read_metrics(metrics_path)
        uri = metrics_png(metrics)
        note = f'<p class="err">{metrics.bad_lines} unreadable line(s) skipped in metrics.jsonl</p>' if metrics.bad_lines else ""
        curve_html = (f'<img class="curve" alt="training curves" src="{uri}">' if uri
                      else '<p class="notrun">metrics.jsonl has no numeric series</p>') + note

    evaluation_html = render_evaluations(run_dir)
    image_roots = image_search_roots(run_dir)

    # --- assemble
    body: list[str] = []
    body.append(f"<header><h1>muvla run: {esc(run_dir.resolve().name)}</h1>"
                f'<div class="sub">{esc(run_dir.resolve())}</div></header><main>')
    body.append(f'<section><div class="stats">{"".join(stats)}</div></section>')

    stage_rows = []
    for stage, rel in STAGES:
        if stage in errors:
            status = f'<span class="err">error: {esc(errors[stage])}</span>'
        elif (run_dir / rel).is_file():
            status = '<span class="ok">done</span>'
        elif (run_dir / stage).is_dir():
            status = f'<span class="notrun">incomplete ({esc(rel)} missing)</span>'
        else:
            status = '<span class="notrun">not run</span>'
        stage_rows.append(f"<tr><th>{esc(stage)}</th><td>{status}</td></tr>")
    overview = [f'<div><h2>Stages</h2><table>{"".join(stage_rows)}</table></div>']

    summaries = find_summaries(run_dir)
    if summaries:
        blocks = "".join(f"<details><summary><b>{esc(rel)}</b></summary>{_kv_table(flatten(data)[:40])}</details>"
                         for rel, data in summaries)
        overview.append(f'<div><h2>Stage summaries</h2><div class="sums">{blocks}</div></div>')

    if entries is not None:
        if rejected:
            reasons = Counter(str(r.get("reason", "?")) for r in rejected)
            examples = {}
            for r in rejected:
                examples.setdefault(str(r.get("reason", "?")), str(r.get("file", "?")))
            rows = "".join(f"<tr><td>{n}</td><td>{esc(reason)}</td><td>{esc(examples[reason])}</td></tr>"
                           for reason, n in reasons.most_common(20))
            overview.append(f"<div><h2>Rejected images ({len(rejected)})</h2><table><tr><th>count</th>"
                            f"<th>reason</th><th>example</th></tr>{rows}</table></div>")
        else:
            overview.append("<div><h2>Rejected images (0)</h2></div>")
    body.append(f'<section class="overview">{"".join(overview)}</section>')

    body.append(f"<section><h2>Pre-training</h2>{curve_html}</section>")
    if evaluation_html:
        body.append(f"<section><h2>Evaluation</h2>{evaluation_html}</section>")

    body.append(f"<section><h2>Images ({len(cards)} of {total_images} shown)</h2>"
                '<div class="legend">Underlined words are noun phrases; coloured ones were matched to the box of '
                "the same colour (the small number is the region-phrase similarity). Hover or click a phrase, "
                "box or tag to link them.</div>")
    if not cards:
        body.append('<p class="notrun">no images: regions and retrieval not run</p>')
    for card in cards:
        body.append(render_card(card, image_roots, sentences, phrases, matches,
                                text_ran=n_sentences is not None, retrieval_ran=topk_path.is_file(),
                                phrases_ran=phrases_dir.is_dir()))
    body.append("</section></main>")

    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>muvla report: {esc(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + f"<script>{JS}</script></body></html>")
    with atomic_file(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_html


def render_evaluations(run_dir: Path) -> str:
    """A table of ``<run>/evaluation/*/summary.json`` metrics and their figures ('' when none ran)."""
    rows, figures = [], []
    for path in sorted((run_dir / "evaluation").glob("*/summary.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            rows.append(f'<tr><th>{esc(path.parent.name)}</th><td class="err">unreadable: {esc(err)}</td></tr>')
            continue
        metrics = data.get("metrics") or {}
        cells = ", ".join(f"{esc(k)} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        rows.append(f"<tr><th>{esc(path.parent.name)}</th><td>{esc(data.get('task', ''))}</td>"
                    f"<td>{esc(data.get('model', ''))}</td><td>{cells}</td></tr>")
        figure = Path(str(data.get("figure", "")))
        if figure.suffix == ".png" and figure.is_file():
            uri = "data:image/png;base64," + base64.b64encode(figure.read_bytes()).decode("ascii")
            figures.append(f'<figure><img class="curve" alt="{esc(path.parent.name)}" src="{uri}">'
                           f"<figcaption>{esc(path.parent.name)}</figcaption></figure>")
    if not rows:
        return ""
    return (f"<table><tr><th>run</th><th>task</th><th>model</th><th>metrics</th></tr>{''.join(rows)}</table>"
            + "".join(figures))


def render_card(card: Card, image_roots: list[Path], sentences: dict[int, tuple[str, str]],
                phrases: dict[int, SentencePhrases], matches: dict[tuple[str, int], MatchRow],
                text_ran: bool, retrieval_ran: bool, phrases_ran: bool) -> str:
    scene = render_scene(card, image_roots)
    chips = ""
    if card.entry is not None and card.regions is not None:
        chips = "".join(
            f'<span class="chip" id="c{card.index}-t{i}" data-region="{i}" style="--c:{color(i)}">{esc(region_label(card.entry, i))}</span>'
            for i in range(len(card.regions.boxes)))
        if len(card.entry.tags) != card.entry.num_regions and card.entry.tags:
            chips += " tags: " + ", ".join(esc(t) for t in card.entry.tags)
    items: list[str] = []
    for rank, sid, score in card.hits:
        if sid in sentences:
            text, source = sentences[sid]
            match = matches.get((card.image_id, rank))
            if match is not None and match.sentence_id != sid:
                card.notes.append(f"rank {rank}: matches.parquet names sentence {match.sentence_id}, topk {sid}")
                match = None
            if match is not None and card.regions is not None and len(match.region_phrase) != len(card.regions.boxes):
                card.notes.append(f"rank {rank}: {len(match.region_phrase)} region matches for "
                                  f"{len(card.regions.boxes)} regions")
            sentence_html = render_sentence(card, rank, text, phrases.get(sid), match)
            src = f'<span class="src">{esc(source)} #{sid}</span>'
        elif not text_ran:
            sentence_html, src = f'<span class="notrun">sentence {sid} (text stage not run)</span>', ""
        else:
            sentence_html, src = f'<span class="err">sentence {sid} missing from sentences.parquet</span>', ""
        items.append(f'<li><span class="score">{score:.3f}</span>{sentence_html}{src}</li>')
    if items:
        sents = f'<ol class="sents">{"".join(items)}</ol>'
    elif retrieval_ran:
        sents = '<p class="notrun">no retrieved sentences for this image</p>'
    else:
        sents = '<p class="notrun">retrieval not run</p>'
    if retrieval_ran and not phrases_ran and items:
        sents += '<p class="notrun">phrases stage not run</p>'
    size = f"{card.entry.width}x{card.entry.height}, {card.entry.num_regions} regions" if card.entry else ""
    notes = "".join(f"<div>{esc(n)}</div>" for n in card.notes)
    return (f'<div class="card" id="card-{card.index}" data-image-id="{esc(card.image_id)}">'
            f'<div class="pic">{scene}</div><div class="info"><h3>{esc(card.image_id)} <small>{esc(size)}</small></h3>'
            f'<div class="chips">{chips}</div>{sents}'
            f'{f"<div class=notes>{notes}</div>" if notes else ""}</div></div>')
