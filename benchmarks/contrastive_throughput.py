"""Contrastive fine-tuning and evaluation throughput (perrep.contrastive): training images/s and evaluation images/s.

Run:  cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/contrastive_throughput.py            (CPU, EfficientNet-Lite0)
      HF_HUB_OFFLINE=1 python benchmarks/contrastive_throughput.py --device cuda --backbone dinov2-base-random
Writes benchmarks/results/contrastive_throughput[_<device>].json and prints what it measured.

Training: one step = a batch of B triplets (3B images through the backbone, InfoNCE, backward, Adam); images/s counts
all 3B. CPU (EfficientNet-Lite0, the mini profile): adapters everywhere vs in the last 5 blocks, with a fresh kornia
augmentation per use vs views drawn once with the frozen blocks cached (the mini profile's setting; the one-off cost of
the cache is reported apart). GPU (a DINOv2-B/14-sized model with random weights, as the paper profile trains;
`--backbone dinov2-base-random`): fp32 eager vs bf16 autocast. Evaluation: images/s embedding with k adapters at once
(`embed_adapted`, the frozen prefix shared on EfficientNet) vs k separate passes. On a shared CPU the ratios measured
side by side are the result; absolute times only on a GPU.
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from perrep.backbones import load_backbone
from perrep.contrastive import ContrastiveConfig, ContrastiveTrainer, embed_adapted, load_adapters, save_adapter
from perrep.core import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def images(n: int, seed: int, size: int = 256) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def backbone(name: str, device: str):
    if name == "dinov2-base-random":   # DINOv2-B/14's shapes (86M parameters), random weights: nothing to download
        folder = Path(tempfile.mkdtemp()) / "dinov2-base-random"
        transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                           intermediate_size=3072, patch_size=14, image_size=518)).save_pretrained(folder)
        name = str(folder)
    return load_backbone(name, device=device)


def train_rate(name: str, device: str, *, steps: int, batch: int, dtype=None, **config) -> dict:
    "Median images/s of training steps after 2 warm-up steps, and the one-off set-up seconds."
    cfg = ContrastiveConfig(batch_size=batch, n_triplets=batch * (steps + 2), epochs=1, n_synthetic=16, **config)
    start = time.perf_counter()
    trainer = ContrastiveTrainer(backbone(name, device), anchors=images(3, 0), positives=images(16, 1), negatives=images(16, 2), config=cfg)
    setup = time.perf_counter() - start
    trainer.model.to(device)
    trainer.pixels = {k: v.to(device) for k, v in trainer.pixels.items()}
    seconds = []
    for t in range(steps + 2):
        if device == "cuda": torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = trainer.loss(t)
        trainer.optimizer.zero_grad(); loss.backward(); trainer.optimizer.step()
        if device == "cuda": torch.cuda.synchronize()
        if t >= 2: seconds.append(time.perf_counter() - start)
    median = sorted(seconds)[len(seconds) // 2]
    out = dict(images_per_second=round(3 * batch / median, 2), step_seconds=round(median, 4), setup_seconds=round(setup, 2))
    if device == "cuda": out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def eval_rate(name: str, device: str, *, n: int, adapters: int, batch: int, last_blocks) -> dict:
    "images/s embedding n images under `adapters` adapters: all at once (shared prefix) vs one pass per adapter."
    folder = Path(tempfile.mkdtemp())
    cfg = ContrastiveConfig(rank=16, lora_alpha=16.0, last_blocks=last_blocks, batch_size=2, n_triplets=2, epochs=1, n_synthetic=2)
    trainer = ContrastiveTrainer(backbone(name, "cpu"), anchors=images(3, 0), positives=images(2, 1), negatives=images(2, 2), config=cfg)
    paths = {f"a{i}": save_adapter(trainer.model, folder / f"a{i}", params={}) for i in range(adapters)}
    bank = load_adapters(backbone(name, device), paths).to(device)
    data = images(n, 3)
    embed_adapted(bank, data[:batch], batch_size=batch)                                        # warm-up
    start = time.perf_counter(); embed_adapted(bank, data, batch_size=batch); together = time.perf_counter() - start
    start = time.perf_counter()
    for a in paths:
        bank.set_adapter(a); bank.base_model.model.embed(data, batch_size=batch)
    apart = time.perf_counter() - start
    return dict(adapters=adapters, images=n, shared_images_per_second=round(n * adapters / together, 2),
                separate_images_per_second=round(n * adapters / apart, 2), speedup=round(apart / together, 2))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = dict(device=args.device, backbone=args.backbone, batch_triplets=args.batch, torch=torch.__version__, machine=platform.machine(),
               cpu_count=os.cpu_count(), threads=args.threads, load_average=[round(x, 2) for x in os.getloadavg()])
    if args.device == "cuda": out["gpu"] = torch.cuda.get_device_name()
    if args.backbone == "efficientnet-lite0":
        out["train"] = {
            "all_blocks_fresh_augment": train_rate(args.backbone, args.device, steps=args.steps, batch=args.batch),
            "last5_fresh_augment": train_rate(args.backbone, args.device, steps=args.steps, batch=args.batch, last_blocks=5),
            "last5_cached_views": train_rate(args.backbone, args.device, steps=args.steps, batch=args.batch, last_blocks=5, views=8, anchor_views=32),
        }
        base = out["train"]["all_blocks_fresh_augment"]["images_per_second"]
        out["train_speedup_vs_all_blocks"] = {k: round(v["images_per_second"] / base, 2) for k, v in out["train"].items()}
        out["evaluate"] = [eval_rate(args.backbone, args.device, n=args.eval_images, adapters=k, batch=16, last_blocks=5) for k in (1, 4)]
    else:
        out["train"] = {"fp32_eager": train_rate(args.backbone, args.device, steps=args.steps, batch=args.batch),
                        "bf16_autocast": train_rate(args.backbone, args.device, steps=args.steps, batch=args.batch, dtype=torch.bfloat16)}
        out["bf16_speedup"] = round(out["train"]["bf16_autocast"]["images_per_second"] / out["train"]["fp32_eager"]["images_per_second"], 2)
        out["evaluate"] = [eval_rate(args.backbone, args.device, n=args.eval_images, adapters=k, batch=32, last_blocks=None) for k in (1, 4)]
    path = RESULTS / f"contrastive_throughput{'' if args.device == 'cpu' else '_' + args.device}.json"
    write_json_atomic(path, out)
    print(path); print(out)
    return out


if __name__ == "__main__":
    main()
