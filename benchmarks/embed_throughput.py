"""Images per second of `Backbone.embed` for EfficientNet-Lite0 on this machine's CPU.

Run:  cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_throughput.py
      (optional: --images 128 --repeats 3 --batch-sizes 1 4 16 64 --threads 1 2)
Writes benchmarks/results/embed_throughput.json and prints what it measured.

`embed` = preprocessing (resize 256, crop 224, normalise) + forward + copy to CPU float32. The input is 128 real photos
(scikit-image's chelsea, coffee, astronaut, rocket at their own sizes, 300x451 to 512x512), so preprocessing does real
resizing work. Each (threads, batch size) is timed `repeats` times after one warm-up batch; the median is kept, the best
and worst beside it: this CPU is shared, and the load average at the start is recorded with the numbers.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data as skdata

from perrep.backbones import load_backbone
from perrep.core import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "embed_throughput.json"


def timed(fn, repeats: int) -> list[float]:
    "Wall-clock seconds of `repeats` calls of `fn`."
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.images < max(args.batch_sizes): parser.error(f"--images {args.images} must be at least the largest batch size")

    photos = [Image.fromarray(a) for a in (skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket())]
    images = [photos[i % len(photos)] for i in range(args.images)]
    backbone = load_backbone("efficientnet-lite0")
    load_at_start = os.getloadavg()[0]
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        preprocess = timed(lambda: backbone.preprocess(images), args.repeats)
        for batch_size in args.batch_sizes:
            backbone.embed(images[:batch_size], batch_size=batch_size)  # warm-up
            seconds = timed(lambda: backbone.embed(images, batch_size=batch_size), args.repeats)
            run = dict(threads=threads, batch_size=batch_size, images=args.images, seconds=seconds,
                       images_per_s=args.images / statistics.median(seconds),
                       images_per_s_best=args.images / min(seconds), images_per_s_worst=args.images / max(seconds),
                       preprocess_images_per_s=args.images / statistics.median(preprocess))
            runs.append(run)
            print(f"threads {threads}  batch {batch_size:3d}: {run['images_per_s']:6.1f} images/s "
                  f"(best {run['images_per_s_best']:.1f}, worst {run['images_per_s_worst']:.1f}; "
                  f"preprocessing alone {run['preprocess_images_per_s']:.0f} images/s)")
    result = dict(
        backbone=backbone.name, image_size=backbone.image_size, what="Backbone.embed: preprocess + forward + to CPU float32",
        runs=runs,
        machine=dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                     processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                     cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                     load_average_at_start=round(load_at_start, 2), load_average_at_end=round(os.getloadavg()[0], 2)),
        command=" ".join([Path(sys.executable).name, *sys.argv]))
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
