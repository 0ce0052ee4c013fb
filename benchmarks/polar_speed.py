"""POLAR personalization speed (perrep.polar): ms per concept at 50 and 500 iterations, the cached fast path vs
backpropagating through the whole text encoder, and concepts/s when many concepts are optimized in one batch.

Run:  cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/polar_speed.py [--device cuda]
Writes benchmarks/results/polar_speed[_<device>].json and prints it.

Text encoders with random weights (nothing downloaded): the mini profile's mini-CLIP text tower (3 layers, width 256)
and a CLIP ViT-L/14-sized one (12 layers, width 768, 12 heads; the paper reports 219.54 ms per concept at 50 iterations
on a V100). Each concept has 3 images (random unit embeddings) and 3 training prompts, as a mini-world instance. On a
shared CPU the ratios measured side by side are the result; absolute times only on a GPU.
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from perrep.clip import write_clip_tokenizer
from perrep.core import write_json_atomic
from perrep.polar import PolarConfig, encode_with_update, personalize, text_parts, training_prompts, unit_rows

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"mini-clip": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4, projection_dim=256),
         "clip-vit-l14-text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)}


class TextModel(torch.nn.Module):
    def __init__(self, size: str, tokenizer, device):
        super().__init__()
        config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **SIZES[size])
        self.text_encoder, self.tokenizer = transformers.CLIPTextModelWithProjection(config).to(device).eval(), tokenizer
        self.device = device
    def tokenize(self, texts): return {k: v.to(self.device) for k, v in self.tokenizer(list(texts), padding=True, return_tensors="pt").items()}


def concepts(n: int, dim: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"c{i}": F.normalize(torch.randn(3, dim, generator=g), dim=-1).to(device) for i in range(n)}


def sync(device):
    if device == "cuda": torch.cuda.synchronize()


def fast_ms(model, n_concepts: int, iterations: int, device) -> float:
    found = concepts(n_concepts, model.text_encoder.config.projection_dim, device)
    sync(device); start = time.perf_counter()
    personalize(model, found, config=PolarConfig(iterations=iterations), progress=False)
    sync(device)
    return 1000 * (time.perf_counter() - start) / n_concepts


def slow_ms(model, iterations: int, device) -> float:
    "One concept, every step through the whole encoder with W_V + BÂ (what the cache avoids)."
    text_model, projection = text_parts(model)
    target = concepts(1, model.text_encoder.config.projection_dim, device)["c0"]
    tokens = model.tokenize(training_prompts(3, identifier="sks", class_name=None, seed=0, key="c0"))
    d = text_model.encoder.layers[-1].self_attn.v_proj.in_features
    A = torch.randn(1, d, device=device, requires_grad=True); B = torch.zeros(d, 1, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([A, B], lr=1e-3)
    sync(device); start = time.perf_counter()
    for _ in range(iterations):
        text = F.normalize(encode_with_update(text_model, projection, tokens, unit_rows(A), B), dim=-1)
        loss = ((text - target) ** 2).mean() + 0.35 * (B ** 2).mean()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    sync(device)
    return 1000 * (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = write_clip_tokenizer(tempfile.mkdtemp())
    out = dict(device=args.device, torch=torch.__version__, machine=platform.machine(), cpu_count=os.cpu_count(), threads=args.threads,
               load_average=[round(x, 2) for x in os.getloadavg()])
    if args.device == "cuda": out["gpu"] = torch.cuda.get_device_name()
    for size in SIZES:
        torch.manual_seed(0)
        model = TextModel(size, tokenizer, args.device)
        fast_ms(model, 1, 5, args.device)                                          # warm-up
        r = {"ms_per_concept_50_iterations": round(fast_ms(model, 1, 50, args.device), 1),
             "ms_per_concept_500_iterations": round(fast_ms(model, 1, 500, args.device), 1),
             "ms_per_concept_50_iterations_whole_encoder": round(slow_ms(model, 50, args.device), 1)}
        r["fast_path_speedup"] = round(r["ms_per_concept_50_iterations_whole_encoder"] / r["ms_per_concept_50_iterations"], 1)
        batched = fast_ms(model, 64, 50, args.device)
        r["concepts_per_second_batched_64_at_50_iterations"] = round(1000 / batched, 1)
        r["batched_speedup_per_concept"] = round(r["ms_per_concept_50_iterations"] / batched, 1)
        out[size] = r
    path = RESULTS / f"polar_speed{'' if args.device == 'cpu' else '_' + args.device}.json"
    write_json_atomic(path, out)
    print(path); print(out)
    return out


if __name__ == "__main__":
    main()
