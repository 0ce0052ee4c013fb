"perrep.data: the PODS-layout loader refuses every broken input early, naming file and parameter, and never writes."
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from perrep.data import (ANNOS_FILE, INFO_FILE, TEST_SPLITS, PodsLayoutError, box_from_mask, import_pods_parquet,
                         import_pods_zip, load_pods, pods_from_frames)
from perrep.testing import make_toy_pods


def tree_digest(folder: Path) -> str:
    "A hash of every path (files and folders) and every file's bytes under `folder`."
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + (b"/" if p.is_dir() else b":" + p.read_bytes()))
    return h.hexdigest()


@pytest.fixture(scope="module")
def toy_template(tmp_path_factory):
    return make_toy_pods(tmp_path_factory.mktemp("template") / "toy")


@pytest.fixture
def toy(toy_template, tmp_path):
    "A fresh copy of the toy dataset that a test may break."
    return Path(shutil.copytree(toy_template, tmp_path / "toy"))


def load(root, **kw):
    return load_pods(root, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ a good dataset
def test_toy_dataset_loads_with_the_right_counts(toy):
    ds = load(toy)
    assert ds.classes == ["mugs_0", "mugs_1", "mugs_2", "bottles_0", "bottles_1", "bottles_2"]
    assert ds.classes_in("val") == ["mugs_0", "bottles_0"] and len(ds.classes_in("test")) == 4
    assert ds.class_to_sc["bottles_2"] == "bottles" and ds.class_to_idx["mugs_0"] == 0
    assert len(ds.select(split="train")) == 6 * 3
    assert len(ds.select(split="test")) == 6 * 4 * 2
    assert len(ds.select(dense=True)) == 6 * 4 and all(r.split == "test" for r in ds.select(dense=True))
    assert len(ds.select(dense=None)) == 18 + 48 + 24
    for scene in TEST_SPLITS:
        assert len(ds.select(split="test", test_split=scene)) == 6 * 2
    assert len(ds.select(split="test", classes=["mugs_1"], test_split=["pose", "distractors"])) == 4
    assert all(r.test_split is None for r in ds.select(split="train"))
    assert all(r.mask_path is not None for r in ds.select(dense=None))
    assert {r.image_id for r in ds.images} == {r.path.stem for r in ds.images}  # mini-world: image_id = stem
    assert set(ds.captions) == {r.image_id for r in ds.images}
    assert "toy mug" in ds.caption(ds.select(classes=["mugs_2"], split="train")[0])
    rec = ds.select(split="test", classes=["bottles_1"], test_split="pose")[0]
    image, mask = ds.load_image(rec), ds.load_mask(rec)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert mask.dtype == bool and mask.shape == (32, 32) and 0 < mask.sum() < mask.size
    x0, y0, x1, y1 = box_from_mask(mask)
    ys, xs = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
    assert "6 classes (2 val, 4 test)" in repr(ds)


def test_load_is_read_only_and_deterministic(toy):
    before = tree_digest(toy)
    a, b = load(toy), load(toy)
    assert [(r.image_id, r.path, r.mask_path) for r in a.images] == [(r.image_id, r.path, r.mask_path) for r in b.images]
    assert tree_digest(toy) == before


def test_masks_are_first_channel_above_zero(tmp_path):
    root = make_toy_pods(tmp_path / "toy")
    ds = load(root)
    rec = ds.select(split="train")[0]
    rgb = np.zeros((32, 32, 3), np.uint8); rgb[2:5, 3:9, 0] = 7; rgb[20:, :, 1] = 255  # green only: not foreground
    Image.fromarray(rgb).save(rec.mask_path)
    mask = ds.load_mask(rec)
    assert mask.sum() == 3 * 6 and box_from_mask(mask) == (3, 2, 8, 4)


def test_optional_test_masks_and_captions(tmp_path):
    root = make_toy_pods(tmp_path / "toy", test_masks=False, captions=False)
    ds = load(root)
    assert ds.captions is None and all(r.mask_path is None for r in ds.select(split="test"))
    with pytest.raises(ValueError, match="has no mask"): ds.load_mask(ds.select(split="test")[0])
    with pytest.raises(KeyError, match="captions.json"): ds.caption(ds.images[0])


def test_annotation_keys_may_be_paths_names_or_stems(toy):
    annos = json.loads((toy / ANNOS_FILE).read_text())
    by_stem = {p.stem: p for p in toy.rglob("*.jpg")}
    for form in ("relative path", "file name", "class/name"):
        rekeyed = {}
        for stem, anno in annos.items():
            path = by_stem[stem]
            key = {"relative path": path.relative_to(toy).as_posix(), "file name": path.name,
                   "class/name": f"{anno['class']}/{path.name}"}[form]
            rekeyed[key] = anno
        (toy / ANNOS_FILE).write_text(json.dumps(rekeyed))
        ds = load(toy, check_images=False)
        assert len(ds.images) == 90 and set(ds.images[i].image_id for i in range(90)) == set(rekeyed), form


def test_dense_images_may_share_the_annotation_of_their_test_twin(toy):
    "The mini-world writes test_dense/<c>/<stem>.jpg beside test/<c>/<stem>.jpg, with one annotation for both."
    annos = json.loads((toy / ANNOS_FILE).read_text())
    for folder in ("test_dense", "test_dense_masks"):
        for p in sorted((toy / folder).rglob("*_dense_*")):
            p.rename(p.with_name(p.name.replace("_dense_", "_")))  # mugs_1_dense_pose_0.jpg -> mugs_1_pose_0.jpg
    for key in [k for k in annos if "_dense_" in k]: del annos[key]
    (toy / ANNOS_FILE).write_text(json.dumps(annos))
    ds = load(toy)
    dense = ds.select(dense=True)
    assert len(dense) == 24 and {r.image_id for r in dense} <= {r.image_id for r in ds.select(split="test")}
    assert all(r.test_split == annos[r.image_id]["test_split"] for r in dense)
    shutil.copy(toy / "test_dense/mugs_1/mugs_1_pose_0.jpg", toy / "test_dense/mugs_1/mugs_1_pose_0.png")  # two dense, one key
    with pytest.raises(PodsLayoutError, match="both match the key 'mugs_1_pose_0'"):
        load(toy)


def test_repeated_file_names_across_classes(toy):
    "Official layout: every class folder holds 0.jpg, 1.jpg, ... Keys by relative path work; keys by stem are ambiguous."
    annos = json.loads((toy / ANNOS_FILE).read_text())
    by_path = {}
    for folder in ("train", "test", "test_dense"):
        for cls_dir in sorted((toy / folder).iterdir()):
            for i, p in enumerate(sorted(cls_dir.iterdir())):
                new = p.with_name(f"{i}.JPG")  # upper-case extension, as some releases have
                mask = next((toy / f"{folder}_masks" / cls_dir.name).glob(p.stem + ".*"))
                mask.rename(mask.with_name(f"{i}.png"))
                p.rename(new)
                by_path[new.relative_to(toy).as_posix()] = annos[p.stem]
    (toy / "train" / "mugs_0" / "._0.JPG").write_bytes(b"\0\0resource fork")  # macOS debris is not an image
    (toy / ANNOS_FILE).write_text(json.dumps(by_path))
    (toy / "captions.json").unlink()
    ds = load(toy)
    assert len(ds.select(split="train", classes=["mugs_0"])) == 3
    assert ds.select(split="train")[0].image_id == "train/mugs_0/0.JPG"
    (toy / ANNOS_FILE).write_text(json.dumps({k.rsplit("/", 1)[1].split(".")[0]: v for k, v in by_path.items()}))
    with pytest.raises(PodsLayoutError, match="both match the key '0'"):
        load(toy)


# ------------------------------------------------------------------------------------------------ bad inputs
def _unlink(rel):
    return lambda root: (root / rel).unlink()

def _write(rel, data):
    return lambda root: (root / rel).write_bytes(data)

def _truncate(rel):
    return lambda root: (root / rel).write_bytes((root / rel).read_bytes()[:-200])  # header intact, scan data cut

def _edit_json(name, edit):
    def mutate(root):
        obj = json.loads((root / name).read_text()); edit(obj); (root / name).write_text(json.dumps(obj))
    return mutate

def _resize_mask(rel, size):
    return lambda root: Image.new("L", size).save(root / rel)

BAD = {
    "missing train image": (_unlink("train/mugs_1/mugs_1_train_0.jpg"), {}, ["train/mugs_1/", "2 images", "n_train=3"]),
    "extra train image": (lambda r: shutil.copy(r / "train/mugs_1/mugs_1_train_0.jpg", r / "train/mugs_1/extra.jpg"),
                          {}, ["train/mugs_1/", "4 images", "n_train=3"]),
    "n_train disagrees": (lambda r: None, {"n_train": 5}, ["train/mugs_0/", "3 images", "n_train=5"]),
    "undecodable image": (_write("test/bottles_2/bottles_2_pose_0.jpg", b"not a jpeg"), {},
                          ["test/bottles_2/bottles_2_pose_0.jpg", "check_images=True"]),
    "truncated jpeg": (_truncate("test_dense/mugs_2/mugs_2_dense_pose_0.jpg"), {},
                       ["test_dense/mugs_2/mugs_2_dense_pose_0.jpg", "cannot decode", "check_images=True"]),
    "mask of another size": (_resize_mask("train_masks/mugs_2/mugs_2_train_1.png", (20, 32)), {},
                             ["train_masks/mugs_2/mugs_2_train_1.png", "20x32", "train/mugs_2/mugs_2_train_1.jpg", "32x32"]),
    "missing mask": (_unlink("train_masks/bottles_0/bottles_0_train_2.png"), {},
                     ["train/bottles_0/bottles_0_train_2.jpg", "train_masks/bottles_0/", "expected one mask"]),
    "missing test folder": (lambda r: shutil.rmtree(r / "test"), {}, ["missing folder test/"]),
    "missing train folder": (lambda r: shutil.rmtree(r / "train"), {}, ["missing folder train/"]),
    "missing train_masks folder": (lambda r: shutil.rmtree(r / "train_masks"), {}, ["missing folder train_masks/"]),
    "missing pods_info.json": (_unlink(INFO_FILE), {}, ["missing metadata file pods_info.json"]),
    "missing annotations": (_unlink(ANNOS_FILE), {}, ["missing metadata file pods_image_annos.json"]),
    "invalid json": (_write(INFO_FILE, b"{'classes': "), {}, ["pods_info.json is not valid JSON"]),
    "missing info key": (_edit_json(INFO_FILE, lambda o: o.pop("class_to_split")), {}, ["pods_info.json has no 'class_to_split'"]),
    "class missing from a mapping": (_edit_json(INFO_FILE, lambda o: o["class_to_sc"].pop("mugs_2")), {},
                                     ["pods_info.json", "'class_to_sc' has no entry for class 'mugs_2'"]),
    "bad class split": (_edit_json(INFO_FILE, lambda o: o["class_to_split"].update(mugs_2="holdout")), {},
                        ["'class_to_split'", "'holdout'"]),
    "class without folder": (lambda r: shutil.rmtree(r / "test/bottles_1"), {},
                             ["class 'bottles_1' of pods_info.json has no folder test/bottles_1/"]),
    "folder of an unknown class": (lambda r: (r / "train/mugs_1").rename(r / "train/mugs_one"), {},
                                   ["train/ has class folders not in pods_info.json", "mugs_one", "train/mugs_1/"]),
    "image without annotation": (_edit_json(ANNOS_FILE, lambda o: o.pop("mugs_0_pose_1")), {},
                                 ["test/mugs_0/mugs_0_pose_1.jpg has no annotation in pods_image_annos.json"]),
    "annotation of another class": (_edit_json(ANNOS_FILE, lambda o: o["mugs_0_pose_1"].update({"class": "mugs_1"})), {},
                                    ["pods_image_annos.json['mugs_0_pose_1']", "test/mugs_0/mugs_0_pose_1.jpg", "expected class 'mugs_0'"]),
    "unknown test split": (_edit_json(ANNOS_FILE, lambda o: o["mugs_0_pose_1"].update(test_split="sideways")), {},
                           ["pods_image_annos.json['mugs_0_pose_1']", "'sideways'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_early_naming_file_and_parameter(toy, case):
    mutate, kwargs, expected = BAD[case]
    mutate(toy)
    before = tree_digest(toy)
    with pytest.raises(PodsLayoutError) as info:
        load(toy, **kwargs)
    message = str(info.value)
    for text in expected: assert text in message, f"{case}: {text!r} not in\n{message}"
    assert f"load_pods(root='{toy}'" in message
    assert tree_digest(toy) == before  # nothing touched or written


def test_every_problem_is_reported_at_once(toy):
    for case in ("missing train image", "undecodable image", "mask of another size", "image without annotation"):
        BAD[case][0](toy)
    with pytest.raises(PodsLayoutError) as info:
        load(toy)
    assert len(info.value.problems) == 4, info.value.problems


def test_truncated_image_passes_only_without_check_images(toy):
    _truncate("test/mugs_1/mugs_1_pose_0.jpg")(toy)
    assert len(load(toy, check_images=False).images) == 90  # headers are fine
    with pytest.raises(PodsLayoutError, match="check_images=True"):
        load(toy)


def test_root_must_be_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="root is not a folder"):
        load(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ the zip
def _zip(src: Path, dst: Path, top: str = "", extra: dict | None = None) -> Path:
    with zipfile.ZipFile(dst, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file(): zf.write(p, top + p.relative_to(src).as_posix())
        for name, data in (extra or {}).items(): zf.writestr(name, data)
    return dst


def _same_dataset(a, b):
    key = lambda r: (r.image_id, r.path.relative_to(r.path.parents[2]), r.cls, r.split, r.test_split, r.dense, r.path.read_bytes())
    assert [key(r) for r in a.images] == [key(r) for r in b.images]
    assert (a.classes, a.class_to_split, a.class_to_sc, a.class_to_idx) == (b.classes, b.class_to_split, b.class_to_sc, b.class_to_idx)


@pytest.mark.parametrize("top", ["", "pods/", "data/PODS/"])
def test_zip_round_trip(toy_template, tmp_path, top):
    archive = _zip(toy_template, tmp_path / "pods.zip", top, {f"__MACOSX/{top}._pods_info.json": b"\0"})
    ds = import_pods_zip(archive, tmp_path / "out", progress=False)
    _same_dataset(ds, load(toy_template))
    assert tree_digest(tmp_path / "out") == tree_digest(toy_template)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pods.zip"]  # no .partial left


def test_zip_with_a_broken_dataset_leaves_nothing(toy, tmp_path):
    (toy / "train/mugs_1/mugs_1_train_0.jpg").unlink()
    archive = _zip(toy, tmp_path / "pods.zip", "pods/")
    with pytest.raises(PodsLayoutError, match="n_train=3"):
        import_pods_zip(archive, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pods.zip", "toy"]


def test_zip_refuses_to_overwrite_and_unsafe_names(toy_template, tmp_path):
    archive = _zip(toy_template, tmp_path / "pods.zip")
    (tmp_path / "out").mkdir(); (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out_dir exists"):
        import_pods_zip(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    evil = _zip(toy_template, tmp_path / "evil.zip", extra={"../escape.txt": b"x"})
    with pytest.raises(ValueError, match="outside out_dir"):
        import_pods_zip(evil, tmp_path / "out2", progress=False)
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="zip_path is not a readable zip"):
        import_pods_zip(tmp_path / "fake.zip", tmp_path / "out3", progress=False)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


# ------------------------------------------------------------------------------------------------ the parquet export
def _frames(ds):
    "The toy dataset as the rows of the HF parquet export (image/mask structs, label, scene_type)."
    def rows(**kw):
        return pd.DataFrame([dict(image={"bytes": r.path.read_bytes(), "path": None},
                                  mask=None if r.mask_path is None else {"bytes": r.mask_path.read_bytes(), "path": None},
                                  label=r.cls, scene_type="train" if r.split == "train" else r.test_split.replace("_", " ").title())
                             for r in ds.select(**kw)])
    return {"train": rows(split="train"), "test": rows(split="test"), "test_dense": rows(dense=True)}


def test_parquet_rows_round_trip(toy_template, tmp_path):
    ds = load(toy_template)
    out = pods_from_frames(_frames(ds), tmp_path / "out", pods_info=toy_template / INFO_FILE, progress=False)
    for kw in (dict(split="train"), dict(split="test"), dict(dense=True)):
        assert [(r.cls, r.test_split, r.path.read_bytes(), r.mask_path.read_bytes()) for r in out.select(**kw)] == \
               [(r.cls, r.test_split, r.path.read_bytes(), r.mask_path.read_bytes()) for r in ds.select(**kw)]
    assert (out.class_to_split, out.class_to_idx, out.class_to_sc) == (ds.class_to_split, ds.class_to_idx, ds.class_to_sc)
    assert out.images[0].image_id == "mugs_0_train_0000"


def test_parquet_rows_without_pods_info_warn_and_derive(toy_template, tmp_path):
    frames = _frames(load(toy_template))
    frames["test"]["mask"] = None  # real PODS: no test masks
    with pytest.warns(UserWarning, match="all 6 classes 'test'"):
        out = pods_from_frames(frames, tmp_path / "out", progress=False)
    assert out.classes == sorted(out.classes) and set(out.class_to_split.values()) == {"test"}
    assert out.class_to_sc["bottles_1"] == "bottles"
    assert all(r.mask_path is None for r in out.select(split="test")) and not (tmp_path / "out" / "test_masks").exists()


def _set_cell(split, row, column, value):
    def mutate(frames):
        frames[split][column] = [value if i == row else v for i, v in enumerate(frames[split][column])]
    return mutate


@pytest.mark.parametrize("break_it, expected", [
    (_set_cell("test", 0, "scene_type", "upside down"), ["split 'test'", "scene_type", "upside_down"]),
    (lambda f: f.update(train=f["train"].drop(columns=["mask"])), ["split 'train' lacks column(s) ['mask']"]),
    (_set_cell("train", 1, "mask", None), ["split 'train'", "1 row(s) have no mask"]),
    (_set_cell("test", 2, "image", {"bytes": b"garbage", "path": None}), ["split 'test' row 2", "not a JPEG or PNG"]),
    (_set_cell("test", 3, "label", "../escape"), ["split 'test' row 3", "'../escape' is not a usable class name"]),
    (lambda f: f.pop("test"), ["split 'test' is missing"]),
], ids=["scene", "column", "mask", "image", "label", "split"])
def test_parquet_rows_bad_input(toy_template, tmp_path, break_it, expected):
    frames = _frames(load(toy_template))
    break_it(frames)
    with pytest.raises(PodsLayoutError) as info:
        pods_from_frames(frames, tmp_path / "out", pods_info=toy_template / INFO_FILE, progress=False)
    for text in expected: assert text in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_parquet_files_need_a_split_in_their_name(tmp_path):
    (tmp_path / "pq").mkdir(); (tmp_path / "pq" / "part-0.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the split of .*part-0.parquet"):
        import_pods_parquet(tmp_path / "pq", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        import_pods_parquet(tmp_path / "empty", tmp_path / "out", progress=False)


def test_parquet_without_engine_fails_clearly_before_writing(tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("pyarrow", "fastparquet") else real_find_spec(name, *a))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for split in ("train", "test", "test_dense"): (tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet").write_bytes(b"")
    with pytest.raises(ImportError, match="needs pyarrow or fastparquet"):
        import_pods_parquet(tmp_path / "pq", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pq"]


def test_parquet_files_round_trip(toy_template, tmp_path):
    ds = load(toy_template)
    for split, frame in _frames(ds).items():
        (tmp_path / "pq" / "data").mkdir(parents=True, exist_ok=True)
        frame.to_parquet(tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet")
    out = import_pods_parquet(tmp_path / "pq", tmp_path / "out", pods_info=toy_template / INFO_FILE, progress=False)
    assert [r.path.read_bytes() for r in out.images] == [r.path.read_bytes() for r in ds.images]
