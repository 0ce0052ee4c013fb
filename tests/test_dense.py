"perrep.dense: PRPG's dense tasks, cross-checked against torchmetrics' COCO mAP, direct IoU counts and hand computations."
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.detection.mean_ap import MeanAveragePrecision  # torchmetrics.detection exports it only with torchvision

from perrep.backbones import load_backbone
from perrep.data import TEST_SPLITS, load_pods
from perrep.dense import (DENSE_METRICS, box_features, coco_metrics, dense_features, evaluate_dense, largest_component,
                          mask_cells, predict_dense, reference_feature, rle, segment, similarity_map, threshold_mask)
from perrep.evaluate import embed_dataset, evaluate_global, summarize
from perrep.testing import ToyHistogramBackbone, ToyColourBackbone, make_toy_pods, save_tiny_vision_model




def rect(y, x, h, w, shape=(64, 64)):
    m = np.zeros(shape, bool)
    m[y:y + h, x:x + w] = True
    return m


def disc(cy, cx, r, shape=(64, 64)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def coco_box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def box_pixels(mask):
    x, y, w, h = (int(v) for v in coco_box(mask))
    return rect(y, x, h, w, mask.shape)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_pods(make_toy_pods(tmp_path_factory.mktemp("d") / "toy", n_categories=2, n_classes=3, size=48), progress=False)


# -------------------------------------------------------------------- COCO metrics
def fixed_case():
    "5 images: 3 with the object, 2 without; overlapping, shifted, duplicate and false-positive predictions, distinct scores."
    truth = [dict(image_id="a", mask=rect(5, 5, 20, 24)), dict(image_id="b", mask=disc(40, 40, 12)),
             dict(image_id="c", mask=rect(30, 8, 25, 14)), dict(image_id="d", mask=None), dict(image_id="e", mask=None)]
    preds = [("a", rect(8, 7, 20, 24), 0.9), ("a", disc(15, 17, 9), 0.35), ("b", disc(44, 36, 12), 0.8),
             ("c", rect(30, 8, 25, 14), 0.3), ("d", rect(10, 10, 30, 30), 0.85), ("e", disc(30, 30, 6), 0.2)]
    return [dict(image_id=i, mask=m, box=coco_box(m), score=s) for i, m, s in preds], truth


@pytest.fixture
def torchmetrics_without_torchvision(monkeypatch):
    """torchmetrics' pycocotools path needs only `torchvision.ops.box_convert` (xywh -> xywh here); torchvision is not a
    dependency of this project, so a stand-in is installed for the one test, and its availability flag set."""
    import sys
    import types
    import torchmetrics.detection.mean_ap as mean_ap

    def box_convert(boxes, in_fmt, out_fmt):
        assert (in_fmt, out_fmt) == ("xywh", "xywh"), (in_fmt, out_fmt)
        return boxes
    ops = types.ModuleType("torchvision.ops")
    ops.box_convert = box_convert
    vision = types.ModuleType("torchvision")
    vision.ops = ops
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    monkeypatch.setattr(mean_ap, "_TORCHVISION_AVAILABLE", True)


def torchmetrics_map(preds, truth, iou_type):
    "torchmetrics' {kind: (map, map50)}; boxes and masks are both given, `iou_type` says which it scores."
    metric = MeanAveragePrecision(iou_type=iou_type, box_format="xywh", backend="pycocotools")
    for g in truth:
        mine = [p for p in preds if p["image_id"] == g["image_id"]]
        has = g["mask"] is not None
        metric.update([dict(scores=torch.tensor([p["score"] for p in mine], dtype=torch.float32), labels=torch.ones(len(mine), dtype=torch.long),
                            boxes=torch.tensor([p["box"] for p in mine], dtype=torch.float32).reshape(-1, 4),
                            masks=torch.from_numpy(np.stack([p["mask"] for p in mine])))],
                      [dict(labels=torch.ones(int(has), dtype=torch.long),
                            boxes=torch.tensor([coco_box(g["mask"])] if has else [], dtype=torch.float32).reshape(-1, 4),
                            masks=torch.from_numpy(g["mask"][None]) if has else torch.zeros((0, 64, 64), dtype=torch.bool))])
    out = metric.compute()
    kinds = [iou_type] if isinstance(iou_type, str) else list(iou_type)
    prefix = lambda kind: "" if isinstance(iou_type, str) else f"{kind}_"
    return {kind: (float(out[f"{prefix(kind)}map"]), float(out[f"{prefix(kind)}map_50"])) for kind in kinds}


@pytest.mark.parametrize("iou_type", ["bbox", "segm", ("bbox", "segm")])
def test_coco_metrics_match_torchmetrics(iou_type, torchmetrics_without_torchvision):
    preds, truth = fixed_case()
    if iou_type == "segm":
        # torchmetrics scoring masks alone leaves out the images without a ground-truth mask, and with them their false
        # positives (here image d's, ranked second); scoring both, or boxes alone, it keeps them as COCO does
        truth = [g for g in truth if g["mask"] is not None]
        preds = [p for p in preds if p["image_id"] in {g["image_id"] for g in truth}]
    ours = coco_metrics(preds, truth)
    for kind, (expected_map, expected_map50) in torchmetrics_map(preds, truth, iou_type).items():
        assert 0 < ours[kind]["map"] < ours[kind]["map50"] < 1  # the case is not trivial
        assert ours[kind]["map"] == pytest.approx(expected_map, abs=1e-6), kind
        assert ours[kind]["map50"] == pytest.approx(expected_map50, abs=1e-6), kind


def test_perfect_and_disjoint_predictions():
    _, truth = fixed_case()
    perfect = [dict(image_id=g["image_id"], mask=g["mask"], box=coco_box(g["mask"]), score=0.5 + i / 10) for i, g in enumerate(truth[:3])]
    for kind in ("bbox", "segm"):
        assert coco_metrics(perfect, truth)[kind] == pytest.approx(dict(map=1.0, map50=1.0, f1_50=1.0, f1=1.0), abs=1e-12)
    far = [dict(p, mask=rect(60, 60, 4, 4), box=[60.0, 60.0, 4.0, 4.0]) for p in perfect]
    for kind in ("bbox", "segm"):
        assert coco_metrics(far, truth)[kind] == dict(map=0.0, map50=0.0, f1_50=0.0, f1=0.0)
    assert coco_metrics([], truth)["segm"]["map"] == 0.0
    # masks as RLE are the same masks
    assert coco_metrics([dict(p, mask=rle(p["mask"])) for p in perfect], truth)["segm"]["map"] == pytest.approx(1.0)


def hand_f1(ious, scores, n_gt):
    "PRPG's F1 written out: per IoU threshold, interpolated precision at 101 recall points against the recall reached."
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    ious = np.asarray(ious)[order]
    f1s = []
    for t in np.linspace(0.5, 0.95, 10):
        tp = ious >= t                                  # a negative image's prediction has IoU 0: a false positive
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        recall, precision = ctp / n_gt, ctp / (ctp + cfp)
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        reached = recall[-1]
        p = np.array([precision[np.searchsorted(recall, r, side="left")] if r <= reached else 0.0 for r in np.linspace(0, 1, 101)])
        f1s.append(np.mean(np.where(p + reached > 0, 2 * p * reached / np.maximum(p + reached, 1e-300), 0.0)))
    return f1s[0], float(np.mean(f1s))


def test_f1_equals_a_direct_iou_computation():
    # 40x40 images, every object and prediction under 32² pixels: one COCO area range, one prediction per image
    shape = (40, 40)
    gts = [rect(5, 5, 20, 20, shape), rect(10, 10, 25, 20, shape), disc(20, 20, 12, shape), rect(2, 2, 30, 10, shape),
           rect(8, 8, 16, 16, shape), rect(15, 5, 20, 30, shape)]
    preds = [rect(6, 5, 20, 20, shape), rect(13, 12, 25, 20, shape), disc(22, 21, 12, shape), rect(6, 2, 30, 10, shape),
             rect(14, 14, 16, 16, shape), rect(15, 5, 20, 30, shape)]
    scores = [0.9, 0.6, 0.75, 0.4, 0.95, 0.2]
    negatives = [(rect(0, 0, 10, 10, shape), 0.7), (disc(30, 30, 5, shape), 0.1)]
    truth = [dict(image_id=f"p{i}", mask=m) for i, m in enumerate(gts)] + [dict(image_id=f"n{i}", mask=None) for i in range(2)]
    predictions = [dict(image_id=f"p{i}", mask=m, box=coco_box(m), score=s) for i, (m, s) in enumerate(zip(preds, scores))]
    predictions += [dict(image_id=f"n{i}", mask=m, box=coco_box(m), score=s) for i, (m, s) in enumerate(negatives)]
    iou = lambda a, b: (a & b).sum() / (a | b).sum()
    all_scores = scores + [s for _, s in negatives]
    seg_ious = [iou(p, g) for p, g in zip(preds, gts)] + [0.0, 0.0]
    box_ious = [iou(box_pixels(p), box_pixels(g)) for p, g in zip(preds, gts)] + [0.0, 0.0]
    assert min(abs(v - t) for v in seg_ious + box_ious for t in np.linspace(0.5, 0.95, 10)) > 1e-3  # no IoU on a threshold
    assert len({round(v, 1) for v in seg_ious}) >= 4                                                # IoUs spread over thresholds
    ours = coco_metrics(predictions, truth)
    for kind, ious in (("segm", seg_ious), ("bbox", box_ious)):
        f1_50, f1 = hand_f1(ious, all_scores, n_gt=len(gts))
        assert ours[kind]["f1_50"] == pytest.approx(f1_50, abs=1e-9), kind
        assert ours[kind]["f1"] == pytest.approx(f1, abs=1e-9), kind
        assert 0 < ours[kind]["f1"] < ours[kind]["f1_50"] < 1


def test_coco_metrics_refuses_bad_input():
    preds, truth = fixed_case()
    with pytest.raises(ValueError, match="no ground_truth image holds an object"):
        coco_metrics(preds, [dict(g, mask=None) for g in truth])
    with pytest.raises(ValueError, match="not in ground_truth"):
        coco_metrics(preds, truth[:2])
    with pytest.raises(ValueError, match="appears twice"):
        coco_metrics(preds, truth + truth[:1])
    with pytest.raises(ValueError, match="are empty"):
        coco_metrics(preds, [dict(truth[0], mask=np.zeros((64, 64), bool))] + truth[1:])


# -------------------------------------------------------------------- maps, masks, segmentation
def test_reference_feature_by_hand():
    dense = torch.tensor([[[[3., 0.], [1., 1.]], [[4., 1.], [0., 1.]]],
                          [[[0., 2.], [5., 5.]], [[2., 0.], [5., 0.]]]])       # (2, 2, 2, 2)
    m0 = rect(0, 0, 2, 4, (4, 4))                                            # the top row of cells
    m0[2, 2] = True                                                          # a quarter of cell (1, 1): not enough
    m1 = rect(3, 3, 1, 1, (4, 4))                                            # no cell half covered: the most covered, (1, 1)
    assert mask_cells(m0, (2, 2)).tolist() == [[True, True], [False, False]]
    assert mask_cells(m1, (2, 2)).tolist() == [[False, False], [False, True]]
    cells = np.array([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])                  # unit features of the 3 masked cells
    expected = (cells.mean(0) + cells.max(0)) / 2
    assert reference_feature(dense, [m0, m1]).numpy() == pytest.approx(expected, abs=1e-6)
    # the official choice: the first image only
    assert reference_feature(dense[:1], [m0]).numpy() == pytest.approx((cells[:2].mean(0) + cells[:2].max(0)) / 2, abs=1e-6)
    # box features: the mean unit feature over the box of m1 = cell (1, 1) of image 1
    assert box_features(dense[1:], [m1])[0].numpy() == pytest.approx(cells[2], abs=1e-6)


def test_similarity_map_is_the_cosine_upsampled():
    dense = torch.randn(5, 3, 4)
    reference = torch.randn(5)
    sim = similarity_map(dense, reference, size=(6, 8))
    assert sim.shape == (6, 8) and sim.dtype == np.float32
    cos = F.cosine_similarity(dense, reference[:, None, None], dim=0)        # (3, 4)
    assert similarity_map(dense, reference, size=(3, 4)) == pytest.approx(cos.numpy(), abs=1e-6)
    assert sim.max() <= cos.max().item() + 1e-6 and sim.min() >= cos.min().item() - 1e-6
    with pytest.raises(ValueError, match=r"expected dense \(C, h, w\) and reference \(C,\)"):
        similarity_map(dense, torch.randn(4), size=(6, 8))


def test_otsu_segment_recovers_a_square_and_is_never_empty():
    rng = np.random.default_rng(1)
    sim = rng.normal(0.2, 0.05, (90, 120))
    sim[30:60, 40:85] = rng.normal(0.85, 0.05, (30, 45))
    assert np.array_equal(segment(sim), rect(30, 40, 30, 45, (90, 120)))
    # a hole is filled in the mask; a second, smaller blob is left out of the mask but kept for the box
    holed = sim.copy()
    holed[40:50, 50:70] = 0.2
    holed[70:85, 5:20] = 0.85
    assert np.array_equal(segment(holed), rect(30, 40, 30, 45, (90, 120)))
    assert threshold_mask(holed)[70:85, 5:20].all()
    # never empty: a lone hot pixel (under min_size), a constant map
    speck = np.zeros((50, 50))
    speck[7, 9] = 1.0
    assert np.argwhere(segment(speck)).tolist() == [[7, 9]]
    assert segment(np.full((8, 8), 0.4)).all()
    for seed in range(20):  # random maps: always a non-empty, single component
        mask = segment(np.random.default_rng(seed).random((30, 40)), min_size=100)
        assert mask.any() and np.array_equal(largest_component(mask), mask)


def test_predict_dense_box_and_score():
    # a 4-d feature map: the object (feature e0) in cells (1..2, 1..2) of a 4x4 grid, a distractor e1 elsewhere
    dense = torch.zeros(4, 4, 4)
    dense[2] = 1.0                                   # background: e2
    dense[:, 1:3, 1:3] = torch.tensor([1., 0, 0, 0])[:, None, None]
    reference, train_boxes = torch.tensor([1., 0, 0, 0]), torch.tensor([[0., 1, 0, 0], [1., 0, 0, 0]])
    p = predict_dense(dense, reference=reference, train_boxes=train_boxes, size=(40, 40), min_size=10)
    ys, xs = np.nonzero(p["mask"])
    assert p["box"] == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert 5 < xs.min() <= 15 and 25 <= xs.max() < 35     # bilinear: the edge lies between the cells' centres
    assert p["score"] == pytest.approx(1.0, abs=1e-6)     # the box holds only object cells, as the second train box


# -------------------------------------------------------------------- dense features
def test_dense_features_with_a_transformer_and_a_peft_wrapper(tmp_path, toy):
    import peft
    backbone = load_backbone(str(save_tiny_vision_model(tmp_path / "dino", model_type="dinov2")))
    images = [toy.load_image(r) for r in toy.select(split="train")[:3]]
    backbone.train()
    dense = dense_features(backbone, images, size=56, batch_size=2)
    assert dense.shape == (3, 32, 4, 4) and dense.dtype == torch.float32 and backbone.training
    assert torch.allclose(dense[1:2], dense_features(backbone, images[1:2], size=56), atol=1e-5)  # batching changes nothing
    wrapped = peft.get_peft_model(backbone, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert torch.allclose(dense_features(wrapped, images, size=56), dense, atol=1e-5)             # LoRA starts at zero
    assert torch.allclose(dense_features(wrapped, images, size=56, transform=backbone.transform), dense, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the backbone's patch size 14"):
        dense_features(backbone, images, size=10)
    with pytest.raises(ValueError, match="no .transform"):
        dense_features(torch.nn.Conv2d(3, 4, 1), images, size=8)


# -------------------------------------------------------------------- the whole task
def test_evaluate_dense_on_a_toy_dataset(toy):
    classes = toy.classes_in("test")
    results = evaluate_dense(ToyHistogramBackbone(), toy, classes=classes, size=48, min_size=10, progress=False)
    assert list(results.columns) == ["class", "scene", "metric", "value"]
    assert np.isfinite(results["value"]).all() and results["value"].between(0, 1).all()
    expected = {(c, s, m) for c in classes for s in [*TEST_SPLITS, "overall"] for m in DENSE_METRICS}
    assert set(map(tuple, results[["class", "scene", "metric"]].to_numpy())) == expected and len(results) == len(expected)
    summary = summarize(results)
    assert summary.loc["overall", "det_map50"] > 0.5 and summary.loc["overall", "seg_map50"] > 0.5
    # the rows sit beside the global tasks' rows
    both = summarize(pd.concat([evaluate_global(embed_dataset(ToyColourBackbone(), toy, progress=False)), results]))
    assert {"pr_auc", "ndcg", *DENSE_METRICS} <= set(both.columns) and list(both.index) == [*TEST_SPLITS, "overall"]
    # the official choice of reference (first train image only) runs too; other instances' images only add false positives
    first = evaluate_dense(ToyHistogramBackbone(), toy, classes=classes[:1], size=48, min_size=10, progress=False, reference_images=1)
    own = evaluate_dense(ToyHistogramBackbone(), toy, classes=classes[:1], size=48, min_size=10, progress=False,
                         reference_images=1, negatives=False)
    assert (own["value"].to_numpy() >= first["value"].to_numpy() - 1e-9).all()


def test_evaluate_dense_refuses_bad_input(toy, tmp_path):
    backbone = ToyHistogramBackbone()
    with pytest.raises(ValueError, match=r"classes=\['mugs_9'\] are not classes of"):
        evaluate_dense(backbone, toy, classes=["mugs_9"], size=48)
    with pytest.raises(ValueError, match="expected a non-empty list of class names"):
        evaluate_dense(backbone, toy, classes="mugs_1", size=48)
    with pytest.raises(ValueError, match="reference_images=5"):
        evaluate_dense(backbone, toy, classes=["mugs_1"], size=48, reference_images=5)
    with pytest.raises(ValueError, match="not a multiple of the backbone's patch size"):
        evaluate_dense(backbone, toy, classes=["mugs_1"], size=50, progress=False)
    bare = load_pods(make_toy_pods(tmp_path / "bare", n_categories=1, n_classes=2, n_dense_per_scene=0), progress=False)
    with pytest.raises(ValueError, match="has no test_dense images"):
        evaluate_dense(backbone, bare, classes=bare.classes, size=32)
    from dataclasses import replace
    partial = replace(toy, images=[r for r in toy.images if not (r.dense and r.cls == "mugs_1")])
    with pytest.raises(ValueError, match=r"classes \['mugs_1'\] have no test_dense image"):
        evaluate_dense(backbone, partial, classes=["mugs_1", "mugs_2"], size=48)
