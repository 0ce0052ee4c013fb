"Smoke run of every pipeline stage notebook at `ci` scale, in a temporary folder, through perrep-stage's runner."
import json
import math
from pathlib import Path

import nbformat
import pytest
import yaml

from perrep.pipeline import run_notebook
from perrep.world import copy_background_sources

ROOT = Path(__file__).resolve().parents[1]
SCENES = ["in_distribution", "pose", "distractors", "pose_and_distractors", "overall"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profiles"]["mini"]["dataset"] = str(tmp / "world")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    copy_background_sources(tmp / "backgrounds")
    stage = lambda name, **p: run_notebook(ROOT / f"nbs/pipeline/{name}.ipynb", tmp / f"reports/{name}.ipynb",
                                           parameters=p, cwd=ROOT, progress=False)
    stage("world", seed=0, scale="ci", params_file=str(tmp / "params.yaml"),
          background_dir=str(tmp / "backgrounds"), out_dir=str(tmp / "world"))
    stage("embed", profile="mini", params_file=str(tmp / "params.yaml"), batch_size=16, threads=1,
          out_path=str(tmp / "embeddings/pretrained.npz"))
    stage("evaluate", profile="mini", params_file=str(tmp / "params.yaml"), classes="test",
          embeddings_path=str(tmp / "embeddings/pretrained.npz"), out_dir=str(tmp / "baseline"))
    stage("report", profile="mini", params_file=str(tmp / "params.yaml"), results_dir=str(tmp / "baseline"),
          embeddings_path=str(tmp / "embeddings/pretrained.npz"), figure_path=str(tmp / "baseline/per_scene.png"))
    return tmp


def test_stages_write_their_declared_outputs(run):
    for path in ["world/pods_info.json", "world/params.json", "embeddings/pretrained.npz",
                 "embeddings/pretrained.npz.params.json", "baseline/metrics.json", "baseline/per_instance.csv",
                 "baseline/per_scene.csv", "baseline/per_scene.png", "reports/report.ipynb"]:
        assert (run / path).is_file(), path


def test_metrics_cover_every_scene_and_metric(run):
    metrics = json.loads((run / "baseline/metrics.json").read_text())
    for scene in SCENES:
        for metric in ["pr_auc", "ndcg", "mrr", "top10", "pr_auc_chance"]:
            value = metrics[scene][metric]
            assert 0.0 <= value <= 1.0 and not math.isnan(value), (scene, metric, value)
        assert metrics[scene]["pr_auc"] > metrics[scene]["pr_auc_chance"], scene  # a real backbone beats chance


def test_report_shows_table_and_figure_without_errors(run):
    nb = nbformat.read(run / "reports/report.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the report shows no figure"
    assert any("text/html" in o.get("data", {}) for o in outputs), "the report shows no table"


def test_rerun_stages_write_identical_bytes(run, tmp_path):
    "The committed dvc.lock holds only if a forced rerun reproduces every output byte for byte."
    params = yaml.safe_load((run / "params.yaml").read_text())
    stage = lambda name, **p: run_notebook(ROOT / f"nbs/pipeline/{name}.ipynb", tmp_path / f"{name}.ipynb",
                                           parameters=p, cwd=ROOT, progress=False)
    stage("evaluate", profile="mini", params_file=str(run / "params.yaml"), classes="test",
          embeddings_path=str(run / "embeddings/pretrained.npz"), out_dir=str(tmp_path / "baseline"))
    stage("report", profile="mini", params_file=str(run / "params.yaml"), results_dir=str(tmp_path / "baseline"),
          embeddings_path=str(run / "embeddings/pretrained.npz"), figure_path=str(tmp_path / "baseline/per_scene.png"))
    assert params["profiles"]["mini"]["dataset"] == str(run / "world")
    for name in ("metrics.json", "per_instance.csv", "per_scene.csv", "per_scene.png"):
        assert (tmp_path / "baseline" / name).read_bytes() == (run / "baseline" / name).read_bytes(), name
    strip = lambda text: text.replace(str(tmp_path / "baseline"), "X").replace(str(run / "baseline"), "X")
    assert strip((tmp_path / "report.ipynb").read_text()) == strip((run / "reports/report.ipynb").read_text())

