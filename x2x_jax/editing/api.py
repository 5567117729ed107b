"""Edit image files: load a model directory once, validate requests, run the compiled RSE program, write results.

Everything a request can get wrong (image, instruction, parameters) is checked before anything runs or is
written; results go to a temporary folder that is moved into place at the end, so a failure leaves no partial
output behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from x2x_jax.errors import ConfigError, InstructionError, WeightsError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = PACKAGE_DIR / "assets" / "synth_tiny"
DEFAULT_EXAMPLE = PACKAGE_DIR / "assets" / "examples" / "synth_test_0000.png"
DEFAULT_EXAMPLE_INSTRUCTION = PACKAGE_DIR / "assets" / "examples" / "synth_test_0000.txt"
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A diffusers directory, or a training workdir holding one (export/ or unet/export/)."""
    root = Path(path)
    for candidate in (root, root / "export", root / "unet" / "export"):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise WeightsError(f"{root}: not a model directory (no model_index.json in it, its export/ or unet/export/)")


@dataclasses.dataclass(frozen=True)
class Request:
    image: str
    instruction: str
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Settings:
    tau: float = 0.1
    steps: int = 100
    text_scale: float = 7.5
    image_scale: float = 1.5
    noise_level: float = 0.8
    renoise: str = "correct"
    relevance_draws: int = 1
    compare: bool = False

    def check(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"--tau must be in [0, 1], got {self.tau}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if not 0.0 < self.noise_level <= 1.0:
            raise ConfigError(f"--noise-level must be in (0, 1], got {self.noise_level}")
        if self.renoise not in ("correct", "paper"):
            raise ConfigError(f"--renoise must be 'correct' or 'paper', got {self.renoise!r}")
        if self.relevance_draws < 1:
            raise ConfigError(f"--relevance-draws must be >= 1, got {self.relevance_draws}")


class Editor:
    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL):
        import jax.numpy as jnp

        from x2x_jax.convert import diffusers as bridge
        from x2x_jax.convert.tokenizer import load_tokenizer, tokenize
        from x2x_jax.diffusion.schedule import noise_schedule
        from x2x_jax.editing.rse import EditModel

        self.model_dir = resolve_model_dir(model_dir)
        pipe = bridge.load_pipeline(self.model_dir, components=MODEL_COMPONENTS)
        if pipe.unet.in_channels != 2 * pipe.vae.latent_channels:
            raise WeightsError(f"{self.model_dir}: unet in_channels={pipe.unet.in_channels} is not an "
                               f"InstructPix2Pix UNet for {pipe.vae.latent_channels}-channel latents")
        self.tokenizer = load_tokenizer(self.model_dir)  # its own tokenizer/ when present, else CLIP's BPE file
        self._tokenize = tokenize
        self.model = EditModel(pipe.unet, pipe.vae, pipe.text_encoder, noise_schedule(pipe.scheduler_config),
                               pipe.scheduler_config)
        self.params = {"unet": pipe.unet_params, "vae": pipe.vae_params, "text_encoder": pipe.text_params}
        self.resolution = int(pipe.vae.sample_size)
        self.empty_ids = jnp.asarray(tokenize(self.tokenizer, [""])[0][0])
        self._programs: dict = {}

    def program(self, steps: int, relevance_draws: int):
        from x2x_jax.editing.rse import compile_edit

        key = (steps, relevance_draws)
        if key not in self._programs:
            self._programs[key] = compile_edit(self.model, steps, relevance_draws)
        return self._programs[key]

    def prepare(self, request: Request) -> dict:
        """Load and check one request (raises on bad input; nothing is run)."""
        from x2x_jax.data.instructions import parse
        from x2x_jax.data.io import load_image
        from x2x_jax.editing.priors import prior_for_edits

        text = request.instruction.strip()
        if not text:
            raise InstructionError(f"{request.image}: the instruction is empty")
        image, meta = load_image(request.image, self.resolution, fit="pad")
        ids, truncated = self._tokenize(self.tokenizer, [text])
        parsed = parse(text)
        top, left, h, w = meta.content_box
        prior_content, info = prior_for_edits(parsed, h, w)
        prior = np.zeros((self.resolution, self.resolution), np.float32)
        prior[top:top + h, left:left + w] = prior_content
        warn = list(info.warnings)
        if truncated[0]:
            warn.append("the instruction is longer than 77 CLIP tokens and was truncated")
        return {"request": request, "image": image, "meta": meta, "ids": ids, "parsed": parsed, "prior": prior,
                "prior_info": info, "warnings": warn}

    def run(self, prepared: dict, s: Settings, tau: float | None = None) -> tuple[dict, float]:
        first_call = (s.steps, s.relevance_draws) not in self._programs
        edit = self.program(s.steps, s.relevance_draws)
        t0 = time.perf_counter()
        out = edit(self.params, prepared["image"][None], prepared["ids"], self.empty_ids, prepared["prior"][None],
                   np.asarray([prepared["request"].seed], np.uint32), np.float32(s.tau if tau is None else tau),
                   np.float32(s.text_scale), np.float32(s.image_scale), np.float32(s.noise_level),
                   np.bool_(s.renoise == "paper"))
        out = {k: np.asarray(v)[0] for k, v in out.items()}
        return out, {"seconds": time.perf_counter() - t0, "includes_compile": first_call}

    def write(self, prepared: dict, s: Settings, dst: Path) -> dict:
        """Run one prepared request and write its files into `dst` (an existing empty folder)."""
        from x2x_jax.data.io import save_like
        from x2x_jax.editing import render

        out, seconds = self.run(prepared, s)
        meta, image = prepared["meta"], prepared["image"]
        edited = out["edited"]
        save_like(edited, meta, dst / "edited.png")
        guidance = out["guidance"].astype(np.float32)
        np.save(dst / "guidance.npy", guidance)
        overlay = render.guidance_overlay(image, guidance)
        overlay.save(dst / "guidance.png")
        render.mask_image(out["mask"]).save(dst / "mask.png")
        panels = [("input", _grey(image)), ("edited", _grey(edited)), ("guidance G", overlay)]
        timings = {"edit": seconds}
        if s.compare:
            plain, plain_s = self.run(prepared, s, tau=0.0)
            panels.append(("plain IP2P (tau=0)", _grey(plain["edited"])))
            timings["plain_ip2p"] = plain_s
        render.figure(panels, caption=prepared["request"].instruction).save(dst / "figure.png")
        parsed, info = prepared["parsed"], prepared["prior_info"]
        record = {
            "image": str(prepared["request"].image), "instruction": prepared["request"].instruction,
            "model": str(self.model_dir), "seed": prepared["request"].seed, "resolution": self.resolution,
            "original_size": [meta.height, meta.width], "bit_depth": meta.bit_depth,
            "parameters": dataclasses.asdict(s),
            "parsed": {"edits": [dataclasses.asdict(e) for e in parsed.edits], "unparsed": list(parsed.unparsed),
                       "unknown_findings": list(parsed.unknown_findings)},
            "priors": {"findings": list(info.findings), "refinements": list(info.refinements),
                       "whole_image": bool(info.whole_image)},
            "mask_fraction": float(np.mean(out["mask"])),
            "warnings": prepared["warnings"],
            "timings": timings,
            "outputs": ["edited.png", "guidance.png", "guidance.npy", "mask.png", "figure.png", "edit.json"],
        }
        (dst / "edit.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        return record


def _grey(image: np.ndarray):
    from PIL import Image

    from x2x_jax.editing.render import to_uint8

    return Image.fromarray(to_uint8(image))


def edit_into(editor: Editor, requests: list[Request], settings: Settings, out: Path,
              subfolders: bool) -> list[dict]:
    """Validate every request, then edit all into `out` atomically (nothing is left there on failure)."""
    settings.check()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder")
    prepared = [editor.prepare(r) for r in requests]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        records = []
        for i, p in enumerate(prepared):
            dst = tmp / f"{i:04d}_{Path(p['request'].image).stem}" if subfolders else tmp
            dst.mkdir(exist_ok=True)
            records.append(editor.write(p, settings, dst))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return records
