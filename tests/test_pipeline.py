"Smoke run of every pipeline stage notebook at `ci` scale, in a temporary folder, through perrep-stage's runner."
import json
import math
import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
import yaml

from sklearn.metrics import average_precision_score

from perrep.clip import load_clip
from perrep.data import load_pods
from perrep.evaluate import load_embeddings
from perrep.pipeline import run_notebook
from perrep.sweeps import flatten_keys
from perrep.world import copy_background_sources

ROOT = Path(__file__).resolve().parents[1]
CI_INSTANCE = "mugs_01"   # the first test instance of the ci world
SCENES = ["in_distribution", "pose", "distractors", "pose_and_distractors", "overall"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profiles"]["mini"]["dataset"] = str(tmp / "world")
    params["profiles"]["mini"]["text_to_image"] = str(tmp / "foundation/mini-sd")
    params["profiles"]["mini"]["text_image_model"] = str(tmp / "foundation/mini-clip")
    ci_filtered = f"synthetic/dreambooth_llm_filtered/cfg_{params['generate']['ci']['filter']['guidance']:g}"   # ci filters at its own guidance
    params["contrastive"]["sources"] = {name: [ci_filtered if f.startswith("synthetic/dreambooth_llm_filtered") else f for f in folders]
                                        for name, folders in params["contrastive"]["sources"].items()}
    params["dreambooth"]["instances"] = [CI_INSTANCE]                    # the stages over every personalized instance: downstream, analysis
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    copy_background_sources(tmp / "backgrounds")
    stage = lambda name, **p: run_notebook(ROOT / f"nbs/pipeline/{name}.ipynb", tmp / f"reports/{name}.ipynb",
                                           parameters=p, cwd=ROOT, progress=False)
    stage("world", seed=0, scale="ci", params_file=str(tmp / "params.yaml"),
          background_dir=str(tmp / "backgrounds"), out_dir=str(tmp / "world"))
    stage("embed", profile="mini", params_file=str(tmp / "params.yaml"), batch_size=16, threads=1,
          out_path=str(tmp / "embeddings/pretrained.npz"))
    stage("foundation", **_foundation_parameters(tmp, tmp / "foundation"))
    search = dict(profile="mini", scale="ci", params_file=str(tmp / "params.yaml"))
    stage("search_benchmark", **search, background_dir=str(tmp / "backgrounds"), out_dir=str(tmp / "search"))
    stage("polar", **search, benchmark_dir=str(tmp / "search"), out_dir=str(tmp / "polar"), report_dir=str(tmp / "polar_report"), threads=1)
    stage("polar_eval", **search, benchmark_dir=str(tmp / "search"), polar_dir=str(tmp / "polar"), report_dir=str(tmp / "polar_eval"),
          work_dir=str(tmp / "work/polar_eval"), threads=1)
    common = dict(profile="mini", scale="ci", params_file=str(tmp / "params.yaml"), instance=CI_INSTANCE, threads=1)
    stage("dreambooth", **common, out_dir=str(tmp / "dreambooth"), work_dir=str(tmp / "work/dreambooth"))
    stage("generate", **common, dreambooth_dir=str(tmp / "dreambooth"), out_dir=str(tmp / "synthetic" / CI_INSTANCE),
          work_dir=str(tmp / "work/synthetic"), report_dir=str(tmp / "synthetic_report"))
    stage("cutpaste", **common, background_dir=str(tmp / "backgrounds"), out_dir=str(tmp / "cutpaste" / CI_INSTANCE),
          work_dir=str(tmp / "work/cutpaste"), report_dir=str(tmp / "cutpaste_report"))
    stage("contrastive", **common, synthetic_dir=str(tmp / "synthetic" / CI_INSTANCE), cutpaste_dir=str(tmp / "cutpaste" / CI_INSTANCE), out_dir=str(tmp / "contrastive" / CI_INSTANCE),
          work_dir=str(tmp / "work/contrastive"), report_dir=str(tmp / "contrastive_report"))
    stage("evaluate", **_evaluate_parameters(tmp, tmp / "baseline", tmp / "personalized"))
    stage("report", **_report_parameters(tmp, tmp / "baseline", tmp / "personalized"))
    structured = dict(params, dreambooth=dict(params["dreambooth"], ci=dict(params["dreambooth"]["ci"],
                      train=dict(params["dreambooth"]["ci"]["train"], prior="structured", crop_min=0.75, crop_views=2))))
    (tmp / "params_structured.yaml").write_text(yaml.safe_dump(structured))
    stage("dreambooth", **dict(common, params_file=str(tmp / "params_structured.yaml")), out_dir=str(tmp / "dreambooth_structured"),
          work_dir=str(tmp / "work/dreambooth_structured"))
    stage("downstream", **_downstream_parameters(tmp, guidance=DOWNSTREAM_GUIDANCE))
    stage("dreambench", profile="mini", scale="ci", params_file=str(tmp / "params.yaml"), out_dir=str(tmp / "dreambench"),
          work_dir=str(tmp / "work/dreambench"), report_dir=str(tmp / "dreambench_report"), threads=1)
    _write_sweep_table(tmp / "downstream/metrics.json", tmp / "sweep.csv")
    stage("analysis", **_analysis_parameters(tmp, tmp / "analysis"))
    return tmp


DOWNSTREAM_GUIDANCE = 4.0   # a guidance the ci generate block draws


def _downstream_parameters(tmp, *, guidance, out_dir=None):
    return dict(profile="mini", scale="ci", params_file=str(tmp / "params.yaml"), strategy="llm", guidance=guidance,
                synthetic_dir=str(tmp / "synthetic"), embeddings_path=str(tmp / "embeddings/pretrained.npz"),
                out_dir=str(out_dir or tmp / "downstream"), work_dir=str(tmp / "work/downstream"), threads=1)


def _write_sweep_table(metrics_path, out_path):
    "What `perrep-sweep gather` writes for a sweep of one point: the ci downstream run."
    metrics = {f"reports/downstream/metrics.json:{k}": v for k, v in flatten_keys(json.loads(metrics_path.read_text())).items()}
    pd.DataFrame([dict(experiment="ci-0", kind="experiment", error=None, **{"downstream.strategy": "llm", "downstream.guidance": DOWNSTREAM_GUIDANCE},
                       **metrics)]).to_csv(out_path, index=False)


def _analysis_parameters(tmp, report_dir):
    return dict(profile="mini", scale="ci", params_file=str(tmp / "params.yaml"), synthetic_dir=str(tmp / "synthetic"),
                cutpaste_dir=str(tmp / "cutpaste"), dreambench_dir=str(tmp / "dreambench"), sweep_table=str(tmp / "sweep.csv"),
                work_dir=str(tmp / "work/analysis"), report_dir=str(report_dir), threads=1)


def _evaluate_parameters(tmp, out_dir, personalized_dir):
    return dict(profile="mini", scale="ci", params_file=str(tmp / "params.yaml"), classes="test", threads=1,
                embeddings_path=str(tmp / "embeddings/pretrained.npz"), adapters_dir=str(tmp / "contrastive"),
                out_dir=str(out_dir), personalized_dir=str(personalized_dir))


def _report_parameters(tmp, results_dir, personalized_dir):
    return dict(profile="mini", params_file=str(tmp / "params.yaml"), results_dir=str(results_dir),
                embeddings_path=str(tmp / "embeddings/pretrained.npz"), figure_path=str(Path(results_dir) / "per_scene.png"),
                personalized_dir=str(personalized_dir), personalized_figure_path=str(Path(personalized_dir) / "variants.png"))


def _foundation_parameters(tmp, out_dir, work_dir=None):
    return dict(scale="ci", params_file=str(tmp / "params.yaml"), threads=1, world_dir=str(tmp / "world"), out_dir=str(out_dir),
                work_dir=str(work_dir or tmp / "work/foundation"), report_dir=str(out_dir / "report"))


def test_stages_write_their_declared_outputs(run):
    for path in ["world/pods_info.json", "world/params.json", "embeddings/pretrained.npz",
                 "embeddings/pretrained.npz.params.json", "baseline/metrics.json", "baseline/per_instance.csv",
                 "baseline/per_scene.csv", "baseline/per_scene.png", "reports/report.ipynb",
                 "foundation/mini-clip/mini_clip.json", "foundation/mini-sd/model_index.json", "foundation/params.json",
                 "foundation/report/metrics.json", "reports/foundation.ipynb"]:
        assert (run / path).is_file(), path


def test_metrics_cover_every_scene_and_metric(run):
    metrics = json.loads((run / "baseline/metrics.json").read_text())
    for scene in SCENES:
        for metric in ["pr_auc", "ndcg", "mrr", "map", "top10", "pr_auc_chance", "det_map", "det_map50", "det_f1", "seg_map", "seg_map50", "seg_f1"]:
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
    stage("evaluate", **_evaluate_parameters(run, tmp_path / "baseline", tmp_path / "personalized"))
    stage("report", **_report_parameters(run, tmp_path / "baseline", tmp_path / "personalized"))
    assert params["profiles"]["mini"]["dataset"] == str(run / "world")
    for name in ("metrics.json", "per_instance.csv", "per_scene.csv", "per_scene.png"):
        assert (tmp_path / "baseline" / name).read_bytes() == (run / "baseline" / name).read_bytes(), name
    for name in ("metrics.json", "results.csv", "summary.csv", "deltas.csv", "retrieval.json", "variants.png"):
        assert (tmp_path / "personalized" / name).read_bytes() == (run / "personalized" / name).read_bytes(), name
    strip = lambda text: (text.replace(str(tmp_path / "baseline"), "X").replace(str(run / "baseline"), "X")
                          .replace(str(tmp_path / "personalized"), "P").replace(str(run / "personalized"), "P"))
    assert strip((tmp_path / "report.ipynb").read_text()) == strip((run / "reports/report.ipynb").read_text())



def test_foundation_losses_fall_and_metrics_are_complete(run):
    report = run / "foundation/report"
    for name, key in [("clip_loss.csv", "loss"), ("vae_loss.csv", "loss"), ("unet_loss.csv", "loss")]:
        values = [float(row.split(",")[1]) for row in (report / name).read_text().splitlines()[1:]]
        assert len(values) >= 10 and np.mean(values[-5:]) < np.mean(values[:5]), (name, values)
    metrics = json.loads((report / "metrics.json").read_text())
    clip = metrics["clip"]
    assert 0 <= clip["zero_shot_accuracy"] <= 1 and 0 <= clip["recall_at_10_chance"] <= 1
    assert set(metrics["diffusion"]) == {"guidance_1", "guidance_7.5"}
    assert all(0 <= row["category_accuracy"] <= 1 and -1 <= row["clip_t"] <= 1 for row in metrics["diffusion"].values())


def test_foundation_folders_load_in_stock_libraries_offline(run):
    "What DreamBooth and POLAR will do: stock diffusers and transformers classes read the folders, no hub reached."
    from diffusers import StableDiffusionPipeline
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = StableDiffusionPipeline.from_pretrained(run / "foundation/mini-sd")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.safety_checker is None
    image = pipe("a photo of a mug", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    text = transformers.CLIPTextModelWithProjection.from_pretrained(run / "foundation/mini-clip/text_encoder")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(run / "foundation/mini-clip/tokenizer")
    assert len(tokenizer) == 49408
    clip = load_clip(run / "foundation/mini-clip")
    with torch.no_grad():
        stock = text(**tokenizer(["a photo of a mug"], return_tensors="pt")).text_embeds
    assert torch.equal(clip.encode_text(["a photo of a mug"]), torch.nn.functional.normalize(stock, dim=-1))
    # the pipeline's text encoder is mini-CLIP's text transformer, weight for weight
    for name, weight in pipe.text_encoder.state_dict().items():
        assert torch.equal(weight, text.text_model.state_dict()[name]), name


def test_foundation_resumes_without_retraining_and_reproduces_bytes(run, tmp_path):
    "Rerun on the finished checkpoints: nothing is trained again and every saved weight file is the same, byte for byte."
    out, work = tmp_path / "foundation", run / "work/foundation"
    checkpoints = {p: p.stat().st_mtime_ns for p in work.rglob("checkpoint.pt")}
    assert len(checkpoints) == 3, checkpoints                                     # mini-CLIP, VAE, UNet
    run_notebook(ROOT / "nbs/pipeline/foundation.ipynb", tmp_path / "foundation.ipynb", cwd=ROOT, progress=False,
                 parameters=_foundation_parameters(run, out))
    weights = sorted(p.relative_to(run / "foundation") for p in (run / "foundation").rglob("*.safetensors"))
    assert len(weights) >= 4, weights
    for name in weights: assert (out / name).read_bytes() == (run / "foundation" / name).read_bytes(), name
    assert (out / "report/metrics.json").read_bytes() == (run / "foundation/report/metrics.json").read_bytes()
    assert {p: p.stat().st_mtime_ns for p in work.rglob("checkpoint.pt")} == checkpoints   # no step was run again


def test_dreambooth_saves_a_lora_that_a_stock_pipeline_loads(run):
    from diffusers import StableDiffusionPipeline
    saved = json.loads((run / "dreambooth/params.json").read_text())
    assert saved["instance"] == CI_INSTANCE and saved["category"] == "mug" and saved["prompts"] == ["a photo of sks mug", "a photo of a mug"]
    pipe = StableDiffusionPipeline.from_pretrained(run / "foundation/mini-sd")
    pipe.load_lora_weights(run / "dreambooth", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    losses = (run / "dreambooth/loss.csv").read_text().splitlines()
    assert losses[0] == "step,loss,instance,prior" and len(losses) == 1 + 4


def test_structured_prior_trains_on_its_own_prompts(run):
    from perrep.generate import read_metadata
    saved = json.loads((run / "dreambooth_structured/params.json").read_text())
    assert saved["prior"] == "structured" and saved["crop_min"] == 0.75
    assert saved["instance_prompts"] and all(p.startswith("a photo of sks mug ") for p in saved["instance_prompts"])   # with its background
    class_prompts = [r["prompt"] for r in read_metadata(run / "work/dreambooth_structured/class_images")]
    assert len(class_prompts) == saved["class_images"]["n"] and all("mug" in p and p != "a photo of a mug" for p in class_prompts)
    assert set(class_prompts) <= set(saved["prompts"])
    assert (run / "dreambooth_structured/pytorch_lora_weights.safetensors").is_file()


def test_generate_writes_image_folders_with_metadata_and_fidelity(run):
    import datasets
    from perrep.filtering import ATTEMPTS_FILE
    params = yaml.safe_load((run / "params.yaml").read_text())["generate"]["ci"]
    rule = params["filter"]
    filtered = f"dreambooth_{rule['strategy']}_filtered/cfg_{rule['guidance']:g}"
    names = [f"dreambooth_{s}/cfg_{g:g}" for s in params["strategies"] for g in params["guidance"]] + ["negatives"]
    attempts = [json.loads(line) for line in (run / "synthetic" / CI_INSTANCE / filtered / ATTEMPTS_FILE).read_text().splitlines()]
    metrics = json.loads((run / "synthetic_report/metrics.json").read_text())
    assert metrics[filtered]["attempts"] == len(attempts) <= rule["max_attempts"]
    kept = [json.loads(line) for line in (run / "synthetic" / CI_INSTANCE / filtered / "metadata.jsonl").read_text().splitlines()]
    assert len(kept) == metrics[filtered]["kept"] <= params["n_positives"]
    assert all(r["filter_score"] >= metrics[filtered]["threshold"] for r in kept)
    assert sorted(r["file_name"] for r in kept) == sorted(p.name for p in (run / "synthetic" / CI_INSTANCE / filtered).glob("*.png"))
    for name in names:
        images = datasets.load_dataset("imagefolder", data_dir=str(run / "synthetic" / CI_INSTANCE / name), split="train")
        assert len(images) == (params["n_negatives"] if name == "negatives" else params["n_positives"]), name
        assert images[0]["image"].size == (64, 64) and images[0]["steps"] == params["steps"]
    llm = datasets.load_dataset("imagefolder", data_dir=str(run / "synthetic" / CI_INSTANCE / "dreambooth_llm/cfg_4"), split="train")
    assert all("sks mug" in p for p in llm["prompt"])
    assert set(metrics) == set(names) | ({filtered} if kept else set())
    for name, m in metrics.items():   # every set scored on all its images; the difference is against the base model's set
        assert m["n"] == len(list((run / "synthetic" / CI_INSTANCE / name).glob("*.png"))) and -1 <= m["fidelity"] <= 1, name
        assert abs(m["minus_base"] - (m["fidelity"] - metrics["negatives"]["fidelity"])) < 1e-5, name


def test_cutpaste_pastes_the_instance_onto_both_kinds_of_background(run):
    import datasets
    params = yaml.safe_load((run / "params.yaml").read_text())["cutpaste"]["ci"]
    metrics = json.loads((run / "cutpaste_report/metrics.json").read_text())
    assert set(metrics) == {f"cutpaste_{kind}" for kind in params["backgrounds"]}
    real = {p.name for p in (run / "backgrounds").iterdir()}
    for name, m in metrics.items():
        images = datasets.load_dataset("imagefolder", data_dir=str(run / "cutpaste" / CI_INSTANCE / name), split="train")
        assert len(images) == m["n"] == params["n"] and images[0]["image"].size == (params["paste"]["size"],) * 2
        assert set(images["source"]) <= {f"{CI_INSTANCE}_train_{k}.jpg" for k in range(3)} and 0 < m["fidelity"] <= 1
        assert (set(images["background"]) <= real) == (name == "cutpaste_real"), name


def test_contrastive_trains_one_adapter_per_source_and_evaluate_scores_them(run):
    params = yaml.safe_load((run / "params.yaml").read_text())
    sources = list(params["contrastive"]["sources"])
    for source in sources:
        folder = run / "contrastive" / CI_INSTANCE / source
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == params["profiles"]["mini"]["backbone"]
        assert json.loads((folder / "params.json").read_text())["source"] == source
        assert (run / "contrastive_report" / f"loss_{source}.csv").is_file()
    metrics = json.loads((run / "personalized/metrics.json").read_text())
    assert sorted(metrics) == sorted(["pretrained", *sources])
    for variant, scenes in metrics.items():
        assert sorted(scenes) == sorted(SCENES), variant
        for scene, values in scenes.items():
            assert {"pr_auc", "ndcg", "mrr", "map", "top10", "det_map", "det_map50", "det_f1", "seg_map", "seg_map50", "seg_f1"} <= set(values)
            assert all(0.0 <= v <= 1.0 for v in values.values()), (variant, scene, values)
    baseline = [r for r in (run / "baseline/per_instance.csv").read_text().splitlines() if r.startswith(f"{CI_INSTANCE},overall,pr_auc,")]
    assert metrics["pretrained"]["overall"]["pr_auc"] == pytest.approx(float(baseline[0].split(",")[-1]), abs=1e-6)
    retrieval = json.loads((run / "personalized/retrieval.json").read_text())
    assert sorted(retrieval) == sorted(f"{CI_INSTANCE}/{v}" for v in ["pretrained", *sources])


def test_search_benchmark_has_single_and_multi_concept_queries_for_val_and_test(run):
    from perrep.search import load_benchmark
    for split in ("val", "test"):
        bench = load_benchmark(run / "search" / split)                  # checked on load: every relevant image in the pool
        multi = [q for q in bench.queries if len(q["concepts"]) == 2]
        assert multi and all(q["query"].count("*") == 2 for q in multi)
        assert {q["kind"] for q in bench.queries} == {"context", "concept-only"}
        assert all(bench.image_path(i).is_file() for i in bench.pool)
    assert set(load_benchmark(run / "search/val").concepts).isdisjoint(load_benchmark(run / "search/test").concepts)


@pytest.mark.parametrize("missing", ["search_benchmark", "search_data"])
def test_search_benchmark_names_a_missing_profile_key(missing, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["profiles"]["paper"][missing]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(Exception, match=f"profiles.paper.{missing}"):
        run_notebook(ROOT / "nbs/pipeline/search_benchmark.ipynb", tmp_path / "search_benchmark.ipynb", cwd=ROOT, progress=False,
                     parameters=dict(profile="paper", params_file=str(tmp_path / "params.yaml"), out_dir=str(tmp_path / "search")))
    assert not (tmp_path / "search").exists()


def test_polar_chooses_lambda_on_val_and_learns_one_update_per_test_concept(run):
    from perrep.polar import load_update, text_parts
    params = json.loads((run / "polar/params.json").read_text())
    selection = (run / "polar_report/selection.csv").read_text().splitlines()
    assert selection[0].startswith("reg_weight,") and len(selection) == 1 + 1 + 2     # the original model, then each λ of the ci grid
    assert params["reg_weight"] in (0.1, 1.0) and params["selected_on"] == "val"
    width = text_parts(load_clip(run / "foundation/mini-clip"))[0].encoder.layers[-1].self_attn.v_proj.in_features
    for concept in params["concepts"]:
        update = load_update(run / "polar/updates" / f"{concept}.safetensors", width=width)
        assert update.identifier.startswith("sks ") and update.A.shape == (1, width)   # class_word: "sks mug"


def test_polar_eval_writes_the_papers_tables(run):
    metrics = json.loads((run / "polar_eval/metrics.json").read_text())
    assert {"original", "polar"} <= set(metrics)
    for who in ("original", "polar"):
        assert {"context", "context-single", "context-multi", "concept-only", "captions"} <= set(metrics[who])
        assert all(0.0 <= v <= 100.0 for g, m in metrics[who].items() for k, v in m.items() if k != "queries"), who
    tables = {p.stem: p.read_text().splitlines() for p in (run / "polar_eval").glob("table*.csv")}
    assert sorted(tables) == ["table3", "table4_rank", "table5_layers", "table6_parameters", "table7_regularization", "table8_merging"]
    assert [line.split(",")[0] for line in tables["table8_merging"][1:]] == ["Avg LoRAs", "Max LoRAs", "Orthogonal Adaptation", "Add LoRAs", "Original"]
    assert [line.split(",")[0] for line in tables["table3"][1:]] == ["Original", "Text. Inv. (1 tok)", "Prompt (1 tok)", "Text. Inv. + Ours", "Ours"]


def test_polar_eval_resumes_from_the_variants_it_finished(run, tmp_path):
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["polar_eval"]["ci"]["parameters"] = ["q", "no-such-parameter"]          # fails in table 6, after tables 3-5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = dict(profile="mini", scale="ci", benchmark_dir=str(run / "search"), polar_dir=str(run / "polar"), report_dir=str(tmp_path / "report"),
                 work_dir=str(tmp_path / "work"), threads=1)
    with pytest.raises(Exception, match="no-such-parameter"):
        run_notebook(ROOT / "nbs/pipeline/polar_eval.ipynb", tmp_path / "killed.ipynb", cwd=ROOT, progress=False,
                     parameters=dict(stage, params_file=str(tmp_path / "params.yaml")))
    (finished,) = (tmp_path / "work").glob("*/ti_1.json")                    # the variants done before the failure are kept
    scores = json.loads(finished.read_text())
    scores["context-single"]["mrr"] = 42.0                                   # planted: a resumed run reads it instead of retraining
    finished.write_text(json.dumps(scores))
    run_notebook(ROOT / "nbs/pipeline/polar_eval.ipynb", tmp_path / "resumed.ipynb", cwd=ROOT, progress=False,
                 parameters=dict(stage, params_file=str(run / "params.yaml")))
    table3 = pd.read_csv(tmp_path / "report/table3.csv", index_col="variant")
    assert table3.loc["Text. Inv. (1 tok)", "context-single mrr"] == 42.0
    rest = lambda d: {p.name: p.read_bytes() for p in d.glob("table[45678]*.csv")}
    assert rest(tmp_path / "report") == rest(run / "polar_eval")               # every other variant as in the straight run
    assert not any((tmp_path / "work").iterdir())                            # finished: the work folder is cleared


def test_downstream_in_category_pr_auc_equals_a_direct_computation(run):
    "The pretrained row: the instance's test images among its category's, scored by max cosine to its train photos (sklearn AP)."
    emb, world = load_embeddings(run / "embeddings/pretrained.npz"), load_pods(run / "world", progress=False)
    category = [c for c in world.classes if world.class_to_sc[c] == world.class_to_sc[CI_INSTANCE]]
    test = (emb["splits"] == "test") & np.isin(emb["labels"], category)                     # (T,) the gallery
    train = (emb["splits"] == "train") & (emb["labels"] == CI_INSTANCE)                     # (3,) the instance's photos
    unit = emb["embeddings"] / np.linalg.norm(emb["embeddings"], axis=1, keepdims=True)
    expected = average_precision_score(emb["labels"][test] == CI_INSTANCE, (unit[test] @ unit[train].T).max(axis=1))
    rows = pd.read_csv(run / "downstream/per_instance.csv").set_index(["instance", "scene"])
    assert rows.loc[(CI_INSTANCE, "overall"), "pretrained"] == pytest.approx(expected, abs=1e-6)
    assert len(category) > 1 and expected < 1.0                                                # hard negatives are in the gallery
    metrics = json.loads((run / "downstream/metrics.json").read_text())
    assert metrics["set"] == f"dreambooth_llm/cfg_{DOWNSTREAM_GUIDANCE:g}"
    assert metrics["per_instance"][CI_INSTANCE] == pytest.approx(rows.loc[(CI_INSTANCE, "overall"), "adapted"], abs=1e-6)
    assert metrics["delta"]["overall"] == pytest.approx(metrics["pr_auc"]["overall"] - metrics["pretrained"]["overall"], abs=2e-6)


def test_downstream_refuses_a_set_that_was_not_generated(run, tmp_path):
    with pytest.raises(Exception, match="downstream.guidance=6.0"):
        run_notebook(ROOT / "nbs/pipeline/downstream.ipynb", tmp_path / "downstream.ipynb", cwd=ROOT, progress=False,
                     parameters=_downstream_parameters(run, guidance=6.0, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dreambench_table_and_overfitting_curves(run):
    table = pd.read_csv(run / "dreambench_report/table.csv").set_index("prior")
    assert table.index.tolist() == ["real images", "base model", "none", "class", "structured"]
    assert table.loc["real images", "dino"] > table.loc["base model", "dino"]                 # real photos are the ceiling of fidelity
    assert table[["dino", "clip_i", "diversity_dino"]].notna().all().all()
    curves = pd.read_csv(run / "dreambench_report/curves.csv")
    for prior in ("none", "class", "structured"):
        assert sorted(curves.loc[curves["prior"] == prior, "step"]) == [0, 2, 4], prior
    first = curves[curves["step"] == 0].drop(columns="prior")
    assert len(first.drop_duplicates()) == 2                                                  # step 0 (one folder for every prior) and the base model
    assert (run / "dreambench_report/curves.png").stat().st_size > 0 and (run / "dreambench_report/table.md").read_text().count("|") > 20


def test_analysis_scores_every_set_and_reruns_from_its_caches(run, tmp_path):
    sets = pd.read_csv(run / "analysis/sets.csv")
    assert {"dreambooth", "cutpaste", "base model"} <= set(sets["generator"])
    known = sets.dropna(subset=["pr_auc"])
    assert known[["strategy", "guidance"]].drop_duplicates().values.tolist() == [["llm", DOWNSTREAM_GUIDANCE]]
    downstream = json.loads((run / "downstream/metrics.json").read_text())
    assert known["pr_auc"].tolist() == [downstream["per_instance"][CI_INSTANCE]]
    assert ((sets["diversity_dino"] >= 0) & (sets["diversity_dino"] <= 2) & (sets["dino"].abs() <= 1)).all()
    caches = {p: p.stat().st_mtime_ns for p in (run / "work/analysis").rglob("*") if p.is_file()}
    assert caches
    run_notebook(ROOT / "nbs/pipeline/analysis.ipynb", tmp_path / "analysis.ipynb", cwd=ROOT, progress=False,
                 parameters=_analysis_parameters(run, tmp_path / "analysis"))
    assert {p: p.stat().st_mtime_ns for p in caches} == caches                               # nothing embedded again
    for name in ("sets.csv", "summary.csv", "balance.csv", "metrics.json"):
        assert (tmp_path / "analysis" / name).read_bytes() == (run / "analysis" / name).read_bytes(), name
