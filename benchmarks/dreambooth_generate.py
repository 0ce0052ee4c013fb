"""DreamBooth step time with cached vs on-the-fly latents, and generation images/s batched vs one at a time.

Run:  cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dreambooth_generate.py
      (optional: --model artifacts/foundation/mini-sd --steps 30 --images 32 --threads 2)
Writes benchmarks/results/dreambooth_generate.json and prints what it measured.

The model is the `mini` text-to-image pipeline (stage foundation; 64x64 images) unless --model names another
Stable-Diffusion-format folder. DreamBooth: LoRA rank 4 with prior preservation (1 instance + 1 class example per step),
the text encoder frozen; `cached` encodes the photos' latent distributions and the two prompts once, `on the fly`
runs the VAE encoder and the text encoder every step, as diffusers' script does without --pre_compute_text_embeddings.
Generation: `perrep.generate.generate_folder`, 25 DDIM steps with classifier-free guidance, batch 1 vs 16. On this
shared CPU the ratios measured side by side are the result; the absolute times are recorded with the load average.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from perrep.core import write_json_atomic
from perrep.dreambooth import DreamBooth, DreamBoothConfig, InstancePhotos
from perrep.generate import generate_folder, plan_images
from perrep.minidiffusion import load_pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "dreambooth_generate.json"


def step_seconds(model: str, *, precompute: bool, steps: int, size: int) -> float:
    "Median seconds of a DreamBooth-LoRA training step (loss, backward, AdamW) after 3 warm-up steps."
    g = torch.Generator().manual_seed(0)
    photos = InstancePhotos(pixels=torch.rand(3, 3, size, size, generator=g) * 2 - 1, masks=None)
    db = DreamBooth(load_pipeline(model), photos=photos, category="mug", config=DreamBoothConfig(steps=steps, lr=1e-4),
                    class_pixels=torch.rand(8, 3, size, size, generator=g) * 2 - 1, precompute=precompute)
    optimizer = torch.optim.AdamW(list(db.trainable.named.values()), lr=1e-4)
    seconds = []
    for t in range(steps + 3):
        start = time.perf_counter()
        loss, _ = db.loss(t)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if t >= 3: seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def images_per_second(model: str, *, n: int, batch_size: int) -> float:
    pipe = load_pipeline(model)
    plan = plan_images(["a photo of a mug"], n=n, seed=0, key="benchmark", guidance=7.5)
    generate_folder(pipe, plan[:batch_size], tempfile.mkdtemp(), generator="bench", steps=25, batch_size=batch_size, progress=False)  # warm-up
    start = time.perf_counter()
    generate_folder(pipe, plan, tempfile.mkdtemp(), generator="bench", steps=25, batch_size=batch_size, progress=False)
    return n / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/foundation/mini-sd")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    load_at_start = os.getloadavg()[0]
    cached = step_seconds(args.model, precompute=True, steps=args.steps, size=size)
    on_the_fly = step_seconds(args.model, precompute=False, steps=args.steps, size=size)
    batched = images_per_second(args.model, n=args.images, batch_size=16)
    single = images_per_second(args.model, n=args.images, batch_size=1)
    result = dict(model=args.model, image_size=size, threads=args.threads, machine=platform.processor() or platform.machine(),
                  python=sys.version.split()[0], torch=torch.__version__, load_average_at_start=load_at_start,
                  dreambooth_step_s=dict(cached=cached, on_the_fly=on_the_fly, speedup=on_the_fly / cached, steps_timed=args.steps),
                  generation_images_per_s=dict(batch_16=batched, batch_1=single, speedup=batched / single, images=args.images, steps=25))
    write_json_atomic(args.out, result)
    print(result)
    return result


if __name__ == "__main__":
    main()
