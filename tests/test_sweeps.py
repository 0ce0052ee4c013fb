"Sweeps: the DVC queue on a tiny DVC project, the papermill grid runner, names checked before anything runs."
import json
import os
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from perrep.sweeps import gather_experiments, grid, queue_sweep, queue_status, run_grid, run_queue

STAGE = "python -c \"import json, yaml; p = yaml.safe_load(open('params.yaml'))['sweep']; json.dump(dict(score=p['guidance'] * (2 if p['strategy'] == 'llm' else 1)), open('m.json', 'w'))\""


@pytest.fixture
def project(tmp_path):
    "A git + DVC project with one stage reading `sweep.guidance` and `sweep.strategy`."
    run = lambda *a: subprocess.run(a, cwd=tmp_path, check=True, capture_output=True, text=True)
    run("git", "init", "-q"); run("git", "config", "user.email", "t@t"); run("git", "config", "user.name", "t")
    run("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("sweep:\n  guidance: 5.0\n  strategy: llm\n")
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: {json.dumps(STAGE)}\n    params: [sweep]\n    metrics: [m.json: {{cache: false}}]\n")
    run("dvc", "repro", "-q"); run("git", "add", "-A"); run("git", "commit", "-qm", "base")
    return tmp_path


def test_unknown_parameter_fails_before_anything_is_queued(project):
    with pytest.raises(ValueError, match="sweep.guidnce"):
        queue_sweep(grid({"sweep.guidance": [4.0], "sweep.guidnce": [7.5]}), name="typo", cwd=project)
    assert queue_status(project) == {}
    done = subprocess.run(["dvc", "exp", "run", "-S", "sweep.guidnce=4"], cwd=project, capture_output=True, text=True)
    assert done.returncode != 0 and "guidnce" in done.stderr + done.stdout     # DVC refuses it too, one experiment at a time


def test_queue_runs_every_point_and_gathers_their_metrics(project):
    points = grid({"sweep.strategy": ["simple", "llm"], "sweep.guidance": [4.0, 7.5]})
    names = queue_sweep(points, name="gs", cwd=project, run=False)
    assert queue_status(project, workers=True) == ({n: "Queued" for n in names}, 0)
    run_queue(names, cwd=project, poll_s=1.0)                                 # no worker yet: it starts one and waits
    assert queue_status(project) == {n: "Success" for n in names}
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, check=True, capture_output=True, text=True).stdout)
    table = gather_experiments(shown, names=["sweep.strategy", "sweep.guidance"]).set_index("experiment")
    assert set(names) <= set(table.index)
    for name, point in zip(names, points):
        expected = point["sweep.guidance"] * (2 if point["sweep.strategy"] == "llm" else 1)
        assert table.loc[name, "m.json:score"] == expected
        assert table.loc[name, "sweep.strategy"] == point["sweep.strategy"]
    assert table.loc[table["kind"] == "baseline", "m.json:score"].tolist() == [10.0]


def _grid_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1\nb = 'x'\nout_dir = '.'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import json, pathlib\npathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
                                          "json.dump({'value': a * len(b), 'nested': {'a': a}}, open(pathlib.Path(out_dir) / 'metrics.json', 'w'))")]
    nb.metadata["kernelspec"] = {"name": "perrep", "display_name": "perrep", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_notebook_grid_runs_each_point_once_and_gathers(tmp_path):
    notebook = _grid_notebook(tmp_path / "grid.ipynb")
    points = grid({"a": [1, 3], "b": ["x", "yy"]})
    table = run_grid(notebook, points, out_dir=tmp_path / "runs")
    assert table["value"].tolist() == [1, 2, 3, 6] and table["nested.a"].tolist() == [1, 1, 3, 3]
    assert pd.read_csv(tmp_path / "runs/results.csv")["value"].tolist() == [1, 2, 3, 6]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("notebook.ipynb")}
    run_grid(notebook, points, out_dir=tmp_path / "runs")                                   # finished points: not run again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ValueError, match="unknown parameter"):
        run_grid(notebook, grid({"a": [5], "c": [1]}), out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
