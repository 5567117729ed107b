"""Why the paper's relevance map localizes poorly on the shipped model: its parts measured one by one.

    python benchmarks/relevance_study.py [--split val --n 64 --noise-levels 0.2,0.4,0.6,0.8,0.95 --draws 1,4]

On the first N examples of a synthetic split (true change masks), for each noise level and number of relevance
draws K: the pixel AUROC of the raw relevance R alone (no prior), of the prior alone and of G = prior x R; the area
and IoU of G >= 0.1 (the paper's tau), the best IoU over tau, and the median of the normalised R inside the prior
(why tau = 0.1 keeps so much); the AUROC difference G - prior is paired per image, with its 95 % bootstrap
interval (1,000 resamples). The ceiling row is the true change mask averaged over latent cells and upsampled:
the best IoU any map at latent resolution can reach. Prints figures; asserts nothing. Same seeds -> same figures.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from x2x_jax.data import synthetic  # noqa: E402
from x2x_jax.editing import relevance  # noqa: E402
from x2x_jax.editing.api import DEFAULT_MODEL, load_edit_model  # noqa: E402
from x2x_jax.editing.priors import prior_for_instruction  # noqa: E402
from x2x_jax.editing.rse import encode_inputs, pool_to_latent, upsample_nearest  # noqa: E402
from x2x_jax.evaluate import metrics  # noqa: E402
from x2x_jax.models.tokenizer import tokenize  # noqa: E402
from x2x_jax.models.vae import latent_factor  # noqa: E402

TAUS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def best_iou(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """(tau, mean IoU) of the single tau in TAUS that maximizes the mean IoU of maps >= tau."""
    ious = [float(np.nanmean(metrics.thresholded_iou(maps, masks, t))) for t in TAUS]
    i = int(np.argmax(ious))
    return float(TAUS[i]), ious[i]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--noise-levels", default="0.2,0.4,0.6,0.8,0.95")
    p.add_argument("--draws", default="1,4")
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args(argv)
    model, params, tokenizer = load_edit_model(a.model)
    f = latent_factor(model.vae)
    q = lambda x: synthetic.to_uint8(x).astype(np.float32) / 127.5 - 1.0  # noqa: E731  (as the evaluation reads)
    ex = list(synthetic.iterate_split(a.split, a.n))
    images = np.stack([q(e["past"]) for e in ex])
    masks = np.stack([e["mask"] for e in ex]) > 0.5
    texts = [e["instruction"] for e in ex]
    size = images.shape[1]
    priors = np.stack([prior_for_instruction(t, size, size)[0] for t in texts]).astype(np.float32)
    ids = np.asarray(tokenize(tokenizer, texts)[0], np.int32)
    empty = np.asarray(tokenize(tokenizer, [""])[0][0], np.int32)
    T = model.schedule.num_train_timesteps
    prior_lat = np.asarray(upsample_nearest(pool_to_latent(jnp.asarray(priors), f), f))
    inside = prior_lat > 0.5

    @jax.jit
    def raw_maps(images, ids, seeds, t_rel, k_draws):
        enc = encode_inputs(model, params, images, ids, empty, seeds, k_draws.shape[0])
        return relevance.raw_relevance(model.unet, params["unet"], model.schedule, enc["z_src"], enc["image_latents"],
                                       enc["context"], enc["empty_context"], t_rel, enc["noise"]["relevance"])

    print(f"{a.split} split, first {len(ex)} examples, true change {100 * masks.mean():.1f} % of the pixels, "
          f"latent factor {f}; model {a.model}")
    prior_aurocs = metrics.map_auroc(prior_lat, masks)
    prior_auroc = float(np.nanmean(prior_aurocs))
    boot = metrics.bootstrap_indices(len(ex))
    pooled = np.asarray(upsample_nearest(pool_to_latent(jnp.asarray(masks, jnp.float32), f), f))
    ctau, ciou = best_iou(pooled, masks)
    ptau, piou = best_iou(prior_lat, masks)
    print(f"ceiling (true mask at latent resolution): best IoU {ciou:.3f} at tau {ctau}; "
          f"prior alone: AUROC {prior_auroc:.3f}, IoU at 0.1 "
          f"{np.nanmean(metrics.thresholded_iou(prior_lat, masks, 0.1)):.3f}, best IoU {piou:.3f} "
          f"at tau {ptau}, area >= 0.1 {100 * np.mean(prior_lat >= 0.1):.0f} %")
    print("| noise level | K | AUROC R alone | AUROC G | AUROC G - prior | area G >= 0.1 | IoU G >= 0.1 | "
          "best IoU G (tau) | median R in prior |")
    print("|---|---|---|---|---|---|---|---|---|")
    for level in [float(x) for x in a.noise_levels.split(",")]:
        for k in [int(x) for x in a.draws.split(",")]:
            t0 = time.perf_counter()
            t_rel = jnp.int32(np.clip(round(level * T), 0, T - 1))
            raws = [raw_maps(images[i:i + a.batch], ids[i:i + a.batch],
                                  np.arange(i, min(i + a.batch, len(ex)), dtype=np.uint32), t_rel, jnp.zeros(k))
                    for i in range(0, len(ex), a.batch)]
            raw = jnp.concatenate(raws)
            r_norm = relevance.clip_and_normalize(raw)
            r_px = np.asarray(upsample_nearest(r_norm, f))
            g_px = np.asarray(upsample_nearest(pool_to_latent(jnp.asarray(priors), f) * r_norm, f))
            auroc_r = float(np.nanmean(metrics.map_auroc(np.asarray(upsample_nearest(raw, f)), masks)))
            aurocs_g = metrics.map_auroc(g_px, masks)
            auroc_g = float(np.nanmean(aurocs_g))
            diff = aurocs_g - prior_aurocs  # paired per image
            lo, hi = metrics.percentile_interval(np.nanmean(diff[boot], axis=1))
            btau, biou = best_iou(g_px, masks)
            print(f"| {level:g} | {k} | {auroc_r:.3f} | {auroc_g:.3f} | {auroc_g - prior_auroc:+.3f} ({lo:+.3f}..{hi:+.3f}) | "
                  f"{100 * np.mean(g_px >= 0.1):.0f} % | {np.nanmean(metrics.thresholded_iou(g_px, masks, 0.1)):.3f} "
                  f"| {biou:.3f} ({btau:g}) | {np.median(r_px[inside]):.2f} |  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
