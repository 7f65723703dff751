"""Pre-training data, objectives, curriculum, baselines and run_pretrain (METHOD §4-7)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pretrain_fixtures
from muvla.corpus.region_store import ImageRegions, RegionPartWriter, merge_region_parts
from muvla.corpus.synthetic import write_synthetic_corpus
from muvla.encoders import load_wordpiece_tokenizer
from muvla.model import Model, ModelConfig
from muvla.pretraining import data as pretrain_data
from muvla.pretraining.data import PretrainCollator, PretrainCorpus, PretrainDataset
from muvla.pretraining.masking import REGIONS, TEXT
from muvla.pretraining.objectives import PretrainObjectives
from muvla.pretraining.run import PretrainConfig, run_pretrain
from muvla.utils.config import ConfigError, load_config
from pretrain_fixtures import TINY_MODEL, tiny_run_overrides

tiny_corpus = pretrain_fixtures.tiny_corpus  # shared session fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_wordpiece_tokenizer("default")


def seeded_batch(collate: PretrainCollator, ds: PretrainDataset, idx: list[int], seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    return collate([ds[i] for i in idx])


def tiny_objectives(corpus: PretrainCorpus, **kw) -> PretrainObjectives:
    torch.manual_seed(0)
    model = Model(ModelConfig(**TINY_MODEL, region_feature_dim=corpus.feature_dim,
                              num_region_classes=len(corpus.store.classes)))
    return PretrainObjectives(model, **kw)


# ----------------------------------------------------------------------------------------------
# data


def test_items_follow_the_corpus(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok, max_text_len=36, max_regions=50)
    assert len(corpus) == 24 and corpus.skipped == {} and corpus.max_k == 3
    ds = PretrainDataset(corpus)
    random.seed(0)
    item = ds[0]
    reg = corpus.regions(0)
    assert item["sentence_id"] in corpus.image_sentences[0]
    # tags: [CLS] one piece per region [SEP]; each piece points at its region
    assert item["tag_ids"][0] == tok.cls_token_id and item["tag_ids"][-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(item["tag_ids"][1:-1].tolist()) == reg.tags
    assert item["tag_region"].tolist() == [-1, *range(len(reg.tags)), -1]
    # sentence tokens carry their phrase index, shifted by [CLS]
    text = tok.convert_ids_to_tokens(item["text_ids"].tolist())
    for p in range(2):
        words = [t for t, q in zip(text, item["token_phrase"]) if q == p]
        assert words[-1] in reg.tags  # "a dog" -> [a, dog]; the noun is a region tag
    # each region's matched phrase names its class
    for r, p in enumerate(item["region_phrase"]):
        words = [t for t, q in zip(text, item["token_phrase"]) if q == p]
        assert words[-1] == reg.tags[r]
    np.testing.assert_allclose(item["features"], reg.features.astype(np.float32))
    np.testing.assert_allclose(item["positions"], reg.position_features())


def test_batch_masking_rules(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok)
    ds = PretrainDataset(corpus)
    collate = PretrainCollator(corpus)
    b = seeded_batch(collate, ds, list(range(24)), seed=3)
    items = [ds[i] for i in range(24)]  # unmasked reference features (same regions whatever the draw)
    orig = torch.zeros_like(b.region_features)
    for i, it in enumerate(items):
        orig[i, :len(it["features"])] = torch.from_numpy(it["features"])
    assert torch.equal(b.region_features, orig)  # MRFR target = ORIGINAL features
    # R-T: masked regions are flagged; zeroed features only where masked
    zeroed = (b.rt_region_features == 0).all(-1) & b.region_mask
    assert not (zeroed & ~b.rt_region_masked).any()
    assert ((b.rt_mlm_labels != -100) <= b.rt_attention_mask).all()
    # R-N: never both modalities in a sample; only phrase tokens / matched regions
    text_masked = (b.rn_mlm_labels != -100).any(1)
    region_masked = b.rn_region_masked.any(1)
    assert not (text_masked & region_masked).any()
    token_phrase_positions = b.rn_mlm_labels != -100
    assert (b.text_input_ids[token_phrase_positions] == b.rn_mlm_labels[token_phrase_positions]).all()
    pmrtc_rows = b.rn_pmrtc_targets[b.rn_region_masked]
    assert ((pmrtc_rows != -100).sum(-1) > 0).all()  # every masked region has phrase pieces to predict
    # I-S: negatives get no MLM labels and a sentence outside the image's top-K
    neg = b.itm_labels == 0
    assert 0 < int(neg.sum()) < 24
    assert not (b.is_mlm_labels[neg] != -100).any()
    for i in neg.nonzero()[:, 0].tolist():
        assert int(b.negative_ids[i]) not in corpus.image_sentences[int(b.image_index[i])]
    assert (b.negative_ids[~neg] == -1).all()


def test_itm_negatives_come_from_the_whole_text_store(tiny_corpus, tok):
    """METHOD's random sentence: any sentence of the corpus, not only those some image retrieved."""
    corpus = PretrainCorpus(tiny_corpus, tok)
    retrieved = {s for sids in corpus.image_sentences for s in sids}
    assert corpus.negatives == "corpus" and corpus.pool.tolist() == list(range(corpus.layout.text.count()))
    assert len(corpus.pool) > len(retrieved)  # the tiny corpus has sentences no image retrieved
    texts = corpus.layout.text.texts(corpus.pool.tolist())
    ds, collate = PretrainDataset(corpus), PretrainCollator(corpus)
    drawn = set()
    for seed in range(12):
        b = seeded_batch(collate, ds, list(range(24)), seed=seed)
        for i in (b.itm_labels == 0).nonzero()[:, 0].tolist():
            sid = int(b.negative_ids[i])
            assert sid not in corpus.image_sentences[int(b.image_index[i])]  # never one of the image's top-K
            body = b.is_attention_mask[i].sum() - 2
            assert tok.decode(corpus.negative_tokens[sid][1:-1]) == tok.decode(
                tok(texts[sid], add_special_tokens=False)["input_ids"][:int(body)])
            drawn.add(sid)
    assert drawn - retrieved  # some negatives are sentences nobody retrieved

    only_retrieved = PretrainCorpus(tiny_corpus, tok, negatives="retrieved")
    assert set(only_retrieved.pool.tolist()) == retrieved
    with pytest.raises(ValueError, match="negatives must be one of"):
        PretrainCorpus(tiny_corpus, tok, negatives="batch")


def test_a_large_text_store_gives_a_bounded_fixed_negative_pool(tiny_corpus, tok, monkeypatch):
    monkeypatch.setattr(pretrain_data, "MAX_NEGATIVE_POOL", 10)
    a, b = PretrainCorpus(tiny_corpus, tok), PretrainCorpus(tiny_corpus, tok)
    assert len(a.pool) == 10 and a.pool.tolist() == b.pool.tolist()  # the same pool on every rank and resume
    assert set(a.negative_tokens) >= set(a.pool.tolist())
    collate, ds = PretrainCollator(a), PretrainDataset(a)
    batch = seeded_batch(collate, ds, list(range(24)), seed=0)
    neg = batch.itm_labels == 0
    assert set(batch.negative_ids[neg].tolist()) <= set(a.pool.tolist())


def test_rn_picks_both_modalities_over_batches(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok)
    ds = PretrainDataset(corpus)
    collate = PretrainCollator(corpus, mask_prob=0.5)
    seen = set()
    for seed in range(4):
        b = seeded_batch(collate, ds, list(range(24)), seed)
        seen |= {TEXT for _ in [0] if (b.rn_mlm_labels != -100).any()}
        seen |= {REGIONS for _ in [0] if b.rn_region_masked.any()}
    assert seen == {TEXT, REGIONS}


def test_collate_is_reproducible(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok)
    ds = PretrainDataset(corpus)
    collate = PretrainCollator(corpus)
    a = seeded_batch(collate, ds, [0, 5, 9, 11], seed=7)
    b = seeded_batch(collate, ds, [0, 5, 9, 11], seed=7)
    c = seeded_batch(collate, ds, [0, 5, 9, 11], seed=8)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert not all(torch.equal(getattr(a, n), getattr(c, n)) for n in ("rt_mlm_labels", "is_input_ids", "sentence_ids"))


def test_k_ablation_uses_first_ranks(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok, k=1)
    topk = pq.read_table(tiny_corpus / "retrieval" / "topk.parquet").to_pydict()
    first = {i: s for i, r, s in zip(topk["image_id"], topk["rank"], topk["sentence_id"]) if r == 0}
    assert corpus.max_k == 1
    assert all(sids == [first[i]] for i, sids in zip(corpus.image_ids, corpus.image_sentences))


def test_bad_images_and_pairs_are_skipped_and_counted(tmp_path, tok):
    root = write_synthetic_corpus(tmp_path / "c", num_images=6, feature_dim=8)
    # an image without regions, in a second region part
    writer = RegionPartWriter(max_regions=4, feature_dim=8, capacity=1)
    writer.add(ImageRegions("empty", "empty.jpg", 10, 10, np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32),
                            np.zeros(0, np.int32), np.zeros((0, 8), np.float16)))
    (root / "regions" / "parts" / "part-00001").mkdir()
    writer.write(root / "regions" / "parts" / "part-00001")
    merge_region_parts(root / "regions")
    topk = pq.read_table(root / "retrieval" / "topk.parquet")
    extra = pa.Table.from_pylist([
        {"image_id": "empty", "rank": 0, "sentence_id": 0, "score": 0.5},
        {"image_id": "ghost", "rank": 0, "sentence_id": 0, "score": 0.5},
        {"image_id": "img0001", "rank": 3, "sentence_id": 10_000, "score": 0.1},  # not in the text store
    ], schema=topk.schema)
    pq.write_table(pa.concat_tables([topk, extra]), root / "retrieval" / "topk.parquet")
    corpus = PretrainCorpus(root, tok)
    assert len(corpus) == 6
    assert corpus.skipped == {"image_without_regions": 1, "image_not_in_region_store": 1,
                              "retrieved_sentence_not_in_text_store": 1}
    assert 10_000 not in corpus.image_sentences[corpus.image_ids.index("img0001")]


def test_missing_corpus_file_is_a_clear_error(tmp_path, tok):
    root = write_synthetic_corpus(tmp_path / "c", num_images=4, feature_dim=8)
    (root / "phrases" / "matches.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="matches"):
        PretrainCorpus(root, tok)


# ----------------------------------------------------------------------------------------------
# objectives and curriculum


def test_objectives_log_every_loss_and_follow_the_curriculum(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok)
    ds = PretrainDataset(corpus)
    b = seeded_batch(PretrainCollator(corpus), ds, list(range(16)), seed=1)
    obj = tiny_objectives(corpus, warmup_samples=16).eval()
    out = obj(b)
    expected = {"loss_rt", "loss_rt_mlm", "loss_rt_mrc", "loss_rt_mrfr", "loss_rn", "loss_rn_mlm", "loss_rn_pmrtc",
                "loss_is", "loss_is_itm", "loss_is_mlm", "itm_acc", "w_itm_mean", "curriculum"}
    assert expected <= set(out.logs)
    lg = out.logs
    assert float(lg["curriculum"]) == 0.0
    torch.testing.assert_close(out.loss, lg["loss_rt"] + lg["loss_rn"] + lg["loss_is"])
    # itm_loss_scale multiplies the ITM term only; the logged ITM loss stays unscaled (ln 2 = chance)
    scaled = tiny_objectives(corpus, warmup_samples=16, itm_loss_scale=10.0).eval()(b)
    torch.testing.assert_close(scaled.logs["loss_is_itm"], lg["loss_is_itm"])
    torch.testing.assert_close(scaled.loss, out.loss + 9.0 * lg["loss_is_itm"])
    out.loss.backward()
    assert obj.model.itm_head.classifier.weight.grad is not None

    # batch-mean weight: L_RT + mean(w) * (L_RN + L_IS)
    obj_mean = tiny_objectives(corpus, warmup_samples=0, itm_weight="batch_mean").eval()
    out_mean = obj_mean(b)
    lm = out_mean.logs
    assert float(lm["curriculum"]) == 1.0
    torch.testing.assert_close(lm["loss_rt"], lg["loss_rt"])
    torch.testing.assert_close(out_mean.loss, lm["loss_rt"] + lm["w_itm_mean"] * (lg["loss_rn"] + lg["loss_is"]))

    # per-sample weight: each sample's R-N / I-S items weighted by its own detached w_ITM
    obj.samples_seen.fill_(16)  # the warm-up is over
    with torch.no_grad():
        obj.model.itm_head.classifier.bias.fill_(0.0)
        obj.model.itm_head.classifier.weight.normal_(0, 2.0)  # spread the probabilities across samples
    out_ps = obj(b)
    w = torch.sigmoid(obj.model.itm_head(obj.model(b.rn_input_ids, b.text_attention_mask, b.rn_region_features,
                                                   b.region_positions, b.region_mask).pooled))
    torch.testing.assert_close(out_ps.logs["w_itm_mean"], w.mean().detach())
    itm_items = torch.nn.functional.binary_cross_entropy_with_logits(
        obj.model.itm_head(obj.model(b.is_input_ids, b.is_attention_mask, b.region_features, b.region_positions,
                                     b.region_mask).pooled), b.itm_labels, reduction="none")
    torch.testing.assert_close(out_ps.logs["loss_is_itm"], (itm_items * w).mean().detach())


def test_curriculum_clock_counts_training_samples(tiny_corpus, tok):
    """The warm-up is counted in training samples (not epochs); eval passes do not advance it."""
    corpus = PretrainCorpus(tiny_corpus, tok)
    b = seeded_batch(PretrainCollator(corpus), PretrainDataset(corpus), list(range(8)), seed=3)
    obj = tiny_objectives(corpus, warmup_samples=16).train()
    flags = [float(obj(b).logs["curriculum"]) for _ in range(3)]
    assert flags == [0.0, 0.0, 1.0]  # 0 and 8 samples seen before the first two batches, 16 before the third
    obj.eval()
    obj(b)
    assert int(obj.samples_seen) == 24 and "samples_seen" in obj.state_dict()
    with pytest.raises(ValueError, match="warmup_samples"):
        tiny_objectives(corpus, warmup_samples=-1)


def test_tasks_subset_runs_only_those_passes(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok)
    b = seeded_batch(PretrainCollator(corpus), PretrainDataset(corpus), list(range(8)), seed=2)
    obj = tiny_objectives(corpus, tasks=["rt", "rn"], warmup_samples=0).eval()
    out = obj(b)
    assert "loss_is" not in out.logs and "loss_rt" in out.logs and float(out.logs["curriculum"]) == 0.0
    torch.testing.assert_close(out.loss, out.logs["loss_rt"] + out.logs["loss_rn"])
    with pytest.raises(ValueError, match="subset"):
        tiny_objectives(corpus, tasks=["itm"])


def test_round_robin_alternates_text_and_image_batches(tiny_corpus, tok):
    corpus = PretrainCorpus(tiny_corpus, tok)
    b = seeded_batch(PretrainCollator(corpus, neg_fraction=0.0), PretrainDataset(corpus), list(range(8)), seed=2)
    assert (b.itm_labels == 1).all()
    obj = tiny_objectives(corpus, mode="round_robin").train()
    kinds = [sorted(k for k in obj(b).logs if k.startswith("loss")) for _ in range(4)]
    assert kinds[0] == kinds[2] == ["loss_text_mlm"]
    assert kinds[1] == kinds[3] == ["loss_rt", "loss_rt_mlm", "loss_rt_mrc", "loss_rt_mrfr"]
    assert int(obj.calls) == 4 and "calls" in obj.state_dict()


# ----------------------------------------------------------------------------------------------
# config and run


@pytest.mark.parametrize("bad, msg", [
    ({"mode": "joint"}, "mode: expected one of muvla, round_robin, base"),
    ({"tasks": ["rt", "xx"]}, "tasks: expected one of rt, rn, is"),
    ({"k": 0}, "k must be"),
    ({"itm_weight": "mean"}, "itm_weight"),
    ({"itm_loss_scale": 0}, "itm_loss_scale must be > 0"),
    ({"itm_negatives": "batch"}, "itm_negatives: expected one of corpus, retrieved"),
    ({"model": {"hidden": 3}}, "unknown model field"),
    ({"corpus": None}, "needs --corpus"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_text_len": 2}, r"^pretrain: max_text_len must be >= 3 \(\[CLS\] \+ a token \+ \[SEP\]\), got 2$"),
])
def test_config_validation(tmp_path, tiny_corpus, bad, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(PretrainConfig, overrides={"out": str(tmp_path), "corpus": str(tiny_corpus), **bad})


def test_shipped_configs_load(tmp_path, tiny_corpus):
    files = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
    assert {"muvla.yaml", "paper_bert_base.yaml", "base.yaml", "round_robin.yaml", "joint_unaligned.yaml",
            "aligned.yaml", "aligned_ratio.yaml"} <= {f.name for f in files}
    for f in files:
        cfg = load_config(PretrainConfig, f, {"out": str(tmp_path), "corpus": str(tiny_corpus)})
        assert cfg.mode in ("muvla", "round_robin", "base"), f
    paper = load_config(PretrainConfig, REPO / "configs/pretrain/paper_bert_base.yaml",
                        {"out": str(tmp_path), "corpus": str(tiny_corpus)})
    assert (paper.lr, paper.max_text_len, paper.k, paper.warmup_samples, paper.max_grad_norm) == (5e-5, 60, 5, 3_000_000, 5.0)


def test_base_mode_saves_the_initialised_model(tmp_path, tiny_corpus):
    cfg = load_config(PretrainConfig, overrides=tiny_run_overrides(tmp_path / "base", tiny_corpus, mode="base"))
    summary = run_pretrain(cfg)
    model = Model.from_pretrained(tmp_path / "base" / "model")
    assert model.config.region_feature_dim == 16 and model.config.num_region_classes == 6
    assert (tmp_path / "base" / "model" / "vocab.txt").is_file() or (tmp_path / "base" / "model" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "base" / "summary.json").read_text())["mode"] == "base" == summary["mode"]
    assert (tmp_path / "base" / "config.yaml").is_file()


def test_round_robin_run(tmp_path, tiny_corpus):
    cfg = load_config(PretrainConfig, overrides=tiny_run_overrides(tmp_path / "rr", tiny_corpus, mode="round_robin",
                                                                   max_steps=4, log_every=1))
    run_pretrain(cfg)
    rows = [json.loads(x) for x in (tmp_path / "rr" / "metrics.jsonl").read_text().splitlines()]
    assert ["loss_text_mlm" in r for r in rows] == [True, False, True, False]
    Model.from_pretrained(tmp_path / "rr" / "model")


def test_pretraining_lowers_losses_and_switches_curriculum(tmp_path, tiny_corpus):
    """MLM losses (R-T, R-N, I-S) fall over 60 steps; the curriculum switches on after m epochs.

    ITM separation and moving curriculum weights need longer runs: tests/test_pretrain_learning.py.
    """
    out = tmp_path / "learn"
    cfg = load_config(PretrainConfig, overrides=tiny_run_overrides(
        out, tiny_corpus, max_steps=60, lr=3e-3, warmup_samples=240, log_every=10, save_every=10_000))
    summary = run_pretrain(cfg)
    assert summary["train"]["steps"] == 60
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    for key in ("loss_rt_mlm", "loss_is_mlm", "loss_rn_mlm"):
        assert last[key] < 0.7 * first[key], key
    assert [r["curriculum"] for r in rows] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # batch 8: on from step 31
    assert all(0.0 < r["w_itm_mean"] < 1.0 for r in rows)
    Model.from_pretrained(out / "model")


def test_resume_after_a_crash_matches_uninterrupted(tmp_path, tiny_corpus, monkeypatch):
    kw = dict(max_steps=8, save_every=3, log_every=1, warmup_samples=40)  # curriculum on from step 6
    full = tmp_path / "full"
    run_pretrain(load_config(PretrainConfig, overrides=tiny_run_overrides(full, tiny_corpus, **kw)))

    crashed = tmp_path / "crashed"
    original = PretrainObjectives.forward
    calls = {"n": 0}

    def crash_at_7(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(PretrainObjectives, "forward", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(load_config(PretrainConfig, overrides=tiny_run_overrides(crashed, tiny_corpus, **kw)))
    monkeypatch.setattr(PretrainObjectives, "forward", original)
    assert not (crashed / "model").exists()
    summary = run_pretrain(load_config(PretrainConfig, overrides=tiny_run_overrides(crashed, tiny_corpus, resume=True,
                                                                                    **kw)))
    assert summary["train"]["resumed_from"].endswith("step-0000006")
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 9))
    for a, b in zip(ref, got):
        for key in ("loss", "loss_rt", "loss_rn", "loss_is", "w_itm_mean", "curriculum"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    wa = Model.from_pretrained(full / "model").state_dict()
    wb = Model.from_pretrained(crashed / "model").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
