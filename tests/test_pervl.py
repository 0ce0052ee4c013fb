"perrep.pervl: ConCon-Chi and PerVL-DeepFashion2 load into one checked format; malformed inputs fail naming the file and the part."
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from perrep.pervl import SearchBenchmark, check_benchmark, load_conconchi, load_deepfashion2, wearing_query

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CC, DF = FIXTURES / "conconchi", FIXTURES / "deepfashion2"


def img(*numbers): return [f"data/images/IMG_{n:04d}.jpeg" for n in numbers]
def df2(*names): return [f"train/image/{n}.jpg" for n in names]


def copy(src, tmp_path):
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_conconchi_pool_queries_and_train_images():
    bench = load_conconchi(CC)
    assert bench.name == "conconchi" and bench.root == CC
    assert bench.concepts == ["0", "1", "2"] and bench.class_names == {"0": "", "1": "", "2": ""}
    assert bench.train == {"0": img(1, 2, 5), "1": img(3), "2": img(4)}           # two train records of concept 0, in order
    assert bench.pool == img(11, 12, 13, 14, 15, 16, 17)                          # IMG_0012 is in two records: once here
    assert len(set(bench.pool)) == len(bench.pool)
    context = [q for q in bench.queries if q["kind"] == "context"]
    assert [q["query"] for q in context] == ["* sitting on an office chair", "* next to a keyboard", "* on the sofa",
                                             "* standing beside *", "* on a pot on the stove"]
    assert "* inside the fridge" not in [q["query"] for q in bench.queries]        # the negative record
    assert img(15)[0] in bench.pool                                                # ... whose image stays in the pool
    assert context[0]["relevant"] == img(11, 12, 17)          # + ADDITIONAL GTS in the pool; IMG_0001 (train) is not
    assert context[3]["concepts"] == ["2", "0"]                # CONCEPTS [2, 0]: placeholder order kept
    assert [q["relevant"] for q in context[1:]] == [img(12), img(13, 14), img(16), img(17)]
    only = [q for q in bench.queries if q["kind"] == "concept-only"]
    assert [q["query"] for q in only] == ["An image of *"] * 3
    assert {q["concepts"][0]: q["relevant"] for q in only} == {"0": img(11, 12), "1": img(13, 14, 15), "2": img(17)}
    assert bench.captions == {}
    for image_id in bench.pool + [i for ids in bench.train.values() for i in ids]:
        image = bench.load_image(image_id)
        assert image.mode == "RGB" and image.size == (8, 8)


def test_conconchi_captions(tmp_path):
    bench = load_conconchi(CC, captions_file=CC / "conconchi_llava_captions.json")
    assert sorted(bench.captions) == bench.pool and bench.captions[img(11)[0]] == "A doll is sitting in a black office chair."
    records = tmp_path / "captions.json"
    records.write_text(json.dumps([{"image": img(16)[0], "caption": "A bird and a doll."}]))
    assert load_conconchi(CC, captions_file=records).captions == {img(16)[0]: "A bird and a doll."}
    records.write_text(json.dumps([["data/images/IMG_0016.jpeg", "A bird and a doll."]]))
    with pytest.raises(ValueError, match="expected {image path: caption} or a list"): load_conconchi(CC, captions_file=records)
    records.write_text(json.dumps({"IMG_0016.jpeg": "A bird and a doll."}))
    with pytest.raises(ValueError, match="no caption for any pool image; expected keys like 'data/images/IMG_0011.jpeg'"):
        load_conconchi(CC, captions_file=records)
    with pytest.raises(FileNotFoundError, match="nothing.json not found"): load_conconchi(CC, captions_file=tmp_path / "nothing.json")


def test_deepfashion2_queries_class_names_and_splits():
    bench = load_deepfashion2(DF)
    assert bench.name == "deepfashion2-test" and bench.concepts == ["10071", "221", "993"]
    assert bench.class_names == {"10071": "long sleeve top", "221": "skirt", "993": ""}
    assert bench.train == {"10071": df2("127479", "127481"), "221": df2("002631"), "993": df2("012286", "012287")}
    assert bench.pool == df2("127485", "127494", "002648", "012289", "012294")
    context = [q for q in bench.queries if q["kind"] == "context"]
    assert [q["query"] for q in context] == [
        "the person wearing * is posing on stairs.",
        "behind a person wearing *, another person is at a desk.",       # the first "person" only
        "a person wearing * stands by a tan wall.",
        "a person wearing * is standing on a yellow block of a multi-colored floor covering.",   # no shortened caption
        "a green floor tile with *."]                                     # no "person"
    assert [(q["concepts"], q["relevant"]) for q in context] == [([c], [i]) for c, i in zip(["10071", "10071", "221", "993", "993"], bench.pool)]
    only = {q["concepts"][0]: q["relevant"] for q in bench.queries if q["kind"] == "concept-only"}
    assert only == {"10071": df2("127485", "127494"), "221": df2("002648"), "993": df2("012289", "012294")}
    assert bench.captions == {}
    for image_id in bench.pool + [i for ids in bench.train.values() for i in ids]:
        assert bench.load_image(image_id).size == (8, 8)
    val = load_deepfashion2(DF, split="validation")
    assert val.concepts == ["221", "993"] and val.pool == df2("002648", "012294") and val.train["993"] == df2("012286")


def test_wearing_query():
    assert wearing_query("a person poses.") == "a person wearing * poses."
    assert wearing_query("the posing person's backdrop is red.") == "the posing person wearing *'s backdrop is red."
    assert wearing_query("a personal touch") == "a personal touch with *"


def test_check_benchmark_rejects_inconsistent_parts():
    bench = load_conconchi(CC)
    q = bench.queries[0]
    with pytest.raises(ValueError, match=r"conconchi: query 0 '\* sitting on an office chair' has relevant ids \['data/images/IMG_0001.jpeg'\] that are not in the pool"):
        check_benchmark(replace(bench, queries=[{**q, "relevant": img(1)}]))
    with pytest.raises(ValueError, match="has 1 `\\*` for concepts \\['0', '1'\\]"):
        check_benchmark(replace(bench, queries=[{**q, "concepts": ["0", "1"]}]))
    with pytest.raises(ValueError, match="names unknown concepts \\['9'\\]"): check_benchmark(replace(bench, queries=[{**q, "concepts": ["9"]}]))
    with pytest.raises(ValueError, match="train lacks \\['2'\\]"): check_benchmark(replace(bench, train={"0": img(1), "1": img(3)}))
    with pytest.raises(ValueError, match="query 8 'An image of \\*' of concepts \\['0'\\] has no relevant image"):
        check_benchmark(replace(bench, queries=bench.queries + [{**bench.queries[5], "relevant": []}]))
    empty = SearchBenchmark(name="empty", root=CC, concepts=["0"], class_names={"0": ""}, train={"0": img(1)}, pool=[], queries=[])
    with pytest.raises(ValueError, match="empty: the pool \\(0 ids\\) is empty"): check_benchmark(empty)


def test_conconchi_bad_inputs_fail_clearly(tmp_path):
    root = copy(CC, tmp_path)
    test_json = root / "data" / "annotations" / "test.json"
    edit_json(test_json, lambda d: d["data"][2].update(LABEL="* on the sofa next to *"))
    with pytest.raises(ValueError, match="query 2 '\\* on the sofa next to \\*' has 2 `\\*` for concepts \\['1'\\]; expected one `\\*` per concept"):
        load_conconchi(root)
    edit_json(test_json, lambda d: d["data"][2].update(LABEL="* on the sofa", CONCEPTS=[3]))
    with pytest.raises(ValueError, match=f"{test_json}: record 2 has CONCEPTS=\\[3\\]; expected indices into its 3 `concepts`"):
        load_conconchi(root)
    edit_json(test_json, lambda d: d["data"][2].update(CONCEPTS=[1]) or d["data"][0].pop("ADDITIONAL GTS"))
    with pytest.raises(ValueError, match="record 0 lacks \\['ADDITIONAL GTS'\\]"): load_conconchi(root)
    edit_json(test_json, lambda d: d["data"][0].update({"ADDITIONAL GTS": []}) or d["concepts"][0].update(coarse="a puppet"))
    with pytest.raises(ValueError, match="train.json and test.json list different `concepts`"): load_conconchi(root)
    test_json.write_text("{not json")
    with pytest.raises(ValueError, match="test.json: not valid JSON"): load_conconchi(root)
    test_json.unlink()
    with pytest.raises(FileNotFoundError, match=f"load_conconchi: {test_json} not found"): load_conconchi(root)
    shutil.copy(CC / "data" / "annotations" / "test.json", test_json)
    assert load_conconchi(root).pool == img(11, 12, 13, 14, 15, 16, 17)
    (root / "data" / "images" / "IMG_0016.jpeg").unlink()
    with pytest.raises(FileNotFoundError, match="conconchi: 1 of 12 images missing under .*IMG_0016.jpeg"): load_conconchi(root)


def test_deepfashion2_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="split='train'; expected one of \\('test', 'validation'\\)"): load_deepfashion2(DF, split="train")
    root = copy(DF, tmp_path)
    ann = root / "annotations"
    (ann / "shortened_deepfashion2_captions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=f"{ann / 'shortened_deepfashion2_captions.csv'} not found"): load_deepfashion2(root)
    shutil.copy(DF / "annotations" / "shortened_deepfashion2_captions.csv", ann)
    moved = tmp_path / "pervl"
    shutil.move(ann, moved)
    with pytest.raises(FileNotFoundError, match="test_fsl_train.txt not found"): load_deepfashion2(root)
    assert load_deepfashion2(root, annotations=moved).concepts == ["10071", "221", "993"]
    (moved / "test_fsl_train.txt").write_text("127479.jpg\ncodes_infer/10071:\n127481.jpg\n")
    with pytest.raises(ValueError, match="line 1 '127479.jpg' comes before any 'codes_infer/<pair_id>:' line"): load_deepfashion2(root, annotations=moved)
    (moved / "test_fsl_train.txt").write_text("codes_infer/10071:\n127481.jpg\n\ncodes_infer/221:\n002631.jpg\n")
    with pytest.raises(ValueError, match="deepfashion2-test: query 3 .* names unknown concepts \\['993'\\]"): load_deepfashion2(root, annotations=moved)
    (moved / "test_captions.csv").write_text("image,pair_id,caption\ntrain/image/002648.jpg,221,a person stands.\n")
    with pytest.raises(ValueError, match="test_captions.csv: columns \\['image_name'\\] missing"): load_deepfashion2(root, annotations=moved)
    (moved / "test_captions.csv").write_text("image_name,pair_id,caption\ntrain/image/002648.jpg,221\n")
    with pytest.raises(ValueError, match="rows \\[2\\] have too few fields"): load_deepfashion2(root, annotations=moved)
    (moved / "test_captions.csv").write_text("image_name,pair_id,caption\ntrain/image/999999.jpg,10071,a person sits.\ntrain/image/002648.jpg,221,a person stands.\n")
    with pytest.raises(FileNotFoundError, match="images missing under .*999999.jpg"): load_deepfashion2(root, annotations=moved)
