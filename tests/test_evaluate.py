"perrep.evaluate: PRPG's global metrics, cross-checked against sklearn, torchmetrics and the official loops."
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, ndcg_score
from sklearn.metrics.pairwise import cosine_similarity
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalMRR, RetrievalNormalizedDCG

from perrep.data import TEST_SPLITS, load_pods
from perrep.evaluate import (EMBEDDING_KEYS, embed_dataset, evaluate_global, load_embeddings, metrics_dict,
                             retrieval_metrics, save_embeddings, summarize)
from perrep.testing import ToyColourBackbone, make_toy_pods


def make_embeddings(*, n_classes=6, n_train=3, n_test=(5, 4, 3, 6), dim=8, signal=1.0, seed=0, n_val=2):
    "Random embeddings: a class prototype scaled by `signal` plus unit noise; test counts per scene from `n_test`."
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, dim))
    rows = []  # (label, split, scene, vector)
    for c in range(n_classes):
        rows += [(f"c{c}", "train", "", signal * protos[c] + rng.normal(size=dim)) for _ in range(n_train)]
        for scene, n in zip(TEST_SPLITS, n_test):
            rows += [(f"c{c}", "test", scene, signal * protos[c] + rng.normal(size=dim)) for _ in range(n)]
    order = rng.permutation(len(rows))  # images in no particular order, as a real file may hold them
    rows = [rows[i] for i in order]
    return dict(image_ids=np.array([f"img{i}" for i in range(len(rows))]), labels=np.array([r[0] for r in rows]),
                splits=np.array([r[1] for r in rows]), test_splits=np.array([r[2] for r in rows]),
                embeddings=np.array([r[3] for r in rows], dtype=np.float32),
                class_names=np.array([f"c{c}" for c in range(n_classes)]),
                class_splits=np.array(["val"] * n_val + ["test"] * (n_classes - n_val)), backbone=np.array("random"))


def value(results, cls, scene, metric):
    hit = results[(results["class"] == cls) & (results["scene"] == scene) & (results["metric"] == metric)]["value"]
    assert len(hit) == 1, (cls, scene, metric)
    return float(hit.iloc[0])


def restrict(emb, scene):
    "The inputs the official code would see if test/ held only this scene's images."
    keep = (emb["splits"] == "train") | (emb["test_splits"] == scene) if scene != "overall" else np.ones(len(emb["splits"]), bool)
    return {k: (v[keep] if k in ("image_ids", "labels", "splits", "test_splits", "embeddings") else v) for k, v in emb.items()}


# -------------------------------------------------------------------- the official definitions, as loops
def official_classification(emb, positive):
    "downstream/classification.py: per test image, max cosine to the positive class's train embeddings; sklearn AP."
    train, test = emb["splits"] == "train", emb["splits"] == "test"
    references = torch.from_numpy(emb["embeddings"][train][emb["labels"][train] == positive])
    test_embeds = torch.from_numpy(emb["embeddings"][test])
    preds = [F.cosine_similarity(test_embeds[i], references, dim=-1).max().item() for i in range(len(test_embeds))]
    return average_precision_score((emb["labels"][test] == positive).astype(int), preds)


def official_retrieval(emb, positive, k=10):
    "downstream/retrieval.py: queries = the class's test images; gallery = all train images; own NDCG, MRR, top-k."
    train, test = emb["splits"] == "train", emb["splits"] == "test"
    gallery, gallery_labels = torch.from_numpy(emb["embeddings"][train]), emb["labels"][train]
    queries = torch.from_numpy(emb["embeddings"][test][emb["labels"][test] == positive])
    ndcgs, rrs, hits = [], [], []
    for q in queries:
        ranked = gallery_labels[torch.argsort(F.cosine_similarity(q, gallery, dim=-1), descending=True).numpy()]
        rel = torch.from_numpy(ranked == positive).float()
        discount = torch.log2(torch.arange(2, len(rel) + 2, dtype=torch.float32))
        ndcgs.append((torch.sum(rel / discount) / torch.sum(torch.sort(rel, descending=True).values / discount)).item())
        rrs.append(1.0 / (int(np.flatnonzero(ranked == positive)[0]) + 1))
        hits.append(float(positive in ranked[:k]))
    return np.mean(ndcgs), np.mean(rrs), np.mean(hits)


@pytest.fixture(scope="module")
def emb():
    return make_embeddings()


@pytest.fixture(scope="module")
def results(emb):
    return evaluate_global(emb)


# -------------------------------------------------------------------- cross-checks
@pytest.mark.parametrize("scene", [*TEST_SPLITS, "overall"])
def test_matches_the_official_loops(emb, results, scene):
    sub = restrict(emb, scene)
    for cls in [f"c{c}" for c in range(2, 6)]:
        assert value(results, cls, scene, "pr_auc") == pytest.approx(official_classification(sub, cls), abs=1e-6)
        ndcg, mrr, top10 = official_retrieval(sub, cls)
        assert value(results, cls, scene, "ndcg") == pytest.approx(ndcg, abs=1e-6)
        assert value(results, cls, scene, "mrr") == pytest.approx(mrr, abs=1e-12)
        assert value(results, cls, scene, "top10") == pytest.approx(top10, abs=1e-12)


def test_pr_auc_matches_sklearn(emb, results):
    train, test = emb["splits"] == "train", emb["splits"] == "test"
    sim = cosine_similarity(emb["embeddings"][test], emb["embeddings"][train])
    for cls in ("c2", "c5"):
        scores = sim[:, emb["labels"][train] == cls].max(axis=1)
        positive = emb["labels"][test] == cls
        assert value(results, cls, "overall", "pr_auc") == pytest.approx(average_precision_score(positive, scores), abs=1e-9)
        assert value(results, cls, "overall", "pr_auc_chance") == pytest.approx(positive.mean())
        pose = emb["test_splits"][test] == "pose"
        assert value(results, cls, "pose", "pr_auc") == pytest.approx(average_precision_score(positive[pose], scores[pose]), abs=1e-9)


def test_retrieval_matches_sklearn_and_torchmetrics():
    emb = make_embeddings(n_classes=8, n_train=3, n_test=(6, 6, 6, 6), dim=4, signal=0.7, seed=3, n_val=0)
    results = evaluate_global(emb)
    train, test = emb["splits"] == "train", emb["splits"] == "test"
    sim = cosine_similarity(emb["embeddings"][test], emb["embeddings"][train])  # (T, 24): top-10 is a real cut
    gallery_labels = emb["labels"][train]
    for cls in ("c0", "c3", "c7"):
        rows = np.flatnonzero(emb["labels"][test] == cls)
        relevance = (gallery_labels[None, :] == cls).repeat(len(rows), 0)           # (Q, N)
        # + 2 keeps the ranking and makes every score positive: torchmetrics' MRR drops items scored <= 0 as "not retrieved"
        preds = torch.from_numpy(sim[rows] + 2).flatten()
        target = torch.from_numpy(relevance).flatten()
        indexes = torch.arange(len(rows)).repeat_interleave(sim.shape[1])
        assert value(results, cls, "overall", "ndcg") == pytest.approx(
            np.mean([ndcg_score(relevance[i:i + 1], sim[rows][i:i + 1]) for i in range(len(rows))]), abs=1e-9)
        assert value(results, cls, "overall", "ndcg") == pytest.approx(RetrievalNormalizedDCG()(preds, target, indexes=indexes).item(), abs=1e-5)
        assert value(results, cls, "overall", "mrr") == pytest.approx(RetrievalMRR()(preds, target, indexes=indexes).item(), abs=1e-6)
        assert value(results, cls, "overall", "map") == pytest.approx(RetrievalMAP()(preds, target, indexes=indexes).item(), abs=1e-6)
        assert value(results, cls, "overall", "map") == pytest.approx(
            np.mean([average_precision_score(relevance[i], sim[rows][i]) for i in range(len(rows))]), abs=1e-9)
        assert value(results, cls, "overall", "top10") == pytest.approx(RetrievalHitRate(top_k=10)(preds, target, indexes=indexes).item(), abs=1e-6)
    assert 0 < results[results["metric"] == "top10"]["value"].mean() < 1  # the cut at 10 matters in this example


def test_retrieval_metrics_by_hand():
    # query class "a"; gallery ranked b, a, b, a, a  ->  relevant at ranks 2, 4, 5
    m = retrieval_metrics(np.array([[0.9, 0.8, 0.7, 0.6, 0.5]]), np.array(["a"]), np.array(["b", "a", "b", "a", "a"]), top_k=1)
    dcg = 1 / np.log2(3) + 1 / np.log2(5) + 1 / np.log2(6)
    assert m["ndcg"][0] == pytest.approx(dcg / (1 + 1 / np.log2(3) + 1 / np.log2(4)))
    assert m["mrr"][0] == 0.5 and m["top1"][0] == 0.0
    assert m["map"][0] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    with pytest.raises(ValueError, match="no image in the gallery"):
        retrieval_metrics(np.ones((1, 2)), np.array(["z"]), np.array(["a", "b"]))


# -------------------------------------------------------------------- behaviour
def test_perfect_embeddings_score_one_everywhere():
    emb = make_embeddings(n_classes=5, n_val=0)
    emb["embeddings"] = np.eye(5, dtype=np.float32)[[int(c[1:]) for c in emb["labels"]]]  # one-hot of the class
    summary = summarize(evaluate_global(emb))
    for metric in ("pr_auc", "ndcg", "mrr", "map", "top10"):
        assert np.allclose(summary[metric], 1.0), metric


def test_random_embeddings_score_near_chance():
    emb = make_embeddings(n_classes=20, n_test=(10, 10, 10, 10), dim=64, signal=0.0, seed=1, n_val=0)
    summary = summarize(evaluate_global(emb))
    chance = summary.loc["overall", "pr_auc_chance"]
    assert chance == pytest.approx(1 / 20)
    assert abs(summary.loc["overall", "pr_auc"] - chance) < 0.02
    # a random ranking of 60 gallery images with 3 relevant: P(first relevant at rank r) = C(60 - r, 2) / C(60, 3)
    p_first = np.array([comb(60 - r, 2) for r in range(1, 61)]) / comb(60, 3)
    assert summary.loc["overall", "top10"] == pytest.approx(p_first[:10].sum(), abs=0.08)
    assert summary.loc["overall", "mrr"] == pytest.approx((p_first / np.arange(1, 61)).sum(), abs=0.05)


def test_per_scene_restriction_by_hand():
    "Two instances on the unit circle; the scene decides which test images compete with which."
    at = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]
    vectors = [at(0), at(2), at(-2), at(90), at(88), at(92), at(10), at(80), at(60), at(50)]
    emb = dict(image_ids=np.array([f"i{k}" for k in range(10)]), labels=np.array(list("aaabbb") + list("abab")),
               splits=np.array(["train"] * 6 + ["test"] * 4),
               test_splits=np.array([""] * 6 + ["in_distribution", "in_distribution", "pose", "pose"]),
               embeddings=np.array(vectors, np.float32), class_names=np.array(["a", "b"]),
               class_splits=np.array(["test", "test"]), backbone=np.array("hand"))
    results = evaluate_global(emb, top_k=3)
    # class a, in_distribution: a@10 (score cos 8) beats b@80 -> AP 1; pose: b@50 (cos 48) beats a@60 (cos 58) -> AP 1/2
    assert value(results, "a", "in_distribution", "pr_auc") == 1.0
    assert value(results, "a", "pose", "pr_auc") == pytest.approx(0.5)
    # overall, ranking by score for a: a@10, b@50, a@60, b@80 -> AP (1 + 2/3) / 2
    assert value(results, "a", "overall", "pr_auc") == pytest.approx((1 + 2 / 3) / 2)
    assert value(results, "a", "pose", "pr_auc_chance") == 0.5
    # retrieval for the pose query a@60: the 3 b images (30° away) rank above the 3 a images (58-62° away)
    assert value(results, "a", "pose", "mrr") == pytest.approx(1 / 4)
    assert value(results, "a", "pose", "top3") == 0.0
    d = 1 / np.log2(np.arange(2, 8))
    assert value(results, "a", "pose", "ndcg") == pytest.approx(d[3:].sum() / d[:3].sum())
    assert value(results, "a", "in_distribution", "mrr") == 1.0
    assert value(results, "a", "overall", "mrr") == pytest.approx((1 + 1 / 4) / 2)  # mean over its two queries


def test_classes_and_summary(emb, results):
    assert sorted(results["class"].unique()) == ["c2", "c3", "c4", "c5"]  # class_split="test" by default
    assert sorted(evaluate_global(emb, class_split="val")["class"].unique()) == ["c0", "c1"]
    assert evaluate_global(emb, classes=["c1"])["class"].unique().tolist() == ["c1"]
    assert len(evaluate_global(emb, class_split=None)["class"].unique()) == 6
    with pytest.raises(ValueError, match="not classes of these embeddings"): evaluate_global(emb, classes=["zz"])
    with pytest.raises(ValueError, match="class_split='holdout'"): evaluate_global(emb, class_split="holdout")
    summary = summarize(results)
    assert list(summary.index) == [*TEST_SPLITS, "overall"]
    assert list(summary.columns) == ["pr_auc", "pr_auc_chance", "ndcg", "mrr", "map", "top10", "n_classes"]
    assert summary.loc["pose", "pr_auc"] == pytest.approx(results.query("scene == 'pose' and metric == 'pr_auc'")["value"].mean())
    # chance per scene = mean positive fraction: 4 of 24 pose images belong to each class
    assert summary.loc["pose", "pr_auc_chance"] == pytest.approx(4 / 24)
    nested = metrics_dict(summary)
    assert set(nested) == {*TEST_SPLITS, "overall"} and set(nested["overall"]) == {"pr_auc", "pr_auc_chance", "ndcg", "mrr", "map", "top10"}
    assert all(isinstance(v, float) for scene in nested.values() for v in scene.values())


def test_a_class_missing_from_a_scene_has_no_row_there():
    emb = make_embeddings(n_classes=3, n_val=0)
    drop = (emb["labels"] == "c1") & (emb["test_splits"] == "pose")
    emb = {k: (v[~drop] if k in ("image_ids", "labels", "splits", "test_splits", "embeddings") else v) for k, v in emb.items()}
    summary = summarize(evaluate_global(emb))
    assert summary.loc["pose", "n_classes"] == 2 and summary.loc["distractors", "n_classes"] == 3


def test_a_class_without_train_embeddings_is_refused():
    emb = make_embeddings(n_classes=3, n_val=0)
    drop = (emb["labels"] == "c2") & (emb["splits"] == "train")
    emb = {k: (v[~drop] if k in ("image_ids", "labels", "splits", "test_splits", "embeddings") else v) for k, v in emb.items()}
    with pytest.raises(ValueError, match=r"classes \['c2'\] have no train or no test embedding"):
        evaluate_global(emb)


# -------------------------------------------------------------------- embeddings on disk
def test_save_load_round_trip_is_bit_identical_and_reproducible(emb, tmp_path):
    save_embeddings(tmp_path / "a.npz", emb)
    save_embeddings(tmp_path / "b.npz", emb)
    loaded = load_embeddings(tmp_path / "a.npz")
    assert set(loaded) == set(EMBEDDING_KEYS)
    for key in EMBEDDING_KEYS:
        assert loaded[key].dtype == np.asarray(emb[key]).dtype and loaded[key].shape == np.asarray(emb[key]).shape
        assert loaded[key].tobytes() == np.asarray(emb[key]).tobytes(), key
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.load(tmp_path / "a.npz", allow_pickle=False).close()


def test_bad_embeddings_are_refused_and_nothing_is_overwritten(emb, tmp_path):
    save_embeddings(tmp_path / "e.npz", emb)
    before = (tmp_path / "e.npz").read_bytes()
    broken = dict(emb, embeddings=emb["embeddings"].astype(np.float64))
    with pytest.raises(ValueError, match="save_embeddings.*e.npz.*float32"):
        save_embeddings(tmp_path / "e.npz", broken)
    with pytest.raises(ValueError, match="missing key"):
        save_embeddings(tmp_path / "e.npz", {k: v for k, v in emb.items() if k != "labels"})
    assert (tmp_path / "e.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]
    with pytest.raises(FileNotFoundError, match="path='.*nothere.npz'"):
        load_embeddings(tmp_path / "nothere.npz")


def test_embed_dataset_with_a_toy_backbone(tmp_path):
    ds = load_pods(make_toy_pods(tmp_path / "toy"), progress=False)
    backbone = ToyColourBackbone()
    emb = embed_dataset(backbone, ds, batch_size=7, progress=False)  # 66 images: the last batch is partial
    records = ds.select(split="train") + ds.select(split="test")
    assert emb["embeddings"].shape == (len(records), backbone.global_dim) and emb["embeddings"].dtype == np.float32
    assert emb["image_ids"].tolist() == [r.image_id for r in records]
    assert emb["labels"].tolist() == [r.cls for r in records]
    assert emb["test_splits"].tolist() == [r.test_split or "" for r in records]
    assert dict(zip(emb["class_names"], emb["class_splits"])) == ds.class_to_split
    assert str(emb["backbone"]) == backbone.name
    expected, _ = backbone.embed([ds.load_image(r) for r in records[:3]])
    assert np.array_equal(emb["embeddings"][:3], expected.numpy())
    assert np.array_equal(embed_dataset(backbone, ds, batch_size=100, progress=False)["embeddings"], emb["embeddings"])
    summary = summarize(evaluate_global(emb))
    assert (summary["pr_auc"] > summary["pr_auc_chance"]).all()


def test_embed_dataset_checks_the_backbone_output(tmp_path):
    ds = load_pods(make_toy_pods(tmp_path / "toy", n_categories=1, n_classes=2), progress=False)

    class Dropping(ToyColourBackbone):
        def embed(self, images, *, batch_size=32):
            g, d = super().embed(images, batch_size=batch_size)
            return g[:-1], d[:-1]

    with pytest.raises(ValueError, match="returned .* embeddings for .* images"):
        embed_dataset(Dropping(), ds, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        embed_dataset(ToyColourBackbone(), ds, batch_size=0, progress=False)
