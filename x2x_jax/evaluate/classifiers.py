"""Evaluators trained on the synthetic set: a small Flax CNN with a multi-label finding head and identity heads.

No chest-radiograph classifier ships offline (see STACK.md), so the project trains its own on
`x2x_jax.data.synthetic` images. One network, shared trunk, four heads:

* ``labels``: probabilities of the 8 `SYNTH_FINDINGS` (multi-label, sigmoid),
* ``age``: age in years (regression), ``habitus``: the body-width factor (regression),
* ``sex``: probability that the patient is male.

Every image of a pair is a training example: the past image with ``past_labels``, the current image with
``current_labels``, both with the patient's identity. The penultimate activations (`features`) serve the Fréchet
distance of `metrics.frechet_distance`.

Train (2 CPU cores, a few minutes; prints held-out metrics and writes ``DIR/model.safetensors`` +
``DIR/config.json``)::

    python -m x2x_jax.evaluate.classifiers train --out DIR [--size 64 --num-train 5000 --steps 1000 --seed 0
        --widths 8,16,32,64 --feature-dim 128 --no-balance]
    python -m x2x_jax.evaluate.classifiers eval --dir DIR [--num-val 500]

Use::

    clf = load_classifier(DIR)            # or SHIPPED_DIR, the committed one
    out = predict(clf, images)            # images [N, H, W] or [N, H, W, 1] in [-1, 1]
    feats = features(clf, images)         # [N, feature_dim]

The result is a function of (``--seed``, ``--data-seed``, sizes, steps) only: initialisation and batch order come
from ``--seed``, the synthetic examples from ``--data-seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from x2x_jax.data import synthetic
from x2x_jax.errors import ConfigError, WeightsError, cli_main
from x2x_jax.evaluate import metrics

FINDINGS = synthetic.SYNTH_FINDINGS
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "synth_classifier"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# Regression targets are standardised with these constants (ranges of `synthetic._sample_patient`).
AGE_MEAN, AGE_SCALE = 55.0, 20.0
HABITUS_MEAN, HABITUS_SCALE = 1.0, 0.05
FORMAT_VERSION = 1


class ClassifierNet(nn.Module):
    """Conv trunk (two 3x3 convs per stage, then 2x2 max pooling), flatten, one dense feature layer, heads.

    Flattening (not global pooling) keeps where a feature is, which findings such as pneumothorax (apex) and
    cardiomegaly (heart width vs thorax width) depend on; it ties the network to one input size.
    """

    widths: tuple[int, ...] = (8, 16, 32, 64)
    feature_dim: int = 128
    num_findings: int = len(FINDINGS)

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Conv(w, (3, 3), name=f"stage{i}_conv0")(x))
            x = nn.relu(nn.Conv(w, (3, 3), name=f"stage{i}_conv1")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))  # small findings: max beat average pooling on val AUROC
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
        return {
            "features": feats,
            "labels": nn.Dense(self.num_findings, name="labels_head")(feats),
            "age": nn.Dense(1, name="age_head")(feats)[:, 0],
            "sex": nn.Dense(1, name="sex_head")(feats)[:, 0],
            "habitus": nn.Dense(1, name="habitus_head")(feats)[:, 0],
        }


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Trained parameters plus the config they were saved with (architecture, image size, metrics)."""

    params: dict
    config: dict


def _arch(config: dict) -> tuple[tuple[int, ...], int, int, int]:
    return tuple(config["widths"]), int(config["feature_dim"]), int(config["num_findings"]), int(config["image_size"])


def _arch_from_params(params: dict) -> tuple[tuple[int, ...], int, int, int]:
    """(widths, feature_dim, num_findings, image_size) read off the parameter shapes."""
    n = sum(1 for k in params if k.startswith("stage") and k.endswith("_conv0"))
    widths = tuple(int(params[f"stage{i}_conv0"]["kernel"].shape[-1]) for i in range(n))
    fin, fdim = params["features"]["kernel"].shape
    side = int(round((fin / widths[-1]) ** 0.5))
    return widths, int(fdim), int(params["labels_head"]["kernel"].shape[-1]), side * 2**n


@functools.lru_cache(maxsize=None)
def _apply_fn(widths: tuple[int, ...], feature_dim: int, num_findings: int):
    net = ClassifierNet(widths, feature_dim, num_findings)
    return jax.jit(lambda params, x: net.apply({"params": params}, x))


def _as_nhwc(images, image_size: int) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ConfigError(f"images must be [N, H, W] or [N, H, W, 1], got shape {x.shape}")
    if x.shape[1:3] != (image_size, image_size):
        raise ConfigError(f"this classifier takes {image_size}x{image_size} images, got {x.shape[1]}x{x.shape[2]}; "
                          "resize first")
    return x


def _raw_outputs(model, images, batch_size: int) -> dict:
    if isinstance(model, Classifier):
        params, arch = model.params, _arch(model.config)
    else:
        params, arch = model, _arch_from_params(model)
    x = _as_nhwc(images, arch[3])
    fn = _apply_fn(*arch[:3])
    outs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(x) > batch_size:  # pad the tail so every call has one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(params, chunk)))
    if not outs:
        raise ConfigError("no images given")
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _decode(raw: dict) -> dict:
    return {
        "labels": np.asarray(jax.nn.sigmoid(raw["labels"])),
        "age": raw["age"] * AGE_SCALE + AGE_MEAN,
        "sex": np.asarray(jax.nn.sigmoid(raw["sex"])),
        "habitus": raw["habitus"] * HABITUS_SCALE + HABITUS_MEAN,
    }


def predict(model, images, batch_size: int = 256) -> dict:
    """Predictions for images ``[N, H, W]`` (or ``[N, H, W, 1]``) in [-1, 1].

    ``model``: a `Classifier` or its raw params (the architecture is read off their shapes). Returns
    ``labels`` [N, 8] probabilities (order `FINDINGS`), ``age`` [N] years, ``sex`` [N] probability of male,
    ``habitus`` [N].
    """
    return _decode(_raw_outputs(model, images, batch_size))


def features(model, images, batch_size: int = 256) -> np.ndarray:
    """Penultimate activations ``[N, feature_dim]`` (for `metrics.frechet_distance`)."""
    return _raw_outputs(model, images, batch_size)["features"]


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_split(split: str, num_examples: int, size: int, seed: int = 0) -> dict:
    """Both images of the first ``num_examples`` synthetic pairs of ``split`` with their targets.

    Returns ``images`` [2N, size, size] float32, ``labels`` [2N, 8] uint8, ``age`` / ``habitus`` [2N] float32,
    ``male`` [2N] uint8 (past images first, then current images), ``edited`` [2N, 8] bool: the (current image,
    finding) cells the pair's instruction edits — the cells an edit evaluation scores (all False for past images).
    """
    past, cur, pl, cl, age, hab, male, edited = [], [], [], [], [], [], [], []
    for ex in synthetic.iterate_split(split, num_examples, size, seed):
        past.append(ex["past"])
        cur.append(ex["current"])
        pl.append(ex["past_labels"])
        cl.append(ex["current_labels"])
        edited.append(metrics.edit_ops_per_finding(ex["edits"], FINDINGS) != "")
        ident = ex["identity"]
        age.append(ident["age_years"])
        hab.append(ident["habitus"])
        male.append(ident["sex"] == "M")
    twice = lambda v, dt: np.asarray(v + v, dt)  # noqa: E731
    return {
        "images": np.asarray(past + cur, np.float32),
        "labels": np.asarray(pl + cl, np.uint8),
        "age": twice(age, np.float32),
        "habitus": twice(hab, np.float32),
        "male": twice(male, np.uint8),
        "edited": np.concatenate([np.zeros((len(edited), len(FINDINGS)), bool), np.asarray(edited, bool)]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Training


def _loss(params, net, batch, positive_weight):
    out = net.apply({"params": params}, batch["images"][..., None])
    bce = optax.sigmoid_binary_cross_entropy
    weight = jnp.where(batch["labels"] > 0, positive_weight, 1.0)  # [F] weights of a present finding
    label_loss = (weight * bce(out["labels"], batch["labels"])).sum(-1).mean()
    sex_loss = bce(out["sex"], batch["male"]).mean()
    age_loss = jnp.mean((out["age"] - (batch["age"] - AGE_MEAN) / AGE_SCALE) ** 2)
    hab_loss = jnp.mean((out["habitus"] - (batch["habitus"] - HABITUS_MEAN) / HABITUS_SCALE) ** 2)
    total = label_loss + sex_loss + age_loss + hab_loss
    return total, {"labels": label_loss, "sex": sex_loss, "age": age_loss, "habitus": hab_loss}


def evaluate(model, data: dict) -> dict:
    """Held-out metrics of a classifier on `load_split` output."""
    p = predict(model, data["images"])
    per = {}
    for i, f in enumerate(FINDINGS):
        y = data["labels"][:, i].astype(bool)
        yhat = p["labels"][:, i] >= 0.5
        tpr = yhat[y].mean() if y.any() else np.nan
        tnr = (~yhat[~y]).mean() if (~y).any() else np.nan
        per[f] = {"accuracy": float((yhat == y).mean()), "balanced_accuracy": float(np.nanmean([tpr, tnr])),
                  "auroc": metrics.roc_auc(p["labels"][:, i], y), "prevalence": float(y.mean())}
    mean = lambda key: float(np.nanmean([v[key] for v in per.values()]))  # noqa: E731
    right = (p["labels"] >= 0.5) == data["labels"].astype(bool)
    edited = data["edited"]
    for i, f in enumerate(FINDINGS):
        per[f]["edited_accuracy"] = float(right[edited[:, i], i].mean()) if edited[:, i].any() else float("nan")
        per[f]["edited_cells"] = int(edited[:, i].sum())
    return {
        "num_images": int(len(data["images"])),
        "edited_accuracy": float(right[edited].mean()) if edited.any() else float("nan"),
        "edited_cells": int(edited.sum()),
        "findings": per,
        "mean_accuracy": mean("accuracy"),
        "mean_balanced_accuracy": mean("balanced_accuracy"),
        "mean_auroc": mean("auroc"),
        "age_pearson": metrics.pearson(p["age"], data["age"]),
        "age_mae_years": float(np.mean(np.abs(p["age"] - data["age"]))),
        "sex_accuracy": metrics.binary_accuracy(p["sex"], data["male"]),
        "habitus_pearson": metrics.pearson(p["habitus"], data["habitus"]),
        "habitus_mae": float(np.mean(np.abs(p["habitus"] - data["habitus"]))),
    }


def train(out_dir, *, size: int = 64, num_train: int = 5000, num_val: int = 500, steps: int = 1000,
          batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0, data_seed: int = 0,
          widths: tuple[int, ...] = (8, 16, 32, 64), feature_dim: int = 128, balance: bool = True,
          log_every: int = 100, log=print) -> Classifier:
    """Train on the synthetic train split, evaluate on the val split, save to ``out_dir``; returns the model.

    ``balance``: weight each finding's positives by its negatives-to-positives ratio in the training data, so that
    a finding present in 15 % of the images is not called absent whenever in doubt: an edit evaluation scores the
    cells an instruction touches, where present and absent are about equally common. The saved config records the
    arguments, the measured wall-clock times and the val metrics.
    """
    if size % 2 ** len(widths):
        raise ConfigError(f"--size must be a multiple of {2 ** len(widths)} for {len(widths)} stages, got {size}")
    for name, v in (("num_train", num_train), ("num_val", num_val), ("steps", steps), ("batch_size", batch_size)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    data = load_split("train", num_train, size, data_seed)
    val = load_split("val", num_val, size, data_seed)
    t_data = time.perf_counter() - t0
    log(f"data: {len(data['images'])} train / {len(val['images'])} val images at {size} px in {t_data:.1f} s")

    prevalence = np.clip(data["labels"].mean(0), 1e-3, 1 - 1e-3)
    positive_weight = jnp.asarray((1 - prevalence) / prevalence if balance else np.ones_like(prevalence),
                                  jnp.float32)
    net = ClassifierNet(tuple(widths), feature_dim, len(FINDINGS))
    key = jax.random.PRNGKey(seed)
    params = net.init(key, jnp.zeros((1, size, size, 1)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1), steps)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, parts), grads = jax.value_and_grad(_loss, has_aux=True)(params, net, batch, positive_weight)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    n = len(data["images"])
    rng = np.random.default_rng([seed, 0xC1A55])
    order, pos = rng.permutation(n), 0
    t1 = time.perf_counter()
    for i in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + min(batch_size, n)]
        pos += batch_size
        batch = {k: jnp.asarray(data[k][idx]) for k in ("images", "labels", "age", "habitus", "male")}
        params, opt_state, loss, parts = step(params, opt_state, batch)
        if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            parts = {k: round(float(v), 4) for k, v in parts.items()}
            log(f"step {i + 1}/{steps} loss {float(loss):.4f} {parts} ({time.perf_counter() - t1:.0f} s)")
    params = jax.device_get(params)
    t_train = time.perf_counter() - t1

    config = {
        "format_version": FORMAT_VERSION,
        "findings": list(FINDINGS),
        "image_size": size,
        "widths": list(widths),
        "feature_dim": feature_dim,
        "num_findings": len(FINDINGS),
        "outputs": {"labels": "sigmoid probabilities, order `findings`", "age": "years", "sex": "P(male)",
                    "habitus": "body-width factor"},
        "train_args": {"size": size, "num_train": num_train, "num_val": num_val, "steps": steps,
                       "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
                       "data_seed": data_seed, "balance": balance},
    }
    model = Classifier(params, config)
    val_metrics = evaluate(model, val)
    config["val_metrics"] = val_metrics
    config["timing_s"] = {"data": round(t_data, 1), "train": round(t_train, 1)}
    save_classifier(out_dir, model)
    log(format_metrics(val_metrics))
    log(f"train time {t_train:.1f} s ({steps} steps, batch {batch_size}); data {t_data:.1f} s; saved {out_dir}")
    return model


def format_metrics(m: dict, split: str = "val") -> str:
    lines = [f"{split} ({m['num_images']} images): mean per-finding accuracy {m['mean_accuracy']:.3f}, "
             f"balanced {m['mean_balanced_accuracy']:.3f}, AUROC {m['mean_auroc']:.3f}; on the edited cells of "
             f"the current images (what an edit evaluation scores) {m['edited_accuracy']:.3f} "
             f"({m['edited_cells']} cells)"]
    for f, v in m["findings"].items():
        lines.append(f"  {f:17s} acc {v['accuracy']:.3f}  bal {v['balanced_accuracy']:.3f}  "
                     f"AUROC {v['auroc']:.3f}  prevalence {v['prevalence']:.3f}  edited cells "
                     f"{v['edited_accuracy']:.3f} (n={v['edited_cells']})")
    lines.append(f"  age: r {m['age_pearson']:.3f}, MAE {m['age_mae_years']:.1f} y; sex accuracy "
                 f"{m['sex_accuracy']:.3f}; habitus: r {m['habitus_pearson']:.3f}, MAE {m['habitus_mae']:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Files


def save_classifier(out_dir, model: Classifier) -> None:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in traverse_util.flatten_dict(model.params).items()}
    save_file(flat, str(out_dir / WEIGHTS_FILE), metadata={"format": "x2x_jax.evaluate.classifiers"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.config, indent=1) + "\n")


def load_classifier(path=SHIPPED_DIR) -> Classifier:
    """A classifier saved by `train` / `save_classifier` (default: the shipped one)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise WeightsError(f"{f}: missing (train one with `python -m x2x_jax.evaluate.classifiers train`)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_file}: not valid JSON ({e})") from e
    try:
        flat = load_file(str(w_file))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{w_file}: cannot read safetensors file ({e})") from e
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    for k in ("widths", "feature_dim", "num_findings", "image_size"):
        if k not in config:
            raise WeightsError(f"{cfg_file}: missing key {k!r}")
    expected = jax.eval_shape(lambda: ClassifierNet(*_arch(config)[:3]).init(
        jax.random.PRNGKey(0), jnp.zeros((1, config["image_size"], config["image_size"], 1)))["params"])
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    got = {k: v.shape for k, v in flat.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise WeightsError(f"{w_file}: parameters do not match {cfg_file} (first differences: {diff})")
    if not all(np.isfinite(v).all() for v in flat.values()):
        raise WeightsError(f"{w_file}: non-finite parameters")
    return Classifier(params, config)


# ----------------------------------------------------------------------------------------------------------------
# CLI


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m x2x_jax.evaluate.classifiers",
                                 description="Train / evaluate the synthetic finding + identity classifier.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on the synthetic train split, report val metrics, save")
    t.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--num-train", type=int, default=5000, help="synthetic train pairs (2 images each)")
    t.add_argument("--num-val", type=int, default=500, help="synthetic val pairs for the held-out report")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")
    t.add_argument("--widths", default="8,16,32,64", help="channels of the conv stages (each halves the size)")
    t.add_argument("--feature-dim", type=int, default=128, help="width of the feature layer")
    t.add_argument("--no-balance", dest="balance", action="store_false",
                   help="plain finding loss (default: positives weighted by each finding's negatives/positives)")
    e = sub.add_parser("eval", help="held-out metrics of a saved classifier")
    e.add_argument("--dir", default=str(SHIPPED_DIR))
    e.add_argument("--num-val", type=int, default=500, help="pairs of --split to evaluate (2 images each)")
    e.add_argument("--data-seed", type=int, default=0)
    e.add_argument("--split", default="val", choices=sorted(synthetic.SPLITS))
    args = ap.parse_args(argv)
    if args.cmd == "train":
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            raise ConfigError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
        train(args.out, size=args.size, num_train=args.num_train, num_val=args.num_val, steps=args.steps,
              batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, data_seed=args.data_seed,
              widths=widths, feature_dim=args.feature_dim, balance=args.balance)
    else:
        clf = load_classifier(args.dir)
        data = load_split(args.split, args.num_val, clf.config["image_size"], args.data_seed)
        print(format_metrics(evaluate(clf, data), args.split))


if __name__ == "__main__":
    main()
