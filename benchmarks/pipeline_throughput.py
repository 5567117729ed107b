"""Input-pipeline throughput at 256 and 512 px: PNG decode + joint augmentation + batching, no model.

    python benchmarks/pipeline_throughput.py [--data_dir DIR] [--batch_size 8] [--seconds 8] [--worker_count 0]

Builds small `synth_cxr_edit` datasets (train split only) into --data_dir on the first run and reuses them after
(rendering costs ~0.25 s per pair at 256 px and ~1.2 s at 512 px). The stream repeats the few records forever, so
what is measured is the per-example work, from page-cached ArrayRecord files: read, 2 PNG decodes, the +-2 degree
rotation of both images (and the mask with --with_mask), the flip / laterality swap, batching. Tokenization is
left out (it belongs to another component's benchmark).

"images/s" counts training examples, i.e. (past, current) pairs: each is 2 decoded images. The last line is
`images_per_s=<512 px value>`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from x2x_jax.data import pipeline
from x2x_jax.data.tfds import SynthCxrEdit, SynthCxrEditConfig

RESOLUTIONS = (256, 512)
DEFAULT_EXAMPLES = {256: 32, 512: 16}


def build(data_dir: str, resolution: int, num_examples: int):
    config = SynthCxrEditConfig(name=f"bench{resolution}_n{num_examples}", resolution=resolution,
                                split_sizes=(("train", num_examples),))
    builder = SynthCxrEdit(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        start = time.perf_counter()
        builder.download_and_prepare()
        print(f"built {config.name} in {time.perf_counter() - start:.1f} s", flush=True)
    return builder.as_data_source("train")


def measure(source, args, augmentation) -> float:
    """Examples per second over at least `args.seconds` after 2 warm-up batches."""
    it = pipeline.make_iterator(source, batch_size=args.batch_size, seed=0, shard_index=0, shard_count=1,
                                augmentation=augmentation, with_mask=args.with_mask,
                                worker_count=args.worker_count, read_threads=args.read_threads)
    try:
        for _ in range(2):
            next(it)
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < args.seconds or count < 4 * args.batch_size:
            batch = next(it)
            count += len(batch["past"])
        return count / elapsed
    finally:
        if args.worker_count:
            it.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.environ.get("X2X_BENCH_DATA_DIR",
                                                             os.path.join(tempfile.gettempdir(), "x2x_bench_tfds")))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per setting")
    parser.add_argument("--worker_count", type=int, default=0, help="grain worker processes (0: in-process)")
    parser.add_argument("--read_threads", type=int, default=2, help="reader threads (per worker)")
    parser.add_argument("--with_mask", action="store_true")
    args = parser.parse_args()

    print(f"pipeline throughput: batch {args.batch_size}, worker_count {args.worker_count}, read_threads "
          f"{args.read_threads}, {os.cpu_count()} CPUs, data in {args.data_dir}", flush=True)
    results = {}
    for resolution in RESOLUTIONS:
        source = build(args.data_dir, resolution, DEFAULT_EXAMPLES[resolution])
        plain = measure(source, args, pipeline.NO_AUGMENTATION)
        full = measure(source, args, pipeline.Augmentation())
        results[resolution] = full
        mb = np.dtype(np.float32).itemsize * resolution**2 * 2 * full / 2**20
        print(f"{resolution:4d} px: {full:8.1f} images/s with augmentation ({2 * full:.1f} decoded PNG/s, "
              f"{mb:.0f} MiB/s of float32 output); {plain:8.1f} images/s without", flush=True)
    print(f"images_per_s={results[512]:.1f}")


if __name__ == "__main__":
    main()
