"""app.py's functions without a browser: loading, the model card facts, choices, arguments, snippet and images."""

import ast
import inspect
import types

import numpy as np
import pytest
import torch
from tiny_app_pipeline import IMAGE_SIZE

from diffusers_repae import RepaEPipeline, load_imagenet_id2label
from diffusers_repae.schedulers import SAMPLERS


@pytest.fixture(scope="module")
def loaded(app, pipeline_folder):
    loaded = app.load_pipeline(str(pipeline_folder))
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


def snippet_calls(snippet: str) -> tuple[list[str], ast.Call]:
    """The names of every call in a snippet (in order) and its one ``pipe(...)`` call."""
    calls = [node for node in ast.walk(ast.parse(snippet)) if isinstance(node, ast.Call)]
    pipe_calls = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "pipe"]
    assert len(pipe_calls) == 1, snippet
    return [ast.unparse(c.func) for c in calls], pipe_calls[0]


def snippet_arguments(call: ast.Call) -> dict:
    """The ``pipe(...)`` call's keyword values, the generator as its seed."""
    arguments = {}
    for keyword in call.keywords:
        if keyword.arg == "generator":  # torch.Generator(device).manual_seed(SEED)
            assert ast.unparse(keyword.value.func).startswith("torch.Generator("), ast.unparse(keyword.value)
            assert keyword.value.func.attr == "manual_seed"
            arguments["seed"] = ast.literal_eval(keyword.value.args[0])
        else:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return arguments


def test_saved_folder_loads_with_its_model_card(app, loaded, pipeline_folder):
    assert not loaded.random_weights
    assert loaded.source == str(pipeline_folder.resolve())
    assert isinstance(loaded.pipe, RepaEPipeline)
    assert loaded.pipe.id2label == {int(k): v for k, v in load_imagenet_id2label().items()}
    assert loaded.card["recipe"] == "emoji-cpu"
    assert loaded.card["training data"] == "openmoji:group"
    assert loaded.card["licence"] == "cc-by-sa-4.0"  # the OpenMoji data's share-alike licence, from the front matter
    text = app.card_markdown(loaded)
    for fact in ("emoji-cpu", "openmoji:group", "cc-by-sa-4.0", f"{IMAGE_SIZE} px", "4 steps, guidance 1.5"):
        assert fact in text
    assert "Random weights" not in text


def test_recipe_gets_seeded_random_weights_that_the_snippet_rebuilds(app):
    loaded = app.load_pipeline("tiny-cpu")
    assert loaded.random_weights and loaded.source == "tiny-cpu"
    text = app.card_markdown(loaded)
    assert "Random weights" in text and "**licence**: not stated" in text and "64 px" in text  # the recipe's size
    names, _ = snippet_calls(app.python_snippet(loaded, {"class_labels": [1]}, seed=0))
    assert names.index("torch.manual_seed") < names.index("RepaEPipeline.from_recipe")
    assert f"torch.manual_seed({app.RECIPE_SEED})" in app.python_snippet(loaded, {"class_labels": [1]}, seed=0)
    torch.manual_seed(123)  # whatever the global state was, the snippet's seed decides the weights
    torch.manual_seed(app.RECIPE_SEED)
    again = RepaEPipeline.from_recipe("tiny-cpu")
    for module, rebuilt in ((loaded.pipe.transformer, again.transformer), (loaded.pipe.vae, again.vae)):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, rebuilt.state_dict()[name]), name


def test_bad_sources_are_one_line_user_errors(app, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(app.UserError, match="no model_index.json"):
        app.load_pipeline(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(app.UserError) as error:
        app.load_pipeline("nobody/no-such-repae-model")
    message = str(error.value)
    assert "'nobody/no-such-repae-model'" in message and "Hub id" in message and "offline" in message
    assert "\n" not in message
    monkeypatch.setattr(app, "DEMO_PIPELINE", tmp_path / "demo" / "pipeline")
    with pytest.raises(app.UserError, match="make demo"):
        app.default_source()


def test_main_serves_the_demo_pipeline_by_default(app, pipeline_folder, monkeypatch):
    """`make app` = `python app.py`: demo/pipeline when it exists, the CLI's host/port/share reach launch()."""
    monkeypatch.setattr(app, "DEMO_PIPELINE", pipeline_folder)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)  # the defaults below are the flags' own
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    launched = {}

    def fake_build_demo(loaded):
        launched["source"] = loaded.source
        return types.SimpleNamespace(launch=lambda **kwargs: launched.update(kwargs))

    monkeypatch.setattr(app, "build_demo", fake_build_demo)
    app.main(["--port", "7999", "--host", "0.0.0.0"])
    assert launched == {
        "source": str(pipeline_folder.resolve()),
        "server_name": "0.0.0.0",
        "server_port": 7999,
        "share": False,
    }
    app.main([str(pipeline_folder), "--share"])
    assert launched["share"] is True and launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860


def test_class_choices_cover_every_class_and_every_synonym(app, loaded):
    """1000 ImageNet classes (the names ship with the package), each found by any of its names."""
    choices = app.class_choices(loaded.pipe)
    assert [value for _, value in choices] == list(range(1000)) and choices[207] == ("207: golden retriever", 207)
    by_synonym = {name.strip(): value for label, value in choices for name in label.split(":", 1)[1].split(",")}
    assert by_synonym["tabby cat"] == 281 and by_synonym["Carassius auratus"] == 1 and by_synonym["tench"] == 0
    assert app.class_name(loaded.pipe, 281) == "tabby"  # the first name captions the gallery


def test_sampler_choices_are_the_loaded_scheduler_and_every_named_sampler(app, loaded):
    choices = app.sampler_choices(loaded.pipe)
    assert [value for _, value in choices] == [app.AS_SAVED, *SAMPLERS]
    assert "FlowMatchEulerMaruyamaScheduler" in choices[0][0]


def test_call_arguments_are_the_pipeline_keywords(app, loaded):
    pipe = loaded.pipe
    per_class = app.images_per_class_argument(pipe)
    assert per_class in inspect.signature(pipe.__call__).parameters  # whichever name the pipeline takes
    arguments = app.call_arguments(pipe, [281, 1], "heun", 7, 2.5, 0.1, 0.9, 2)
    assert arguments == {
        "class_labels": [281, 1],
        "num_inference_steps": 7,
        "guidance_scale": 2.5,
        "guidance_interval": (0.1, 0.9),
        per_class: 2,
        "sampler": "heun",
    }
    assert "sampler" not in app.call_arguments(pipe, [0], app.AS_SAVED, 4, 1.0, 0.0, 1.0, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_ids": []}, "pick at least one class"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"steps": 2.5}, "steps must be a whole number >= 1"),
        ({"low": 0.9, "high": 0.1}, "need 0 <= from <= to <= 1"),
        ({"high": 1.5}, "need 0 <= from <= to <= 1"),
        ({"high": None}, "need 0 <= from <= to <= 1"),
        ({"guidance_scale": None}, "guidance scale: give a number"),
        ({"images_per_class": 0}, "images per class must be a whole number"),
        ({"class_ids": [0, 1, 2, 3], "images_per_class": 17}, "68 images asked for; at most 64"),
    ],
)
def test_bad_settings_are_refused_in_one_line(app, loaded, change, message):
    settings = {"class_ids": [0], "sampler": "sde", "steps": 4, "guidance_scale": 1.5, "low": 0.0, "high": 1.0}
    settings = {**settings, "images_per_class": 1, **change}
    with pytest.raises(app.UserError, match=message):
        app.call_arguments(loaded.pipe, **settings)


@pytest.mark.parametrize("seed", [None, -1, 1.5, 2**63])
def test_bad_seeds_are_refused(app, seed):
    with pytest.raises(app.UserError, match="seed must be a whole number"):
        app.check_seed(seed)


def test_snippet_states_the_exact_arguments(app, loaded, pipeline_folder):
    arguments = app.call_arguments(loaded.pipe, [207, 281], "euler", 5, 3.0, 0.2, 0.7, 2)
    snippet = app.python_snippet(loaded, arguments, seed=1234)
    names, call = snippet_calls(snippet)
    assert "RepaEPipeline.from_pretrained" in names and "RepaEPipeline.from_recipe" not in names
    assert f"RepaEPipeline.from_pretrained({str(pipeline_folder.resolve())!r})" in snippet
    assert snippet_arguments(call) == {**arguments, "seed": 1234}
    assert "# golden retriever; tabby" in snippet


def test_gallery_images_are_what_the_pipeline_gives_for_the_snippet_arguments(app, loaded):
    """Every sampler choice: generate()'s images equal pipe(**the snippet's arguments, generator=seeded)."""
    pipe = loaded.pipe
    for sampler in [app.AS_SAVED, *SAMPLERS]:
        arguments = app.call_arguments(pipe, [1, 281], sampler, 3, 2.0, 0.0, 0.8, 2)
        reports = []
        gallery = app.generate(
            loaded, arguments, seed=5, progress=lambda value, reports=reports, **kw: reports.append(value)
        )
        assert [caption for _, caption in gallery] == ["goldfish #1", "goldfish #2", "tabby #1", "tabby #2"]
        call = snippet_arguments(snippet_calls(app.python_snippet(loaded, arguments, seed=5))[1])
        seed = call.pop("seed")
        expected = pipe(**call, generator=torch.Generator().manual_seed(seed)).images
        for (image, _), reference in zip(gallery, expected, strict=True):
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
            np.testing.assert_array_equal(np.asarray(image), np.asarray(reference), err_msg=sampler)
        # the progress bar: one report per model evaluation, the last one complete
        total = pipe.num_timesteps
        assert reports == [(i + 1, total) for i in range(total)], sampler
    assert not np.array_equal(np.asarray(gallery[0][0]), np.asarray(gallery[1][0]))  # 2 images per class differ
