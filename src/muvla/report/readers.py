"""What the report shows of a run folder, read through the corpus layout (``muvla.corpus.layout``).

The report must show a run whose later stages are missing or half broken, so every stage is read on
its own and a stage that cannot be read becomes an error message on the page, never an exception.
Only the rows of the shown images are read: a corpus may hold millions of sentences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muvla.corpus.layout import CorpusLayout, PairMatch, SentencePhrases
from muvla.corpus.provenance import BuildRecord
from muvla.corpus.region_store import ImageRegions, RegionStore
from muvla.utils.config import ConfigError

RUN_MARKERS = ("regions", "text", "retrieval", "phrases", "pretrain", "evaluation", "experiment.json",
               "results.md")


class ReportError(ConfigError):
    """The folder is not a run, or the report cannot be written."""


@dataclass
class Card:
    """Everything shown for one image."""

    index: int
    image_id: str
    regions: ImageRegions | None = None
    notes: list[str] = field(default_factory=list)
    hits: list[tuple[int, int, float]] = field(default_factory=list)  # rank, sentence_id, score


@dataclass
class RunView:
    """The parts of a run the page shows, and why any part could not be read."""

    run_dir: Path
    cards: list[Card]
    total_images: int
    regions_ran: bool
    rejected: list[dict[str, Any]]
    n_sentences: int | None
    sentences: dict[int, tuple[str, str]]  # id -> (text, source)
    retrieval_ran: bool
    n_pairs: int | None
    phrases_ran: bool
    phrases: dict[int, SentencePhrases]
    matches: dict[tuple[str, int], PairMatch]
    errors: dict[str, str] = field(default_factory=dict)  # stage -> why its output could not be used


def is_run_folder(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """JSON objects of a .jsonl file and the number of lines that were not JSON objects."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    return rows, bad


def stage_status(folder: Path, main_file: Path) -> str:
    """'done', 'done (no build record)', 'incomplete' or 'not run'."""
    record = None
    try:
        record = BuildRecord.read(folder) if folder.is_dir() else None
    except ConfigError:
        record = None
    if record is not None and record.complete and main_file.is_file():
        return "done"
    if main_file.is_file():
        return "done (no build record)" if record is None else "incomplete (being rebuilt)"
    return "incomplete" if folder.is_dir() else "not run"


def _regions(view: RunView, layout: CorpusLayout, max_images: int) -> RegionStore | None:
    if not layout.regions.index.is_file():
        return None
    view.regions_ran = True
    try:
        store = layout.regions.store()
    except (ConfigError, FileNotFoundError, ValueError, OSError) as err:
        view.errors["regions"] = str(err)
        return None
    if layout.regions.rejected.is_file():
        view.rejected, bad = read_jsonl(layout.regions.rejected)
        view.rejected += [{"file": "?", "reason": "unparsable line in rejected.jsonl"}] * bad
    view.total_images = len(store)
    view.cards = [Card(k, image_id) for k, image_id in enumerate(store.image_ids[:max_images])]
    for card in view.cards:
        try:
            card.regions = store.find(card.image_id)
        except ValueError as err:
            card.notes.append(f"regions unreadable: {err}")
    return store


def load_run(run_dir: Path, max_images: int) -> RunView:
    """Read the shown images' regions, retrieved sentences, phrases and matches, stage by stage."""
    layout = CorpusLayout.at(run_dir)
    view = RunView(run_dir=run_dir, cards=[], total_images=0, regions_ran=False, rejected=[], n_sentences=None,
                   sentences={}, retrieval_ran=layout.retrieval.topk.is_file(), n_pairs=None,
                   phrases_ran=layout.phrases.root.is_dir(), phrases={}, matches={})
    _regions(view, layout, max_images)
    if layout.text.sentences.is_file():
        try:
            view.n_sentences = layout.text.count()
        except (ConfigError, OSError) as err:
            view.errors["text"] = str(err)
    if view.retrieval_ran:
        try:
            if not view.cards and not view.regions_ran:  # no region index: show the retrieved images
                ids = sorted(set(layout.retrieval.read_topk().image_id))
                view.total_images = len(ids)
                view.cards = [Card(k, i) for k, i in enumerate(ids[:max_images])]
            shown = [c.image_id for c in view.cards]
            by_image: dict[str, list[tuple[int, int, float]]] = {}
            topk = layout.retrieval.read_topk(shown)
            for image, rank, sid, score in zip(topk.image_id, topk.rank.tolist(), topk.sentence_id.tolist(),
                                               topk.score.tolist()):
                by_image.setdefault(image, []).append((int(rank), int(sid), float(score)))
            for card in view.cards:
                card.hits = sorted(by_image.get(card.image_id, []))
            view.n_pairs = layout.retrieval.count_pairs()
        except (ConfigError, OSError, ValueError) as err:
            view.errors["retrieval"] = str(err)
    wanted = sorted({sid for card in view.cards for _, sid, _ in card.hits})
    if view.n_sentences is not None:
        try:
            view.sentences = layout.text.texts(wanted, with_source=True)
        except (ConfigError, OSError, ValueError) as err:
            view.errors["text"] = str(err)
    _phrases(view, layout, wanted)
    return view


def _phrases(view: RunView, layout: CorpusLayout, wanted: list[int]) -> None:
    try:
        if layout.phrases.sentence_phrases.is_file():
            view.phrases = layout.phrases.read_phrases(wanted)
        if layout.phrases.matches.is_file():
            view.matches = {(m.image_id, m.rank): m
                            for m in layout.phrases.iter_matches([c.image_id for c in view.cards])}
    except (ConfigError, OSError, ValueError) as err:
        view.errors["phrases"] = str(err)


def find_summaries(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder relative to the run, parsed summary) for every ``summary.json`` under the run."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(run_dir.rglob("summary.json")):
        rel = path.parent.relative_to(run_dir).as_posix() or "."
        if any(part.startswith(".") for part in Path(rel).parts):  # unfinished unit (atomic_dir tmp folder)
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            data = {"error": f"unreadable summary.json: {err}"}
        if not isinstance(data, dict):
            data = {"value": data}
        out.append((rel, data))
    return out


def format_value(value: Any) -> str:
    """Numbers as people write them: counts without decimals, fractions with 4 significant digits."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"
    return str(value)[:200]


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Dotted key -> short text for scalar values of a nested summary (lists shown by length)."""
    items: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(flatten(value, name + "."))
        elif isinstance(value, list):
            items.append((name, f"[{len(value)} items]" if len(value) > 5 else json.dumps(value)[:200]))
        else:
            items.append((name, format_value(value)))
    return items
