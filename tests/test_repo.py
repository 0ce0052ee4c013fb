"The repository's own contracts: notebooks are the source, stages call notebooks with parameters they define."
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from perrep.pipeline import notebook_parameters

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_project(dst: Path) -> Path:
    for name in ("settings.ini", "pyproject.toml"): shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "nbs", dst / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT / "perrep", dst / "perrep", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_nbdev_export_leaves_no_diff(tmp_path):
    work = _copy_project(tmp_path)
    subprocess.run([BIN / "nbdev_export"], cwd=work, check=True, capture_output=True)
    exported, committed = _tree(work / "perrep"), _tree(ROOT / "perrep")
    assert exported.keys() == committed.keys(), "perrep/ has files the notebooks do not export (or lacks some)"
    changed = [name for name in exported if exported[name] != committed[name]]
    assert not changed, f"perrep/ differs from what nbs/ exports: {changed}; run `make export`"


def test_nbdev_clean_leaves_no_diff(tmp_path):
    work = _copy_project(tmp_path)
    subprocess.run([BIN / "nbdev_clean"], cwd=work, check=True, capture_output=True)
    dirty = [str(p.relative_to(work)) for p in sorted((work / "nbs").rglob("*.ipynb"))
             if p.read_bytes() != (ROOT / p.relative_to(work)).read_bytes()]
    assert not dirty, f"notebooks not clean: {dirty}; run `make export`"


def _stages():
    "Every stage of dvc.yaml; a `foreach` stage as its `do` template (its `${item}` stands for each element)."
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        yield name, stage.get("do", stage)


def test_foreach_stages_iterate_over_a_params_list():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage: continue
        node = params
        for part in re.fullmatch(r"\$\{([^}]+)\}", stage["foreach"]).group(1).split("."): node = node[part]
        assert isinstance(node, list) and node, f"stage {name}: foreach {stage['foreach']} is not a non-empty list in params.yaml"


def test_dvc_yaml_parses_and_lists_its_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _stages():
        used = set(re.findall(r"\$\{([^}]+)\}", stage["cmd"])) - {"item"}
        listed = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
        for key in used:
            node = params
            for part in key.split("."): node = node[part]  # KeyError: the cmd names a value params.yaml lacks
            assert key in listed or key.split(".")[0] in listed, f"stage {name}: ${{{key}}} used but not under params:"


@pytest.mark.parametrize("name,stage", list(_stages()), ids=lambda x: x if isinstance(x, str) else "")
def test_stage_parameters_exist_in_notebook(name, stage):
    argv = shlex.split(re.sub(r"\$\{[^}]+\}", "X", stage["cmd"]).split("&&")[-1])
    assert argv[0] == "perrep-stage", f"stage {name} should run its notebook with perrep-stage"
    notebook, names = ROOT / argv[1], [argv[i + 1] for i, a in enumerate(argv) if a == "-p"]
    missing = set(names) - set(notebook_parameters(notebook))
    assert not missing, f"stage {name}: -p {sorted(missing)} not in the parameters cell of {argv[1]}"
    assert str(argv[1]) in stage["deps"], f"stage {name} must depend on its notebook"


def test_readme_commands_and_ci_agree():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("make ")]
    assert "make repro" in commands and "make test" in commands
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must call the README's test command"
