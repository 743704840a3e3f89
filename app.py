"""A web page to try a REPA-E pipeline: pick classes by name, a sampler and its settings, and generate.

    python app.py                          # demo/pipeline, the folder `make demo` writes (also: make app)
    python app.py path/to/saved_pipeline   # any RepaEPipeline.save_pretrained folder
    python app.py tiny-cpu                 # a shipped recipe: configs only, so RANDOM weights (noise-like images)
    python app.py user/repo                # a Hub id (needs the network)

Everything is loaded with RepaEPipeline.from_pretrained, our own classes: no code from the folder is executed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from huggingface_hub import hf_hub_download, metadata_load

from diffusers_repae import RepaEPipeline, list_recipes, resolve_recipe
from diffusers_repae.cli import UserError, run_cli, user_error_message
from diffusers_repae.schedulers import SAMPLERS

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio must not phone home (it reads this at Blocks/launch)

DEMO_PIPELINE = Path(__file__).resolve().parent / "demo" / "pipeline"
RECIPE_SEED = 0  # a recipe's random weights are drawn after torch.manual_seed(RECIPE_SEED): the snippet can redo them
MAX_IMAGES = 64  # per click: a queue of users shares one model
AS_SAVED = "as saved"  # the sampler choice that keeps pipe.scheduler (no `sampler=` argument)
SAMPLER_NAMES = {
    "sde": "Euler-Maruyama SDE",
    "euler": "Euler ODE",
    "heun": "Heun ODE (2N-1 evaluations)",
    "dpmsolver++": "DPM-Solver++ (2M)",
    "unipc": "UniPC (bh2)",
}


@dataclass
class Loaded:
    """A pipeline and what the page says about it."""

    pipe: RepaEPipeline
    source: str  # what the snippet passes to from_pretrained / from_recipe
    random_weights: bool  # a recipe: configs only
    card: dict[str, str]  # model card facts (title, recipe, training data, licence, ...)


def has_weights(folder: Path) -> bool:
    """A saved pipeline holds transformer weights; a recipe holds only configs."""
    return any(path.suffix in (".safetensors", ".bin") for path in (folder / "transformer").glob("*"))


def default_source() -> str:
    """demo/pipeline when `make demo` has written it; otherwise there is nothing sensible to open."""
    if (DEMO_PIPELINE / "model_index.json").is_file():
        return str(DEMO_PIPELINE)
    raise UserError(
        f"no pipeline given and {DEMO_PIPELINE} does not exist: run `make demo` first, or pass a saved pipeline "
        f"folder, a recipe ({', '.join(list_recipes())}) or a Hub id, e.g. `python app.py tiny-cpu`."
    )


def load_pipeline(source: str) -> Loaded:
    """A local folder (saved pipeline or recipe), a shipped recipe name, or else a Hub id."""
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"{source!r} is not a pipeline folder (it has no model_index.json).")
    if path.is_dir() or source in list_recipes():
        folder = resolve_recipe(source).resolve()
        if has_weights(folder):
            return Loaded(RepaEPipeline.from_pretrained(folder), str(folder), False, read_card(folder / "README.md"))
        with torch.random.fork_rng():  # seeded, so that the page's snippet can rebuild the same random weights
            torch.manual_seed(RECIPE_SEED)
            pipe = RepaEPipeline.from_recipe(folder)
        name = source if source in list_recipes() else str(folder)
        card = {"recipe": name, "training data": "none: a recipe has configs, no weights"}
        return Loaded(pipe, name, True, {**read_card(folder / "README.md"), **card})
    try:
        pipe = RepaEPipeline.from_pretrained(source)
    except (OSError, ValueError) as error:
        reason = user_error_message(error) or " ".join(str(error).split()).split(" (")[0]
        reason += " (offline: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(
            f"{source!r} is neither a local folder nor a recipe ({', '.join(list_recipes())}), and it could not be "
            f"loaded as a Hub id: {reason}"
        ) from None
    return Loaded(pipe, source, False, read_card(hub_readme(source)))


def hub_readme(repo_id: str) -> Path | None:
    """The Hub repository's model card, if it can be had (it is not part of the pipeline's download)."""
    try:
        return Path(hf_hub_download(repo_id, "README.md"))
    except (OSError, ValueError):
        return None


def read_card(readme: Path | None) -> dict[str, str]:
    """Facts from a model card: front matter (licence, datasets, base model) and the lines our scripts write."""
    if readme is None or not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8")
    meta = metadata_load(readme) or {}
    facts = {}
    if title := re.search(r"^# (.+)$", text, flags=re.MULTILINE):
        facts["title"] = title[1].strip()
    if recipe := re.search(r"recipe `([^`]+)`", text):
        facts["recipe"] = recipe[1]
    data = meta.get("datasets") or re.findall(r"Trained with .*? on `([^`]+)`", text, flags=re.DOTALL)
    if data:
        facts["training data"] = ", ".join(data) if isinstance(data, list) else str(data)
    if meta.get("license"):
        facts["licence"] = str(meta["license"])
    if meta.get("base_model"):
        facts["base model"] = str(meta["base_model"])
    return facts


def image_size(pipe: RepaEPipeline) -> int:
    """Pixels per side: latent size times the VAE's downsampling (one halving between its levels)."""
    return pipe.transformer.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def card_markdown(loaded: Loaded) -> str:
    """The model facts shown beside the controls."""
    config = loaded.pipe.config
    low, high = config.default_guidance_interval
    rows = {
        "source": f"`{loaded.source}`",
        **loaded.card,
        "licence": loaded.card.get("licence", "not stated in the model card"),
        "classes": str(loaded.pipe.transformer.config.num_classes),
        "image size": f"{image_size(loaded.pipe)} px",
        "scheduler": type(loaded.pipe.scheduler).__name__,
        "recommended": f"{config.default_num_inference_steps} steps, guidance {config.default_guidance_scale:g} "
        f"in t-interval [{low:g}, {high:g}]",
    }
    text = "### Model\n\n" + "".join(f"- **{key}**: {value}\n" for key, value in rows.items())
    if loaded.random_weights:
        text += (
            "\n**Random weights.** A recipe is configs only: this page built it with random weights, so the images "
            "are noise-like. Train it (`make demo`) or open a saved pipeline for real images.\n"
        )
    return text


def class_choices(pipe: RepaEPipeline) -> list[tuple[str, int]]:
    """(\"id: names\", id) for every class, so that typing any synonym finds it."""
    return [(f"{i}: {pipe.id2label.get(i, f'class {i}')}", i) for i in range(pipe.transformer.config.num_classes)]


def sampler_choices(pipe: RepaEPipeline) -> list[tuple[str, str]]:
    """The loaded scheduler, then every sampler the pipeline's `sampler=` argument accepts."""
    return [(f"{AS_SAVED} ({type(pipe.scheduler).__name__})", AS_SAVED)] + [
        (f"{key}: {SAMPLER_NAMES.get(key, key)}", key) for key in SAMPLERS
    ]


def images_per_class_argument(pipe: RepaEPipeline) -> str:
    """diffusers' name `num_images_per_prompt` where the pipeline takes it, else our older `num_images_per_label`."""
    parameters = inspect.signature(pipe.__call__).parameters
    return "num_images_per_prompt" if "num_images_per_prompt" in parameters else "num_images_per_label"


def call_arguments(
    pipe: RepaEPipeline, class_ids, sampler, steps, guidance_scale, low, high, images_per_class
) -> dict:
    """The exact keyword arguments of ``pipe(...)`` for the page's values (the generator aside)."""
    if not class_ids:
        raise UserError("pick at least one class: type a name into the class box.")
    if steps is None or steps != int(steps) or steps < 1:
        raise UserError(f"steps must be a whole number >= 1, got {steps}.")
    if guidance_scale is None:
        raise UserError("guidance scale: give a number (1 = no guidance).")
    if low is None or high is None or not 0 <= low <= high <= 1:
        raise UserError(f"guidance interval: need 0 <= from <= to <= 1, got from {low} to {high}.")
    if images_per_class is None or images_per_class != int(images_per_class) or images_per_class < 1:
        raise UserError(f"images per class must be a whole number >= 1, got {images_per_class}.")
    if len(class_ids) * images_per_class > MAX_IMAGES:
        raise UserError(f"{len(class_ids) * int(images_per_class)} images asked for; at most {MAX_IMAGES} at once.")
    arguments = {
        "class_labels": [int(i) for i in class_ids],
        "num_inference_steps": int(steps),
        "guidance_scale": float(guidance_scale),
        "guidance_interval": (float(low), float(high)),
        images_per_class_argument(pipe): int(images_per_class),
    }
    if sampler != AS_SAVED:
        arguments["sampler"] = sampler
    return arguments


def check_seed(seed: float | None) -> int:
    if seed is None or seed != int(seed) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be a whole number in [0, 2**63), got {seed}.")
    return int(seed)


def python_snippet(loaded: Loaded, arguments: dict, seed: int) -> str:
    """Python that reproduces the page's images: the same loading, the same arguments and generator."""
    if loaded.random_weights:
        load = (
            f"torch.manual_seed({RECIPE_SEED})  # the page drew the recipe's random weights after this seed\n"
            f"pipe = RepaEPipeline.from_recipe({loaded.source!r})"
        )
    else:
        load = f"pipe = RepaEPipeline.from_pretrained({loaded.source!r})"
    device = loaded.pipe.device.type
    if device != "cpu":
        load += f".to({device!r})"
    lines = [f"    {key}={value!r}," for key, value in arguments.items()]
    lines[0] += "  # " + "; ".join(class_name(loaded.pipe, i) for i in arguments["class_labels"])
    lines.append(f"    generator=torch.Generator({device!r}).manual_seed({seed}),")
    header = ["import torch", "from diffusers_repae import RepaEPipeline", "", load]
    return "\n".join([*header, "images = pipe(", *lines, ").images"]) + "\n"


def class_name(pipe: RepaEPipeline, class_id: int) -> str:
    """A class's first name (ImageNet lists synonyms after commas)."""
    return pipe.id2label.get(class_id, f"class {class_id}").split(",")[0].strip()


def step_reporter(progress):
    """A ``callback_on_step_end`` that moves ``progress`` (a gr.Progress) one model evaluation at a time."""

    def on_step_end(pipe, step, timestep, callback_kwargs):
        progress((step + 1, pipe.num_timesteps), desc="sampling", unit="model evaluations")
        return callback_kwargs

    return on_step_end


def generate(loaded: Loaded, arguments: dict, seed: int, progress=None) -> list[tuple]:
    """The images of ``pipe(**arguments, generator=seeded)``, captioned with their class, for the gallery."""
    pipe = loaded.pipe
    generator = torch.Generator(pipe.device).manual_seed(seed)
    callback = None if progress is None else step_reporter(progress)
    images = pipe(**arguments, generator=generator, callback_on_step_end=callback).images
    per_class = arguments[images_per_class_argument(pipe)]
    captions = [f"{class_name(pipe, i)} #{k + 1}" for i in arguments["class_labels"] for k in range(per_class)]
    return list(zip(images, captions))


def build_demo(loaded: Loaded) -> gr.Blocks:
    """The page, queued: one generation at a time, the other users wait in line."""
    pipe, config = loaded.pipe, loaded.pipe.config
    low, high = config.default_guidance_interval

    def on_generate(class_ids, sampler, steps, guidance, low, high, seed, per_class, progress=gr.Progress()):
        try:
            arguments = call_arguments(pipe, class_ids, sampler, steps, guidance, low, high, per_class)
            seed = check_seed(seed)
            gallery = generate(loaded, arguments, seed, progress)
        except ValueError as error:  # UserError, and the pipeline's own refusals
            raise gr.Error(user_error_message(error) or str(error), print_exception=False) from None
        return gallery, python_snippet(loaded, arguments, seed)

    with gr.Blocks(title="REPA-E", analytics_enabled=False) as demo:
        gr.Markdown("# REPA-E: class-conditional image generation\nPick classes, a sampler and settings; generate.")
        with gr.Row():
            with gr.Column(scale=3):
                classes = gr.Dropdown(
                    class_choices(pipe), value=[0], multiselect=True, filterable=True, label="Classes",
                    info="Type any name to search; several classes at once.",
                )  # fmt: skip
                sampler = gr.Dropdown(sampler_choices(pipe), value=AS_SAVED, label="Sampler")
                steps = gr.Slider(1, 1000, value=config.default_num_inference_steps, step=1, label="Steps")
                guidance = gr.Slider(
                    1, max(10, config.default_guidance_scale), value=config.default_guidance_scale, step=0.05,
                    label="Guidance scale", info="1 = no classifier-free guidance.",
                )  # fmt: skip
                with gr.Row():
                    low_slider = gr.Slider(0, 1, value=low, step=0.01, label="Guidance from t =")
                    high_slider = gr.Slider(0, 1, value=high, step=0.01, label="to t = (1 is noise)")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                    per_class = gr.Slider(1, 8, value=1, step=1, label="Images per class")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                gr.Markdown(card_markdown(loaded))
        gallery = gr.Gallery(
            label="Images", format="png", columns=8, buttons=["download", "fullscreen"], elem_id="gallery"
        )
        snippet = gr.Code(label="Python that reproduces these images", language="python", elem_id="snippet")
        inputs = [classes, sampler, steps, guidance, low_slider, high_slider, seed, per_class]
        button.click(on_generate, inputs, [gallery, snippet], api_name="generate")
    return demo.queue(default_concurrency_limit=1, max_size=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A web page (Gradio) to try a REPA-E pipeline.")
    parser.add_argument(
        "pipeline", nargs="?", default=None, help="A RepaEPipeline.save_pretrained folder, a recipe name (random "
        "weights) or a Hub id. Default: demo/pipeline, written by `make demo`.",
    )  # fmt: skip
    port, host = int(os.environ.get("GRADIO_SERVER_PORT", 7860)), os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    parser.add_argument("--port", type=int, default=port, help="Port to serve on (default 7860).")
    parser.add_argument("--host", default=host, help="Address to listen on (default 127.0.0.1: this machine only).")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link (off by default).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    loaded = load_pipeline(args.pipeline or default_source())
    loaded.pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    loaded.pipe.set_progress_bar_config(disable=True)  # the page shows the progress
    build_demo(loaded).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    run_cli(main)
