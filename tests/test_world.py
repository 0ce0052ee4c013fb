"The mini-world (perrep.world, perrep.objects): determinism, resumability, near-twins, exact masks, captions, layout, bad input."
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import perrep.world as world_module
from perrep.objects import EDGE_PX, SINGULAR, Instance, color_name
from perrep.world import (BACKGROUND_PHRASES, BACKGROUND_SOURCES, SCENES, Backgrounds, WorldConfig, build_world,
                          copy_background_sources, plan_scene, render_scene, world_instances)

CI = WorldConfig(image_size=128, n_personal=4, n_val=1, n_train=3, test_per_scene=2, dense_per_scene=1, n_pool=2,
                 pool_images=2, n_twins=1)
METADATA = ["pods_info.json", "pods_image_annos.json", "captions.json", "instances.json", "params.json", "pool/metadata.jsonl"]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bg(tmp_path_factory):
    return copy_background_sources(tmp_path_factory.mktemp("bg") / "backgrounds")[0].parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, bg):
    return build_world(out_dir=tmp_path_factory.mktemp("w") / "world", background_dir=bg, config=CI, progress=False)


def test_same_seed_same_bytes_other_seed_other_images(world, bg, tmp_path):
    again = build_world(out_dir=tmp_path / "again", background_dir=bg, config=CI, progress=False)
    assert files_of(again) == files_of(world)
    other = build_world(out_dir=tmp_path / "other", background_dir=bg, config=dataclasses.replace(CI, seed=1), progress=False)
    images = sorted(p.relative_to(world) for p in world.rglob("*.jpg"))
    assert images and all((other / p).read_bytes() != (world / p).read_bytes() for p in images)


def test_a_killed_build_resumes_to_the_same_bytes_without_rewriting(world, bg, tmp_path, monkeypatch):
    real_write, writes = world_module.write_bytes_atomic, []
    def write_then_die(path, data):
        if len(writes) == 150: raise KeyboardInterrupt  # the process is killed in the middle of the build
        writes.append(path)
        return real_write(path, data)
    monkeypatch.setattr(world_module, "write_bytes_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_world(out_dir=tmp_path / "w", background_dir=bg, config=CI, progress=False)
    monkeypatch.undo()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "w").rglob("*") if p.is_file() and ".partial" not in p.parts}
    assert len(before) == 150 + 1 and (tmp_path / "w/.partial").is_dir()   # 150 images and masks, params.json
    build_world(out_dir=tmp_path / "w", background_dir=bg, config=CI, progress=False)
    assert files_of(tmp_path / "w") == files_of(world)                    # same bytes, no temporary or .partial left
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stamp for p, stamp in before.items())   # not rewritten

    # a finished world that lost some images and its metadata is completed the same way
    lost = sorted((tmp_path / "w/test").rglob("*_pose_*.jpg"))[:5] + [tmp_path / "w" / m for m in METADATA[:4]]
    for path in lost: path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("*.jpg")}
    build_world(out_dir=tmp_path / "w", background_dir=bg, config=CI, progress=False)
    assert files_of(tmp_path / "w") == files_of(world)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


def test_near_twins_in_every_category_differ_in_exactly_one_attribute(world):
    instances = json.loads((world / "instances.json").read_text())
    identity = [f.name for f in dataclasses.fields(Instance) if f.name not in ("name", "twin_of", "twin_attribute")]
    for group in ("personal", "pool"):
        for category in CI.categories:
            twins = [i for i in instances.values() if i["set"] == group and i["category"] == category and i["twin_of"]]
            assert len(twins) == CI.n_twins, (group, category)
            for twin in twins:
                base = instances[twin["twin_of"]]
                assert base["set"] == group and base["twin_of"] is None
                assert [k for k in identity if base[k] != twin[k]] == [twin["twin_attribute"]]
    personal, pool = world_instances(WorldConfig())  # mini sizes: personal and pool identities are all distinct
    specs = [tuple(v for k, v in dataclasses.asdict(i).items() if k in identity) for i in personal + pool]
    assert len(set(specs)) == len(specs)
    assert sum(i.twin_of is not None for i in personal) == 4 * len(CI.categories)


def test_mask_is_exactly_the_visible_target(bg):
    backgrounds = Backgrounds(background_dir=bg, size=CI.image_size)
    personal, pool = world_instances(CI)
    smaller = 0
    for index in range(8):
        scene = plan_scene(seed=0, target=personal[index], kind="distractors", index=index, pool=pool, size=CI.image_size)
        k = next(i for i, p in enumerate(scene.objects) if p.role == "target")
        target = scene.objects[k].instance
        recoloured = dataclasses.replace(target, **{f: tuple((c + 0.5) % 1.0 for c in getattr(target, f)) for f in
                                                    ("body_color", "accent_color", "part_color", "trim_color", "logo_color")})
        other = dataclasses.replace(scene, objects=tuple(dataclasses.replace(p, instance=recoloured) if p.role == "target" else p
                                                         for p in scene.objects))
        image, masks = render_scene(scene, backgrounds=backgrounds)
        image2, masks2 = render_scene(other, backgrounds=backgrounds)
        mask = masks[k]
        changed = (image != image2).any(-1)
        reach = int(np.ceil(EDGE_PX / 2)) + int(3 * scene.blur * CI.image_size / 256 + 0.5) + 1   # soft edge + blur radius
        assert not (changed & ~ndimage.binary_dilation(mask, iterations=reach)).any(), index
        assert (changed & mask).sum() >= 0.95 * mask.sum(), index
        assert all((a == b).all() for a, b in zip(masks, masks2))            # colour does not move the masks
        alone = dataclasses.replace(scene, objects=(scene.objects[k],))
        silhouette = render_scene(alone, backgrounds=backgrounds)[1][0]
        assert not (mask & ~silhouette).any()                                 # the mask is the visible part of the silhouette
        smaller += mask.sum() < silhouette.sum()
    assert smaller >= 2                                                       # occluders do cover part of the target


def test_boxes_are_the_masks_extents_and_masks_are_binary(world):
    captions = json.loads((world / "captions.json").read_text())
    masks = sorted(world.glob("*_masks/*/*.png"))
    assert len(masks) == len(CI.categories) * CI.n_personal * (CI.n_train + 4 * CI.test_per_scene + 4 * CI.dense_per_scene)
    for path in masks:
        mask = np.asarray(Image.open(path))
        image = Image.open(world / path.parent.parent.name.removesuffix("_masks") / path.parent.name / f"{path.stem}.jpg")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255} and mask.shape == image.size[::-1]
        ys, xs = np.nonzero(mask)
        target = [o for o in captions[path.stem]["objects"] if o["role"] == "target"]
        assert [o["box"] for o in target] == [[xs.min(), ys.min(), xs.max(), ys.max()]]


def test_captions_name_category_colour_and_background(world):
    captions = json.loads((world / "captions.json").read_text())
    instances = json.loads((world / "instances.json").read_text())
    for stem, record in captions.items():
        target = instances[next(o["instance"] for o in record["objects"] if o["role"] == "target")]
        text = record["caption"]
        assert SINGULAR[target["category"]] in text and color_name(target["body_color"]) in text, (stem, text)
        assert BACKGROUND_PHRASES[record["background"]] in text, (stem, text)
        for o in record["objects"]:
            if o["role"] == "distractor": assert SINGULAR[o["category"]] in text and " next to " in text, (stem, text)


def test_layout_has_every_folder_and_key(world):
    info = json.loads((world / "pods_info.json").read_text())
    annos = json.loads((world / "pods_image_annos.json").read_text())
    captions = json.loads((world / "captions.json").read_text())
    assert set(info) == {"classes", "class_to_idx", "class_to_sc", "class_to_split"}
    assert info["classes"] == [f"{c}_{i:02d}" for c in CI.categories for i in range(CI.n_personal)]
    assert info["class_to_sc"]["mugs_00"] == "mug" and info["class_to_sc"]["screwdrivers_03"] == "screwdriver"
    assert sorted(info["class_to_split"].values()).count("val") == CI.n_val * len(CI.categories)
    for cls in info["classes"]:
        assert len(list((world / "train" / cls).glob("*.jpg"))) == CI.n_train == len(list((world / "train_masks" / cls).glob("*.png")))
        assert len(list((world / "test" / cls).glob("*.jpg"))) == 4 * CI.test_per_scene
        for dense in (world / "test_dense" / cls).glob("*.jpg"):               # test_dense holds copies of test images
            assert dense.read_bytes() == (world / "test" / cls / dense.name).read_bytes()
            assert (world / "test_dense_masks" / cls / f"{dense.stem}.png").is_file()
    images = {p.stem: p for folder in ("train", "test") for p in (world / folder).glob("*/*.jpg")}
    assert set(annos) == set(images)
    for stem, anno in annos.items():
        assert anno["class"] == images[stem].parent.name and anno["split"] == images[stem].parent.parent.name
        assert anno["test_split"] == (None if anno["split"] == "train" else next(s for s in SCENES[::-1] if f"_{s}_" in stem))
    lines = [json.loads(line) for line in (world / "pool/metadata.jsonl").read_text().splitlines()]
    assert len(lines) == len(CI.categories) * CI.n_pool * CI.pool_images
    assert all((world / "pool" / m["file_name"]).is_file() and m["text"] and m["category"] in m["file_name"] for m in lines)
    assert set(captions) == set(annos) | {Path(m["file_name"]).stem for m in lines}
    assert json.loads((world / "params.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(CI)))
    assert not list(world.rglob(".*"))                                         # no temporary or resume files left


def test_the_layout_loads_as_pods(world):
    from perrep.data import load_pods
    pods = load_pods(world, n_train=CI.n_train, progress=False)
    assert len(pods.classes_in("test")) == (CI.n_personal - CI.n_val) * len(CI.categories)
    assert len(pods.select(split="test", dense=True)) == len(CI.categories) * CI.n_personal * 4 * CI.dense_per_scene


def test_bad_input_fails_clearly_before_writing(bg, tmp_path):
    for bad, name in [(dict(n_val=4, n_personal=4), "n_val"), (dict(n_twins=20), "n_twins"), (dict(image_size=0), "image_size"),
                      (dict(dense_per_scene=9), "dense_per_scene"), (dict(n_pool=0), "n_pool"), (dict(test_per_scene=1.5), "test_per_scene"),
                      (dict(categories=("mugs", "cups")), "categories")]:
        with pytest.raises(ValueError, match=f"WorldConfig.{name}="): WorldConfig(**bad)
    partial = tmp_path / "bg"
    shutil.copytree(bg, partial)
    (partial / Path(BACKGROUND_SOURCES["rocket"].path).name).unlink()
    with pytest.raises(FileNotFoundError, match=r"background_dir=.*bg.* lacks rocket\.jpg"):
        build_world(out_dir=tmp_path / "out", background_dir=partial, config=CI, progress=False)
    with pytest.raises(FileNotFoundError, match="background_dir=.*is not a folder"):
        build_world(out_dir=tmp_path / "out", background_dir=tmp_path / "none", config=CI, progress=False)
    assert not (tmp_path / "out").exists()


def test_another_world_in_out_dir_is_refused_untouched(world, bg):
    before = files_of(world)
    with pytest.raises(FileExistsError, match="out_dir=.*other parameters"):
        build_world(out_dir=world, background_dir=bg, config=dataclasses.replace(CI, seed=5), progress=False)
    assert files_of(world) == before


def test_every_image_has_four_caption_levels_ending_in_its_category(world):
    captions = json.loads((world / "captions.json").read_text())
    instances = json.loads((world / "instances.json").read_text())
    for stem, record in captions.items():
        target = next(o for o in record["objects"] if o["role"] == "target")
        full, where, subject, category = record["captions"]
        assert full == record["caption"] and subject in where and where.startswith("a photo of ")
        assert category == f"a photo of a {SINGULAR[instances[target['instance']]['category']]}", stem
    pool = [json.loads(line) for line in (world / "pool/metadata.jsonl").read_text().splitlines()]
    assert all(row["captions"] == captions[Path(row["file_name"]).stem]["captions"] for row in pool)
