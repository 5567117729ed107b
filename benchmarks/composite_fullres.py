"""Cost of the full-resolution composite (x2x_jax.editing.fullres.composite) on a 3,000 x 3,000 16-bit input.

    python benchmarks/composite_fullres.py [--size 3000] [--model 512] [--repeats 5]

What edit.py adds per edit on top of the model-resolution program: G to the input's grid, the mask, the feather,
the bicubic upsampling of the decoded edit over the mask's box (and, with --keep-detail, of the model input), the
stored-value inverse mapping and the blend. The mask is a realistic one: G = the anatomical prior of "Add the
finding of right pleural effusion." times a smooth relevance-like map. Also timed, for information: the whole
image as mask (tau = 0, plain IP2P) and a 16-bit MONOCHROME1 DICOM with rescale and window. Prints the median of
--repeats runs; the last line is `composite_s=` (PNG 16-bit, the default settings).
"""

import argparse
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=3000)
    ap.add_argument("--model", type=int, default=512, help="model resolution (latent = model / 8)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    from pydicom.dataset import Dataset

    from x2x_jax.data import io as xio
    from x2x_jax.data.dicom import DicomDisplay
    from x2x_jax.editing import api, fullres
    from x2x_jax.editing.priors import prior_for_instruction

    rng = np.random.default_rng(0)
    n, size = a.size, a.model
    yy, xx = np.mgrid[0:n, 0:n] / n
    stored = np.clip(30000 + 20000 * np.sin(6 * yy) * np.cos(5 * xx) + rng.normal(0, 800, (n, n)), 0, 65535)
    meta = xio.ImageMeta(path="bench.png", kind="png", height=n, width=n, bit_depth=16, mode="I;16", channels=1)
    png = xio.Source(pixels=stored.astype(np.uint16), meta=meta, levels=65535)
    model_input = xio.resize_to_model(png.grey, size) * 2 - 1
    box = xio.content_box(n, n, size)
    prior, _ = prior_for_instruction("Add the finding of right pleural effusion.", size, size)
    lat = size // 8
    prior_lat = prior.reshape(lat, 8, lat, 8).mean(axis=(1, 3))
    relevance = np.clip(0.5 + 0.5 * np.sin(np.mgrid[0:lat, 0:lat][0] / 7.0), 0, 1)
    g = (prior_lat * relevance).astype(np.float32)
    decoded = np.clip(model_input + 0.4 * prior, -1, 1).astype(np.float32)
    feather = fullres.default_feather(n, n, box[2:])

    ds = Dataset()
    ds.Rows = ds.Columns = n
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 0
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 2, -1024, 1500, 3000
    dstored = (stored / 16).astype(np.uint16)
    dmeta = xio.ImageMeta(path="bench.dcm", kind="dicom", height=n, width=n, bit_depth=16, mode="uint16", channels=1)
    dicom = xio.Source(pixels=dstored, meta=dmeta, dicom=DicomDisplay(ds, dstored, "bench.dcm"))

    def timed(source, tau, keep):
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            r = fullres.composite(source, decoded, model_input, g, tau, size=size, box=box, feather=feather,
                                  keep_detail=keep)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), r

    keep_default = api.Settings().keep_detail
    print(f"input {n}x{n} 16-bit, model {size} px (latent {lat}), feather {feather} px, repeats {a.repeats}")
    rows = [("png16 tau=0.1 keep_detail=off", png, 0.1, False), ("png16 tau=0.1 keep_detail=on", png, 0.1, True),
            ("png16 tau=0 (whole image) keep_detail=on", png, 0.0, True),
            ("dicom mono1 tau=0.1 keep_detail=on", dicom, 0.1, True)]
    for name, source, tau, keep in rows:
        s, r = timed(source, tau, keep)
        print(f"{name}: {s:.3f} s (mask {100 * r.mask.mean():.1f} % of the image)")
    s, _ = timed(png, 0.1, keep_default)
    print(f"composite_s={s:.3f}")


if __name__ == "__main__":
    main()
