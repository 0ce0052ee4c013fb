"""Wall-clock time of each `dvc repro` stage, cold (every stage forced), on this machine.

Run from the repository root, after `make setup`:
    .venv/bin/python benchmarks/pipeline_times.py
Writes benchmarks/results/pipeline_times.json, with the `foundation` stage's time per phase (mini-CLIP, VAE, UNet,
evaluation; the stage writes them to artifacts/.work/foundation/times.json). Budgets on 2 cores: `foundation` <= 20 min,
`dreambooth` + `generate` + `cutpaste` (5 instances) about 20 min, `contrastive` about 15 min, `evaluate` about 10 min.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    times = {}
    for stage, spec in stages.items():
        cmd = spec.get("do", spec)["cmd"]                                          # a foreach stage: its template
        for work_dir in re.findall(r"-p work_dir (\S+)", cmd):                   # cold: no checkpoint or drawn set to resume from
            shutil.rmtree(ROOT / work_dir.split("${")[0], ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([BIN / "dvc", "repro", "--force", "--single-item", stage], cwd=ROOT, env=env, check=True)
        times[stage] = round(time.perf_counter() - start, 1)
        print(f"{stage}: {times[stage]} s", flush=True)
    start = time.perf_counter()
    subprocess.run([BIN / "dvc", "repro"], cwd=ROOT, env=env, check=True, capture_output=True)
    phases = ROOT / "artifacts/.work/foundation/times.json"
    result = dict(stages_s=times, total_s=round(sum(times.values()), 1),
                  foundation_phases_s=json.loads(phases.read_text()) if phases.is_file() else None,
                  second_repro_s=round(time.perf_counter() - start, 1),
                  params=yaml.safe_load((ROOT / "params.yaml").read_text())["base"],
                  machine=dict(cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                               processor=platform.processor() or platform.machine()))
    out = ROOT / "benchmarks/results/pipeline_times.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
