"""Stage "text": a text tower that knows the instruction grammar, for worlds without a pretrained CLIP.

The real recipe freezes OpenAI's CLIP text encoder, which already maps "pleural effusion" and "cardiomegaly" to
different places. The synthetic world has no such encoder: a frozen *random* one gives the UNet token embeddings
that say nothing about which finding an instruction names. This stage pretrains the config's CLIP text encoder
contrastively, CLIP-style, against the change the instruction describes: an image tower reads the (past, current)
pair, the text encoder reads the instruction, and a symmetric InfoNCE loss pulls each instruction towards its own
pair. Instructions repeat within a batch ("Add the finding of edema." is common), so every pair whose instruction
has the same token ids counts as a positive (soft targets), never as a negative. The UNet stage then freezes the
exported encoder (`model.text_encoder_from`), as the paper's recipe freezes CLIP.

Export: WORKDIR/export/text_encoder (a transformers CLIPTextModel folder); the image tower is discarded.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from x2x_jax.convert import diffusers as bridge
from x2x_jax.training import data
from x2x_jax.training.components import build_components
from x2x_jax.training.stages.base import Built
from x2x_jax.training.step import image_batch_dims

KEYS = ("past", "current", "input_ids")


class PairTower(nn.Module):
    """The (past, current) pair and their difference (amplified: the change is small next to the anatomy) as three
    channels -> a unit-norm embedding: convs with stride-2 downsampling, then flattened, not pooled, so that where
    the change is (apex, base, heart border) survives into the projection."""

    embed_dim: int
    widths: tuple[int, ...] = (16, 32, 64, 64)

    @nn.compact
    def __call__(self, past, current):
        x = jnp.stack([past, current, 4.0 * (current - past)], axis=-1)
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Conv(w, (3, 3), name=f"conv{i}")(x))
            x = nn.relu(nn.Conv(w, (3, 3), strides=(2, 2), name=f"down{i}")(x))
        x = nn.Dense(self.embed_dim, name="proj")(x.reshape(x.shape[0], -1))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


@dataclasses.dataclass(frozen=True)
class ContrastiveObjective:
    """Symmetric InfoNCE between pair embeddings and the text encoder's pooled (end-token) output, projected to the
    same width; trainable params {"text_encoder", "pair", "text_proj", "logit_scale"}."""

    text_encoder: Any
    pair: PairTower

    def batch_dims(self, batch: dict) -> tuple[int, int, tuple[int, int]]:
        return image_batch_dims(batch)

    def draw(self, key: jax.Array, accum: int, micro: int, image_hw: tuple[int, int]) -> dict:
        return {}  # nothing random: the data pipeline's augmentation is the only noise

    def prepare(self, frozen: dict, batch: dict, rand: dict) -> dict:
        return batch

    def embed_text(self, params, ids):
        pooled = self.text_encoder.apply({"params": params["text_encoder"]}, ids)[1].astype(jnp.float32)
        t = pooled @ params["text_proj"]
        return t / jnp.linalg.norm(t, axis=-1, keepdims=True).clip(1e-6)

    def loss(self, params, inputs: dict) -> jax.Array:
        img = self.pair.apply({"params": params["pair"]}, inputs["past"], inputs["current"])
        txt = self.embed_text(params, inputs["input_ids"])
        return soft_infonce(jnp.exp(params["logit_scale"]) * img @ txt.T, inputs["input_ids"])


def soft_infonce(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Symmetric InfoNCE of (pairs, instructions) logits where every instruction with the same token ids as a
    pair's own is a positive for it, with equal share (soft targets; the relation is symmetric, so the same
    targets serve both directions)."""
    same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1).astype(jnp.float32)
    targets = same / same.sum(-1, keepdims=True)
    xent = lambda lg: -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(lg, axis=-1), axis=-1))  # noqa: E731
    return 0.5 * (xent(logits) + xent(logits.T))


def retrieval_accuracy(objective: ContrastiveObjective, params, batch: dict) -> jax.Array:
    """Share of pairs whose most similar instruction in the batch has their instruction's token ids."""
    img = objective.pair.apply({"params": params["pair"]}, batch["past"], batch["current"])
    txt = objective.embed_text(params, batch["input_ids"])
    best = jnp.argmax(img @ txt.T, axis=-1)
    return jnp.mean(jnp.all(batch["input_ids"][best] == batch["input_ids"], axis=-1))


@dataclasses.dataclass(frozen=True)
class TextStage:
    source: Any = None  # a record source instead of the config's TFDS build
    name: str = "text"

    def build(self, config, mesh, abstract: bool = False) -> Built:
        comps = build_components(config, jax.random.key(config.seed), mesh, with_unet=False, abstract=abstract)
        text = comps.text_encoder
        embed = int(text.hidden_size)
        pair = PairTower(embed)
        r = config.data.resolution
        image = jax.ShapeDtypeStruct((r, r), jnp.float32)
        k_pair, k_proj = jax.random.split(jax.random.key(config.seed + 1))

        def init():
            p = pair.init(k_pair, jnp.zeros((1, r, r)), jnp.zeros((1, r, r)))["params"]
            proj = jax.random.normal(k_proj, (embed, embed)) / math.sqrt(embed)
            return {"text_encoder": comps.params["text_encoder"], "pair": p, "text_proj": proj,
                    "logit_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32)}  # CLIP's initial temperature

        trainable = jax.eval_shape(init) if abstract else jax.jit(init)()

        objective = ContrastiveObjective(text, pair)

        def export(params, stream, workdir: Path) -> dict:
            batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), next(stream))
            acc = float(jax.jit(lambda p, b: retrieval_accuracy(objective, p, b))(params, batch))
            dst = workdir / "export"
            if jax.process_index() == 0:
                bridge.save_text_encoder(dst / "text_encoder", text.clone(dtype=jnp.float32),
                                         params["text_encoder"])
            return {"export": str(dst), "retrieval_accuracy": acc}

        return Built(objective=objective, trainable=trainable, frozen={},
                     example={"past": image, "current": image,
                              "input_ids": jax.ShapeDtypeStruct((text.max_position_embeddings,), jnp.int32)},
                     data=data.stage_batches(config, self.source, KEYS, tokenizer=comps.tokenizer), export=export)
