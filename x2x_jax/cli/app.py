"""The browser editor: `python edit.py --serve` (needs the app extra: pip install -e '.[app]').

A Gradio page on 127.0.0.1 that runs the same code path as `python edit.py` (`api.edit_into` into a private
folder), so its downloads are the files the CLI writes. tau, the guidance scales and the seed are traced arguments
of the compiled program: moving those sliders re-runs the edit without compiling (the page shows the count of
compiled programs); the number of steps, the relevance draws and the guidance mode select a program, compiled on
their first use.

Limits: one edit at a time per model (a queue holds the others), uploads up to --max-upload-mb and
x2x_jax.data.io.MAX_EDIT_PIXELS pixels, inputs and results live in a private temporary folder: an edit's own folder
is deleted once its response is sent, Gradio's copies (the downloads) after --keep-minutes and all of it when the
server stops.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from x2x_jax.data import instructions
from x2x_jax.data.io import MAX_EDIT_PIXELS, load_source
from x2x_jax.data.synthetic import LEVELS, SYNTH_FINDINGS
from x2x_jax.editing import api
from x2x_jax.errors import ConfigError, X2XError, error_line

SIDES = ("", "left", "right", "bilateral")
# The shipped model was trained on the synthetic findings: list them first.
FINDING_CHOICES = SYNTH_FINDINGS + tuple(f for f in instructions.FINDINGS if f not in SYNTH_FINDINGS)
IMAGE_HEIGHT = 280  # px on the page
PAGE_MIN_SIDE = 256  # shown images smaller than this are enlarged (whole-pixel repetition)


def compose(op: str, finding: str, severity: str, side: str, level_from: str, level_to: str) -> str:
    """One canonical sentence of the instruction grammar from the composer's choices."""
    if op == "change":
        edit = instructions.Edit("change", (finding,), level_from=level_from or None, level_to=level_to or None)
    else:
        edit = instructions.Edit(op, (finding,), severity=severity or None, location=side or None)
    try:
        return instructions.render([edit])
    except ValueError as e:
        raise ConfigError(f"cannot compose that sentence: {e}") from None


class EditorApp:
    """The model(s) behind the page, the edit in progress and its progress."""

    def __init__(self, model: str, *, resolution: int | None, dtype: str, guidance_dir: str | None, work: Path):
        self.model, self.resolution, self.dtype, self.guidance_dir = model, resolution, dtype, guidance_dir
        self.work = work
        self.editors: dict[str, api.Editor] = {}
        self.lock = threading.Lock()  # one edit at a time per model (the queue's concurrency limit is the first)
        self.phase = ("idle", 0, 0)
        self.edits_done = 0
        self.editor("relevance")  # load now: the first request should not wait for it

    def editor(self, guidance: str) -> api.Editor:
        """The Editor of a guidance mode, loaded on first use (learned: MODEL/guidance/ or --guidance-model)."""
        if guidance not in self.editors:
            self.phase = ("loading", 0, 0)
            editor = api.Editor(self.model, resolution=self.resolution, dtype=self.dtype, guidance=guidance,
                                guidance_dir=self.guidance_dir if guidance == "learned" else None,
                                report_steps=True)
            editor.progress = self._progress
            self.editors[guidance] = editor
        return self.editors[guidance]

    def _progress(self, phase: str, done: int, total: int) -> None:
        self.phase = (phase, done, total)

    @property
    def compiles(self) -> int:
        return sum(e.compiles for e in self.editors.values())

    def edit(self, image: str, instruction: str, seed: int, settings: api.Settings, guidance: str) -> tuple[dict, Path]:
        """One edit into a fresh folder under `work` -> (edit.json record, folder). Raises X2XError on bad input
        (nothing is left behind then; the settings are checked against the editor by `api.edit_into`)."""
        with self.lock:
            editor = self.editor(guidance)
            out = self.work / uuid.uuid4().hex
            try:
                (record,) = api.edit_into(editor, [api.Request(image, instruction, seed)], settings, out,
                                          subfolders=False)
            finally:
                self.phase = ("idle", 0, 0)
        return record, out


def _display(path) -> np.ndarray:
    """A file's display values as 8-bit grey (what the page shows)."""
    return np.rint(np.clip(load_source(path).grey, 0.0, 1.0) * 255.0).astype(np.uint8)


def _for_page(image: np.ndarray) -> np.ndarray:
    """Small images (the synthetic 64 px model) enlarged by whole-pixel repetition, so the page shows their pixels
    rather than a thumbnail; the downloads keep the files' own size."""
    k = max(1, PAGE_MIN_SIDE // max(image.shape[:2]))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def _summary(record: dict) -> tuple[str, str]:
    """(parsed instruction and priors, warnings and timings) as Markdown."""
    p, pr = record["parsed"], record["priors"]
    edits = " ".join(instructions.render([instructions.Edit(**{**e, "findings": tuple(e["findings"])})])
                     for e in p["edits"]) or "none"
    lines = [f"**Parsed:** {edits}"]
    if p["unparsed"]:
        lines.append(f"**Not understood:** {'; '.join(p['unparsed'])}")
    if p["unknown_findings"]:
        lines.append(f"**Unknown findings:** {'; '.join(p['unknown_findings'])}")
    lines.append(f"**Priors:** {', '.join(pr['findings']) or 'none'}"
                 + (" (whole image)" if pr["whole_image"] else "")
                 + (f"; refinements: {', '.join(pr['refinements'])}" if pr["refinements"] else ""))
    lines.append(f"**Mask:** {100 * record['mask_fraction']:.1f} % of the image (tau "
                 f"{record['parameters']['tau']:g}, G from {record['guidance']['method']})")
    t = record["timings"]
    compiled = (f"compiled a new program in {t['compile_s']:.1f} s" if t["compile_s"] > 0
                else "reused a compiled program")
    notes = [f"**Timings:** {compiled}; edit {t['run_s']:.2f} s; composite and files {t['write_s']:.2f} s"]
    notes += [f"**Warning:** {w}" for w in record["warnings"]]
    return "  \n".join(lines), "  \n".join(notes)


def build(app: EditorApp, defaults: api.Settings, seed: int, guidance: str, keep_minutes: float = 10):
    """The page (a gr.Blocks); `defaults`, `seed`, `guidance`: the controls' starting values."""
    import gradio as gr

    example_instruction = api.DEFAULT_EXAMPLE_INSTRUCTION.read_text().strip()

    def picture(label, elem_id):
        return gr.Image(label=label, format="png", interactive=False, height=IMAGE_HEIGHT, elem_id=elem_id)

    def run_edit(upload, instruction, tau, text_scale, image_scale, steps, seed_, draws, guidance_, compare,
                 progress=gr.Progress()):
        """-> status, input, edited, difference, overlay, mask, figure, parsed, notes, downloads, compiles, folder"""
        empty = (None,) * 6 + ("", "", None)
        image = upload or str(api.DEFAULT_EXAMPLE)
        try:
            settings = dataclasses.replace(defaults, tau=float(tau), steps=int(steps), text_scale=float(text_scale),
                                           image_scale=float(image_scale), relevance_draws=int(draws),
                                           compare=bool(compare))
            seed_value = float(seed_)
            if not seed_value.is_integer():
                raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed_}")
            result: dict = {}

            def work():
                try:
                    result["value"] = app.edit(image, instruction, int(seed_value), settings, guidance_)
                except BaseException as e:  # noqa: BLE001 - handed to the request thread below
                    result["error"] = e

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while thread.is_alive():
                phase, done, total = app.phase
                if phase == "loading":
                    progress(0.0, desc="Loading the model (first use of this guidance mode)")
                elif phase == "compiling":
                    progress(0.0, desc=f"Compiling the edit program for {total} steps: first edit with these "
                                        "steps / draws / guidance; later edits reuse it")
                elif phase in ("running", "step"):
                    progress((done, total), desc="Editing", unit="steps")
                thread.join(0.1)
            if "error" in result:
                raise result["error"]
            record, folder = result["value"]
        except X2XError as e:
            return (error_line(e),) + empty + (f"Programs compiled so far: {app.compiles}", None)
        parsed, notes = _summary(record)
        source, edited = _display(image), _display(folder / "edited.png")
        diff = np.clip(np.abs(edited.astype(np.int16) - source.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        files = [str(folder / name) for name in record["outputs"]]  # what edit_into wrote, edit.json included
        app.edits_done += 1
        status = (f"Done (edit {app.edits_done}): \"{record['instruction']}\" (seed {record['seed']}, tau "
                  f"{record['parameters']['tau']:g})")
        overlay = np.asarray(Image.open(folder / "guidance.png").convert("RGB"))
        mask = np.asarray(Image.open(folder / "mask.png").convert("L"))
        shown = [_for_page(a) for a in (source, edited, diff, overlay, mask)]
        return (status, *shown, str(folder / "figure.png"), parsed, notes, files,
                f"Programs compiled so far: {app.compiles}", str(folder))

    def forget(folder):
        """After the response: Gradio has copied what the page shows and offers; drop the edit's own folder."""
        if folder and Path(folder).parent == app.work:
            shutil.rmtree(folder, ignore_errors=True)
        return None

    def add_sentence(text, op, finding, severity, side, level_from, level_to):
        try:
            sentence = compose(op, finding, severity, side, level_from, level_to)
        except X2XError as e:
            return text, error_line(e)
        text = (text or "").strip()
        return (f"{text} {sentence}" if text else sentence), ""

    def preview(text):
        parsed = instructions.parse(text or "")
        edits = " ".join(instructions.render([e]) for e in parsed.edits) or "no edit recognised"
        extra = "".join(f"  \nnot understood: {u}" for u in parsed.unparsed + parsed.unknown_findings)
        return f"Reads as: {edits}{extra}"

    with gr.Blocks(title="x2x-jax editor", delete_cache=(60, int(60 * keep_minutes))) as demo:
        gr.Markdown("## x2x-jax: edit a chest X-ray by instruction\nRegion-Specific Editing (InstructX2X) with "
                    f"the model `{app.editors['relevance'].model_dir}`. G (red) shows where the model edited; "
                    "outside the mask the output keeps the input's pixels. Leave the upload empty to edit the "
                    "shipped synthetic example.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Radiograph (PNG / JPEG / DICOM)", type="filepath",
                                 file_types=[".png", ".jpg", ".jpeg", ".dcm", ".dicom"], elem_id="upload")
                example = gr.Button("Use the shipped example", size="sm", elem_id="use-example")
                instruction = gr.Textbox(label="Instruction", value=example_instruction, lines=2,
                                         elem_id="instruction")
                reads = gr.Markdown(preview(example_instruction), elem_id="reads-as")
                with gr.Accordion("Compose a sentence of the grammar", open=False):
                    with gr.Row():
                        op = gr.Dropdown(list(instructions.OPS), value="add", label="operation")
                        finding = gr.Dropdown(list(FINDING_CHOICES), value=FINDING_CHOICES[0], label="finding")
                    with gr.Row():
                        severity = gr.Dropdown(["", *LEVELS], value="", label="severity (add / remove)")
                        side = gr.Dropdown(list(SIDES), value="", label="laterality (add / remove)")
                    with gr.Row():
                        level_from = gr.Dropdown(list(LEVELS), value="mild", label="from (change)")
                        level_to = gr.Dropdown(list(LEVELS), value="severe", label="to (change)")
                    add = gr.Button("Append to the instruction", size="sm")
                    compose_error = gr.Markdown("")
                tau = gr.Slider(0.0, 1.0, value=defaults.tau, step=0.01, label="tau (mask threshold on G; 0 = plain "
                                "InstructPix2Pix)", elem_id="tau")
                text_scale = gr.Slider(0.0, 20.0, value=defaults.text_scale, step=0.1, label="text scale s_T",
                                       elem_id="text-scale")
                image_scale = gr.Slider(0.0, 5.0, value=defaults.image_scale, step=0.05, label="image scale s_I",
                                        elem_id="image-scale")
                steps = gr.Slider(1, 200, value=defaults.steps, step=1, label="DDIM steps (a new value compiles "
                                  "once)", elem_id="steps")
                seed_box = gr.Number(value=seed, precision=0, label="seed", elem_id="seed")
                draws = gr.Slider(1, 8, value=defaults.relevance_draws, step=1, label="relevance draws K (a new "
                                  "value compiles once)", elem_id="draws")
                guidance_mode = gr.Radio(list(api.GUIDANCE), value=guidance, label="guidance map",
                                         elem_id="guidance")
                compare = gr.Checkbox(value=defaults.compare, label="compare with plain IP2P (in the figure)")
                run = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", elem_id="status")
                with gr.Row():
                    shown_input = picture("input", "input-image")
                    edited = picture("edited", "edited-image")
                    difference = picture("|edited - input| x4", "difference-image")
                with gr.Row():
                    overlay = picture("G overlay (where it edited)", "overlay-image")
                    mask = picture("mask (G >= tau)", "mask-image")
                figure = picture("figure.png", "figure-image")
                parsed = gr.Markdown(elem_id="parsed")
                notes = gr.Markdown(elem_id="notes")
                compiles = gr.Markdown(f"Programs compiled so far: {app.compiles}", elem_id="compiles")
                downloads = gr.File(label="Downloads (the files python edit.py writes)", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        folder = gr.State(None)

        example.click(lambda: (str(api.DEFAULT_EXAMPLE), example_instruction), outputs=[upload, instruction])
        instruction.change(preview, inputs=instruction, outputs=reads, queue=False)
        add.click(add_sentence, inputs=[instruction, op, finding, severity, side, level_from, level_to],
                  outputs=[instruction, compose_error], queue=False)
        run.click(run_edit, inputs=[upload, instruction, tau, text_scale, image_scale, steps, seed_box, draws,
                                    guidance_mode, compare],
                  outputs=[status, shown_input, edited, difference, overlay, mask, figure, parsed, notes, downloads,
                           compiles, folder]).then(forget, inputs=folder, outputs=folder)
    return demo


def serve(a, defaults: api.Settings) -> int:
    """`python edit.py --serve`: build the page from edit.py's parsed flags and checked settings (the controls'
    starting values) and serve it until interrupted."""
    try:
        import gradio  # noqa: F401 - checked before anything is loaded
    except ImportError:
        raise ConfigError("--serve needs the app extra: pip install -e '.[app]'") from None
    if a.max_upload_mb <= 0 or a.keep_minutes <= 0 or a.queue_size < 1 or not 0 < a.port < 65536:
        raise ConfigError("--max-upload-mb and --keep-minutes must be > 0, --queue-size >= 1 and --port in "
                          "1..65535")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {a.host}: anyone who can reach this machine can use the editor and upload "
              "files to it (there is no login)")
    root = Path(tempfile.mkdtemp(prefix="x2x-editor-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "edits").mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")  # uploads and Gradio's copies of results
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    t0 = time.perf_counter()
    app = EditorApp(a.model, resolution=a.resolution, dtype=a.dtype, guidance_dir=a.guidance_model,
                    work=root / "edits")
    print(f"loaded {app.editors['relevance'].model_dir} in {time.perf_counter() - t0:.1f} s")
    demo = build(app, defaults, a.seed, a.guidance, a.keep_minutes)
    demo.queue(default_concurrency_limit=1, max_size=a.queue_size)
    print(f"x2x-jax editor: http://{a.host}:{a.port}  (Ctrl+C stops it; uploads up to {a.max_upload_mb} MB and "
          f"{MAX_EDIT_PIXELS / 1e6:.0f} MP; files kept {a.keep_minutes} min in {root})", flush=True)
    try:
        demo.launch(server_name=a.host, server_port=a.port, max_file_size=int(a.max_upload_mb * 2**20), share=False,
                    show_error=True, quiet=True, footer_links=[], allowed_paths=[str(api.DEFAULT_EXAMPLE.parent)])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0

