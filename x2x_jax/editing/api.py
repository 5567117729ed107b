"""Edit image files: load a model directory once, validate requests, run the compiled RSE program, write results.

    editor = Editor("runs/v1")                          # a diffusers dir, or a training workdir holding one
    editor = Editor("runs/v1", guidance="learned")      # G from the guidance predictor in runs/v1/guidance/
    records = edit_into(editor, [Request("cxr.dcm", "Add the finding of pleural effusion.", seed=0)],
                        Settings(tau=0.1, steps=100), Path("out"), subfolders=False)

Everything a request can get wrong (image, instruction, seed, parameters, model) is checked before anything runs
or is written. Results are computed into a temporary folder beside --out and only then moved into place, so a
failure leaves nothing behind; files of the same name already in --out are replaced.

Outputs per edit (see `Editor.write`): edited.png (the input's own size; outside mask.png its pixels bit for bit,
see `x2x_jax.editing.fullres`), edited.dcm (DICOM inputs, `Settings.dicom_out`), guidance.png (G as a red overlay
on the input, at the input's size), guidance.npy (raw G, float32, latent resolution over the whole model canvas
including any letterbox padding), mask.png (the composite's mask at the input's size), figure.png, edit.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import x2x_jax
from x2x_jax import outputs
from x2x_jax.convert import diffusers as bridge
from x2x_jax.convert.diffusers import read_json
from x2x_jax.convert.guidance import load_guidance
from x2x_jax.data import dicom
from x2x_jax.data.instructions import parse
from x2x_jax.data.io import content_box, load_source, resize_to_model, save_pixels
from x2x_jax.diffusion.schedule import noise_schedule
from x2x_jax.editing import fullres, render
from x2x_jax.editing.priors import prior_for_instruction
from x2x_jax.editing.rse import RENOISE_MODES, EditModel, EditParams, compile_edit, latent_factor
from x2x_jax.errors import ConfigError, DataError, InstructionError, WeightsError
from x2x_jax.models.layers import kernels_in_compute_dtype
from x2x_jax.models.tokenizer import load_tokenizer, tokenize
from x2x_jax.targets import default_compute_dtype

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = PACKAGE_DIR / "assets" / "synth_tiny"
DEFAULT_EXAMPLE = PACKAGE_DIR / "assets" / "examples" / "synth_test_0207.png"
DEFAULT_EXAMPLE_INSTRUCTION = PACKAGE_DIR / "assets" / "examples" / "synth_test_0207.txt"
DEFAULT_OUT = "edit_out"
COMMAND = "x2x-edit"  # the marker of its output folders (x2x_jax.outputs)
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
OUTPUTS = ("edited.png", "guidance.png", "guidance.npy", "mask.png", "figure.png", "edit.json")
DICOM_OUTPUT = "edited.dcm"  # also written for a DICOM input (Settings.dicom_out)
# Keep the input's high-frequency detail inside the mask (fullres.composite): the default follows the measurement
# in README ("Full-resolution editing"): see there for the table.
KEEP_DETAIL_DEFAULT = True
DTYPES = ("auto", "float32", "bfloat16")
GUIDANCE = ("relevance", "learned")  # where G's map comes from: the UNet relevance map (the paper) or the predictor
GUIDANCE_FOLDER = "guidance"  # a model directory's learned guidance predictor (x2x_jax/models/guidance.py)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A diffusers directory, or a training workdir holding one (export/ or unet/export/)."""
    root = Path(path)
    for candidate in (root, root / "export", root / "unet" / "export"):
        if (candidate / "model_index.json").is_file():
            return candidate
    if not root.exists():
        raise WeightsError(f"{root}: model directory not found")
    raise WeightsError(f"{root}: not a model directory (no model_index.json in it, its export/ or unet/export/)")


def load_edit_model(model_dir: str | os.PathLike, *, dtype=None, guidance_dir: str | os.PathLike | None = None):
    """(EditModel, params, tokenizer) of a model directory (or a workdir holding one): the one way an edit model is
    built from a pipeline (the Editor, the guidance stage's frozen model, evaluations). Refuses a model that is not
    an InstructPix2Pix model. `dtype`: the modules' compute dtype (None: fp32 as loaded); `guidance_dir`: also the
    learned guidance predictor there (params["guidance"])."""
    root = resolve_model_dir(model_dir)
    try:
        pipe = bridge.load_pipeline(root, components=MODEL_COMPONENTS)
        tokenizer = load_tokenizer(root)  # its own tokenizer/ when present, else CLIP's BPE file
        schedule = noise_schedule(pipe.scheduler_config)
    except (KeyError, TypeError, ValueError) as e:  # a config that parses but does not describe our models
        raise WeightsError(f"{root}: cannot load the model ({type(e).__name__}: {e})") from e
    if pipe.unet.in_channels != 2 * pipe.vae.latent_channels:
        raise WeightsError(f"{root}: unet in_channels={pipe.unet.in_channels} is not an InstructPix2Pix UNet for "
                           f"{pipe.vae.latent_channels}-channel latents")
    cross = pipe.unet.cross_attention_dim
    if isinstance(cross, int) and cross != pipe.text_encoder.hidden_size:
        raise WeightsError(f"{root}: unet cross_attention_dim={cross} does not match the text encoder's "
                           f"hidden_size={pipe.text_encoder.hidden_size}")
    params = {"unet": pipe.unet_params, "vae": pipe.vae_params, "text_encoder": pipe.text_params}
    predictor = None
    if guidance_dir is not None:
        predictor, params["guidance"] = load_guidance(guidance_dir)
        if (predictor.latent_channels, predictor.cross_attention_dim) != (pipe.vae.latent_channels,
                                                                          pipe.text_encoder.hidden_size):
            raise WeightsError(f"{guidance_dir}: the guidance predictor takes {predictor.latent_channels}-channel "
                               f"latents and {predictor.cross_attention_dim}-d text states; this model has "
                               f"{pipe.vae.latent_channels} and {pipe.text_encoder.hidden_size}")
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, predictor]
    if dtype is not None:
        modules = [None if m is None else m.clone(dtype=jnp.dtype(dtype)) for m in modules]
        # The modules cast their kernels to the compute dtype at use anyway: cast once here (same numbers), so an
        # edit reads bf16 weights in each DDIM step instead of casting fp32 ones, and holds half the bytes.
        params = kernels_in_compute_dtype(params, dtype)
    unet, vae, text, predictor = modules
    return EditModel(unet, vae, text, schedule, pipe.scheduler_config, predictor), params, tokenizer


@dataclasses.dataclass(frozen=True)
class Request:
    image: str
    instruction: str
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of an edit (the CLI flags). tau = 0 is plain InstructPix2Pix."""

    tau: float = EditParams.tau
    steps: int = 100
    text_scale: float = EditParams.text_scale
    image_scale: float = EditParams.image_scale
    noise_level: float = EditParams.noise_level
    renoise: str = "correct"  # RENOISE_MODES; "paper": EditParams.renoise_paper
    relevance_draws: int = 1
    compare: bool = False
    batch_size: int = 1
    feather: int | None = None  # input pixels; None: fullres.default_feather (1 % of the short side or 1 model px)
    keep_detail: bool = KEEP_DETAIL_DEFAULT
    dicom_out: bool | None = None  # None: write edited.dcm when the input is a DICOM

    def check(self) -> None:
        self.edit_params().check()
        if self.renoise not in RENOISE_MODES:
            raise ConfigError(f"--renoise must be one of {RENOISE_MODES}, got {self.renoise!r}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.relevance_draws < 1:
            raise ConfigError(f"--relevance-draws must be >= 1, got {self.relevance_draws}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.feather is not None and (isinstance(self.feather, bool) or not isinstance(self.feather, int)
                                         or self.feather < 0):
            raise ConfigError(f"--feather must be a whole number of pixels >= 0 (0 = hard edge), got {self.feather}")

    def edit_params(self, tau: float | None = None) -> EditParams:
        return EditParams(self.tau if tau is None else tau, self.text_scale, self.image_scale, self.noise_level,
                          self.renoise == "paper")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked request with everything the program needs (built by `Editor.prepare`, nothing run yet)."""

    request: Request
    image: np.ndarray  # (size, size) float32 in [-1, 1], letterboxed
    meta: object  # x2x_jax.data.io.ImageMeta
    source_sha256: str  # of the file's bytes: `Editor.source` reloads it for the composite and checks it is the same
    ids: np.ndarray  # (77,) int32
    truncated: bool
    parsed: object  # x2x_jax.data.instructions.ParsedInstruction
    prior: np.ndarray  # (size, size) float32: the content box's prior, zero on the padding
    prior_info: object  # x2x_jax.editing.priors.PriorInfo
    warnings: tuple[str, ...]


def model_resolution(model_dir: Path, vae, unet) -> int | None:
    """The model's image size: the VAE config's sample_size when it has one, else UNet sample_size x factor
    (None when neither config says)."""
    size = read_json(model_dir / "vae" / "config.json", "vae config").get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if size:
        return int(size)
    size = unet.sample_size[0] if isinstance(unet.sample_size, (list, tuple)) else unet.sample_size
    return int(size) * latent_factor(vae) if size else None


class Editor:
    """A loaded model plus its compiled edit programs (one per (steps, relevance draws, batch)).

    guidance="learned" takes G's map from the learned guidance predictor in `guidance_dir` (default:
    MODEL/guidance/) instead of the UNet relevance map; G = prior * map and M = G >= tau either way.

    Progress (the browser editor): set `progress` to a function (phase, done, total) called with ("compiling", 0,
    steps) before a program compiles, ("running", 0, steps) before a call and, with report_steps=True, ("step", i,
    steps) after each DDIM step from inside the compiled program. `compiles` counts the programs compiled so far.
    """

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL, *, resolution: int | None = None,
                 dtype: str = "auto", guidance: str = "relevance", guidance_dir: str | os.PathLike | None = None,
                 report_steps: bool = False):
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        if guidance not in GUIDANCE:
            raise ConfigError(f"--guidance must be one of {GUIDANCE}, got {guidance!r}")
        if guidance_dir is not None and guidance != "learned":
            raise ConfigError("--guidance-model is only used with --guidance learned")
        t0 = time.perf_counter()
        self.model_dir = resolve_model_dir(model_dir)
        self.guidance = guidance
        self.guidance_dir = None
        if guidance == "learned":  # checked before the (slower) model load
            self.guidance_dir = Path(guidance_dir) if guidance_dir is not None else self.model_dir / GUIDANCE_FOLDER
            if not (self.guidance_dir / "config.json").is_file():
                raise WeightsError(f"{self.guidance_dir}: no learned guidance predictor (config.json) there; train "
                                   "one with `python train.py --config.stage=guidance`, pass --guidance-model DIR, "
                                   "or use --guidance relevance")
        if dtype == "auto":  # the program runs on this process's devices: they are its target
            dtype = jnp.dtype(default_compute_dtype()).name
        self.dtype = dtype
        self.model, params, tokenizer = load_edit_model(self.model_dir, dtype=dtype, guidance_dir=self.guidance_dir)
        self.tokenizer, self._tokenize = tokenizer, tokenize
        # On the device once: passing numpy params would copy every weight to the accelerator on every call.
        self.params = jax.device_put(params)
        vae, unet = self.model.vae, self.model.unet
        self.native_resolution = model_resolution(self.model_dir, vae, unet)
        # The image must downsample evenly through the VAE and then the UNet.
        self.multiple = latent_factor(vae) * 2 ** (len(unet.block_out_channels) - 1)
        self.resolution = self.native_resolution if resolution is None else int(resolution)
        if self.resolution is None:
            raise ConfigError(f"{self.model_dir}: neither the vae nor the unet config has a sample_size; pass "
                              "--resolution")
        if self.resolution < self.multiple or self.resolution % self.multiple:
            raise ConfigError(f"--resolution {self.resolution} must be a positive multiple of {self.multiple} for "
                              f"this model (its own: {self.native_resolution})")
        self.empty_ids = np.asarray(tokenize(tokenizer, [""])[0][0], np.int32)
        self.load_seconds = time.perf_counter() - t0
        self._programs: dict = {}
        self.compiles = 0
        self.report_steps = report_steps
        self.progress = None

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, int(done), int(total))

    # --- checking -------------------------------------------------------------------------------------------

    def check(self, s: Settings) -> None:
        s.check()
        if self.guidance == "learned" and s.relevance_draws != 1:
            raise ConfigError("--relevance-draws has no effect with --guidance learned (no relevance map is made)")
        T = self.model.schedule.num_train_timesteps
        if s.steps > T:
            raise ConfigError(f"--steps {s.steps} is more than the model's {T} training timesteps")

    def prepare(self, request: Request) -> Prepared:
        """Load and check one request (raises on bad input; nothing is run)."""
        text = (request.instruction or "").strip()
        if not text:
            raise InstructionError(f"{request.image}: the instruction is empty")
        if not isinstance(request.seed, (int, np.integer)) or not 0 <= request.seed < 2**32:
            raise ConfigError(f"{request.image}: seed must be an integer in [0, 2**32), got {request.seed!r}")
        source = load_source(request.image)
        image = np.clip(resize_to_model(source.grey, self.resolution, "pad") * 2.0 - 1.0, -1.0, 1.0)
        meta = dataclasses.replace(source.meta, size=self.resolution, fit="pad",
                                   content_box=content_box(source.meta.height, source.meta.width, self.resolution))
        ids, truncated = self._tokenize(self.tokenizer, [text])
        # The prior is drawn for the image's own box (its aspect ratio), then padded like the image.
        top, left, h, w = meta.content_box
        prior_content, info = prior_for_instruction(text, h, w)
        prior = np.zeros((self.resolution, self.resolution), np.float32)
        prior[top:top + h, left:left + w] = prior_content
        warn = list(info.warnings)
        if truncated[0]:
            warn.append("the instruction is longer than 77 CLIP tokens and was truncated")
        return Prepared(request, image, meta, _sha256(request.image), ids[0], bool(truncated[0]), parse(text), prior,
                        info, tuple(warn))

    def source(self, p: Prepared):
        """The request's image as stored (for the composite), reloaded and checked to be the file prepared."""
        source = load_source(p.request.image)
        if _sha256(p.request.image) != p.source_sha256:
            raise DataError(f"{p.request.image}: the file changed on disk while it was being edited")
        return source

    # --- running --------------------------------------------------------------------------------------------

    def _args(self, chunk: list[Prepared], s: Settings, tau: float | None):
        return (self.params, np.stack([p.image for p in chunk]), np.stack([p.ids for p in chunk]), self.empty_ids,
                np.stack([p.prior for p in chunk]), np.asarray([p.request.seed for p in chunk], np.uint32),
                s.edit_params(tau).traced())

    def program(self, s: Settings, example_args: tuple):
        """The compiled program for (steps, relevance draws, batch); returns (compiled, seconds spent compiling
        now: 0.0 when it was compiled before)."""
        draws = s.relevance_draws if self.guidance == "relevance" else 1  # no relevance passes with learned G
        key = (s.steps, draws, example_args[1].shape[0])
        if key in self._programs:
            return self._programs[key], 0.0
        self._report("compiling", 0, s.steps)
        t0 = time.perf_counter()
        steps = s.steps
        on_step = (lambda done: self._report("step", done, steps)) if self.report_steps else None
        compiled = compile_edit(self.model, s.steps, draws, self.guidance, on_step).lower(*example_args).compile()
        self._programs[key] = compiled
        self.compiles += 1
        return compiled, time.perf_counter() - t0

    def run(self, prepared: list[Prepared], s: Settings, tau: float | None = None) -> tuple[list[dict], dict]:
        """Edit up to s.batch_size prepared requests in one call (padded to the batch by repeating the last one).

        Returns one dict of numpy arrays per request (see `rse.edit_batch`) and the call's timings.
        """
        n = len(prepared)
        if not 1 <= n <= s.batch_size:
            raise ValueError(f"run takes 1..{s.batch_size} requests, got {n}")
        args = self._args(prepared + [prepared[-1]] * (s.batch_size - n), s, tau)
        compiled, compile_s = self.program(s, args)
        self._report("running", 0, s.steps)
        t0 = time.perf_counter()
        out = jax.device_get(jax.block_until_ready(compiled(*args)))
        run_s = time.perf_counter() - t0
        per = [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(n)]
        return per, {"compile_s": compile_s, "run_s": run_s, "edits_in_call": n, "batch_size": s.batch_size}

    # --- writing --------------------------------------------------------------------------------------------

    def write(self, p: Prepared, s: Settings, out: dict, timings: dict, dst: Path, plain: dict | None = None) -> dict:
        """Write one edit's files into `dst` (an existing empty folder); returns the edit.json record.

        The edited image is composited at the input's own geometry (`fullres.composite`): outside mask.png its
        pixels are the input's, bit for bit."""
        t0 = time.perf_counter()
        meta, size, box = p.meta, self.resolution, p.meta.content_box
        height, width = meta.height, meta.width
        source = self.source(p)
        guidance = np.asarray(out["guidance"], np.float32)
        feather = fullres.default_feather(height, width, box[2:]) if s.feather is None else s.feather
        t1 = time.perf_counter()
        result = fullres.composite(source, np.asarray(out["decoded"]), p.image, guidance, s.tau, size=size,
                                   box=box, feather=feather, keep_detail=s.keep_detail)
        composite_s = time.perf_counter() - t1

        dicom_out = meta.kind == "dicom" if s.dicom_out is None else s.dicom_out
        if meta.kind == "dicom":
            edited_grey = source.to_display(result.pixels)
            top = 2**meta.bit_depth - 1
            png = np.rint(edited_grey * top).astype(np.uint8 if meta.bit_depth == 8 else np.uint16)
        else:
            png = result.pixels
        save_pixels(png, dst / "edited.png")
        outputs = list(OUTPUTS)
        if dicom_out:
            dicom.write_derived(source.dicom.ds, result.pixels, dst / DICOM_OUTPUT, instruction=p.request.instruction,
                                model=str(self.model_dir))
            outputs.insert(1, DICOM_OUTPUT)
        np.save(dst / "guidance.npy", guidance)
        render.mask_image(result.mask).save(dst / "mask.png")
        input_grey = source.grey
        render.guidance_overlay(input_grey * 2.0 - 1.0, fullres.guidance_to_original(guidance, size, box, height,
                                                                                      width)).save(dst / "guidance.png")

        # The figure at a fixed height: the full-resolution images are shrunk, G is resampled straight to it.
        fig_h = min(height, render.FIGURE_HEIGHT)
        fig_w = max(1, round(width * fig_h / height))
        shrink = lambda a: render.resize_map(np.asarray(a, np.float32) * 2.0 - 1.0, fig_h, fig_w)  # noqa: E731
        output_grey = source.to_display(result.pixels) if meta.kind != "dicom" else edited_grey
        fig_input, fig_output = shrink(input_grey), shrink(output_grey)
        # The change, 4x amplified (black: unchanged), so that a small edit is visible at a glance.
        fig_diff = np.clip(np.abs(fig_output - fig_input) * 4.0 - 1.0, -1.0, 1.0)
        panels = [("input", render.grey_image(fig_input)), ("edited", render.grey_image(fig_output)),
                  ("|edited - input| x4", render.grey_image(fig_diff)),
                  ("guidance G", render.guidance_overlay(fig_input, fullres.guidance_to_original(
                      guidance, size, box, fig_h, fig_w)))]
        if plain is not None:
            top_, left, h, w = box
            panels.append(("plain IP2P (tau=0)", render.grey_image(plain["edited"][top_:top_ + h, left:left + w])))
        render.figure(panels, caption=p.request.instruction).save(dst / "figure.png")

        parsed, info = p.parsed, p.prior_info
        record = {
            "image": str(p.request.image),
            "instruction": p.request.instruction,
            "seed": int(p.request.seed),
            "model": str(self.model_dir),
            "parameters": {**dataclasses.asdict(s), "rse": s.tau > 0.0, "resolution": size,
                           "native_resolution": self.native_resolution, "fit": "pad", "dtype": self.dtype},
            "input": {"kind": meta.kind, "original_size": [height, width], "bit_depth": meta.bit_depth,
                      "mode": meta.mode, "window_source": meta.window_source, "content_box": list(box)},
            "output": {
                "size": [height, width],
                "composite": "at the input's own geometry: outside mask.png the input's pixels bit for bit "
                             "(PNG/JPEG levels, DICOM stored values); inside, the decoded edit resampled "
                             "(bicubic) from the content box, blended over the feather band",
                "mask": "G resampled bilinearly to the input's pixel grid, >= tau (mask.png is this mask)",
                "feather_px": result.feather,
                "feather_rule": "given (--feather)" if s.feather is not None else
                                f"default: max({fullres.FEATHER_FRACTION:.0%} of the short side, one model pixel)",
                "keep_detail": result.keep_detail,
                "blended_fraction": float(np.mean(result.alpha > 0)),
                "dicom": dicom_out,
            },
            "instruction_truncated": p.truncated,
            "parsed": {"edits": [dataclasses.asdict(e) for e in parsed.edits], "unparsed": list(parsed.unparsed),
                       "unknown_findings": list(parsed.unknown_findings)},
            "priors": {"findings": list(info.findings), "refinements": list(info.refinements),
                       "whole_image": bool(info.whole_image), "sources": dict(info.sources)},
            "warnings": list(p.warnings),
            "mask_fraction": float(result.mask.mean()),  # of the input's pixels
            "guidance": {"method": self.guidance,
                         "predictor": None if self.guidance_dir is None else str(self.guidance_dir),
                         "shape": list(guidance.shape), "max": float(guidance.max()),
                         "note": "guidance.npy covers the whole model canvas (padding included) at latent "
                                 "resolution"},
            "timings": {"model_load_s": self.load_seconds, **timings, "composite_s": round(composite_s, 4),
                        "write_s": round(time.perf_counter() - t0, 4)},
            "backend": _backend(),
            "outputs": outputs,
        }
        (dst / "edit.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        return record


def _sha256(path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({type(e).__name__}: {e})") from e


def _backend() -> dict:
    return {"platform": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "x2x_jax": x2x_jax.__version__}


def edit_into(editor: Editor, requests: list[Request], settings: Settings, out: Path,
              subfolders: bool, overwrite: bool = False) -> list[dict]:
    """Validate every request, then edit all into `out` (OUT/<row>_<stem>/ each when `subfolders`), under the
    output-folder policy of `x2x_jax.outputs`: `out` is replaced only when every edit succeeded.
    """
    editor.check(settings)
    out = Path(out)
    outputs.check(out, COMMAND, overwrite)
    if not requests:
        raise DataError("nothing to edit (no requests)")
    prepared = [editor.prepare(r) for r in requests]
    if settings.dicom_out:
        not_dicom = [p.request.image for p in prepared if p.meta.kind != "dicom"]
        if not_dicom:
            raise ConfigError(f"--dicom-out needs DICOM inputs; {not_dicom[0]} is not a DICOM file")
    with outputs.staged(out, COMMAND) as tmp:
        records = []
        for start in range(0, len(prepared), settings.batch_size):
            chunk = prepared[start:start + settings.batch_size]
            results, timings = editor.run(chunk, settings)
            plains = [None] * len(chunk)
            if settings.compare:
                if settings.tau > 0.0:
                    plains, plain_t = editor.run(chunk, settings, tau=0.0)
                    timings = {**timings, "plain_ip2p_run_s": plain_t["run_s"]}
                else:  # the edit is plain IP2P already
                    plains = results
            for i, (p, result, plain) in enumerate(zip(chunk, results, plains)):
                dst = tmp / f"{start + i:04d}_{Path(p.request.image).stem}" if subfolders else tmp
                dst.mkdir(exist_ok=True)
                records.append(editor.write(p, settings, result, timings, dst, plain))
                timings = {**timings, "compile_s": 0.0}  # compile time is reported once, with the first edit
    return records
