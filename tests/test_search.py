"perrep.search: metrics equal their definitions, groups are scored apart, and the mini-world benchmark is consistent."
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from perrep.pervl import SearchBenchmark
from perrep.search import caption_recall, evaluate_search, load_benchmark, relevant_ranks, search_metrics, world_benchmark
from perrep.world import WorldConfig, build_world, copy_background_sources


def direct(scores, relevant, k):
    "Reciprocal rank, average precision and hit@k of one query, straight from the definitions (ties broken by index)."
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ranks = [r + 1 for r, i in enumerate(order) if relevant[i]]
    return 1 / ranks[0], sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks), float(ranks[0] <= k)


def test_metrics_equal_their_definitions_and_sklearn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (20, 30), generator=g).float()                  # many ties: the stable order decides
    relevant = torch.rand(20, 30, generator=g) < 0.2
    relevant[:, 5] = True
    got = search_metrics(relevant_ranks(scores, relevant), recall_at=(3,))
    want = np.array([direct(scores[q].tolist(), relevant[q].tolist(), 3) for q in range(20)]).mean(0) * 100
    np.testing.assert_allclose([got["mrr"], got["map"], got["recall@3"]], want, rtol=1e-12)
    untied = torch.rand(20, 30, generator=g)
    ap = search_metrics(relevant_ranks(untied, relevant))["map"]
    assert ap == pytest.approx(100 * np.mean([average_precision_score(relevant[q], untied[q]) for q in range(20)]), rel=1e-9)
    with pytest.raises(ValueError, match="differ"):
        relevant_ranks(scores, relevant[:, :10])


class ByConcept:
    "A stand-in encoder: the sum of its concepts' directions."
    def __init__(self, directions): self.directions = directions
    def encode(self, queries, concepts):
        assert all(q.count("*") <= len(cs) for q, cs in zip(queries, concepts))
        return F.normalize(torch.stack([sum((self.directions[c] for c in cs), torch.full((3,), 0.05)) for cs in concepts]), dim=-1)


def test_groups_are_scored_apart_and_caption_recall_applies_each_concept():
    bench = SearchBenchmark(name="t", root=Path("."), concepts=["a", "b"], class_names={"a": "", "b": ""}, train={"a": ["x"], "b": ["y"]},
                            pool=["p0", "p1", "p2"],
                            queries=[dict(query="* here", concepts=["a"], kind="context", relevant=["p1"]),
                                     dict(query="* and *", concepts=["a", "b"], kind="context", relevant=["p2"]),
                                     dict(query="an image of *", concepts=["b"], kind="concept-only", relevant=["p0"])])
    pool = torch.eye(3)
    result = evaluate_search(ByConcept({"a": torch.eye(3)[1], "b": torch.eye(3)[0]}), bench, pool)
    assert result["context-single"]["mrr"] == 100.0 and result["concept-only"]["mrr"] == 100.0
    assert result["context-multi"]["mrr"] == pytest.approx(100 / 3)             # "a + b" lies between p1 and p0: its image p2 comes third
    assert result["context"]["queries"] == 2 and result["context-single"]["queries"] == 1
    recalls = caption_recall(ByConcept({"a": torch.eye(3)[1]}), ["c0", "c1", "c2"], pool, concepts=[None, "a"], ks=(1,))
    assert recalls[0]["recall@1"] < 100.0 and len(recalls) == 2
    with pytest.raises(ValueError, match="2 pool embeddings"):
        evaluate_search(ByConcept({}), bench, pool[:2])


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    bg = copy_background_sources(tmp / "backgrounds")[0].parent
    config = WorldConfig(image_size=64, n_personal=2, n_val=1, n_train=3, test_per_scene=1, dense_per_scene=0, n_pool=2, pool_images=1, n_twins=1)
    return build_world(out_dir=tmp / "world", background_dir=bg, config=config, progress=False), bg, tmp


def test_world_benchmark_relevance_is_what_each_image_shows(tiny_world):
    world, bg, tmp = tiny_world
    bench = world_benchmark(world, split="test", out_dir=tmp / "bench", background_dir=bg, contexts_per_pair=2, images_per_context=2, progress=False)
    shows = {}                                                                    # image -> its instances, from the file names and the world
    for q in bench.queries:
        if q["kind"] == "concept-only":
            for image in q["relevant"]: shows.setdefault(image, set()).add(q["concepts"][0])
    assert set(shows) == set(bench.pool)                                          # every pool image shows some instance
    pairs = [p for p in bench.pool if p.startswith("pairs/")]
    assert len(pairs) == 2 * 2 * 2 and all(len(shows[p]) == 2 for p in pairs)
    for q in bench.queries:
        assert all(set(q["concepts"]) <= shows[i] for i in q["relevant"])
        if q["kind"] == "context" and len(q["concepts"]) == 2:
            assert q["query"].startswith("a photo of * and * ") and all(i.startswith("pairs/") for i in q["relevant"])
    before = {p: (bench.root / p).stat().st_mtime_ns for p in pairs}
    again = world_benchmark(world, split="test", out_dir=tmp / "bench", background_dir=bg, contexts_per_pair=2, images_per_context=2, progress=False)
    assert again.queries == bench.queries and {p: (bench.root / p).stat().st_mtime_ns for p in pairs} == before   # resumed: nothing redrawn
    assert load_benchmark(tmp / "bench").pool == bench.pool
    with pytest.raises(ValueError, match="contexts_per_pair=0"):
        world_benchmark(world, split="test", out_dir=tmp / "other", background_dir=bg, contexts_per_pair=0, progress=False)
    with pytest.raises(FileNotFoundError, match="no benchmark"):
        load_benchmark(tmp / "nothing")
