"""The page in a real browser (headless Chromium driven by Playwright) and through gradio_client, against app.py
serving a tiny saved pipeline on a free local port.

Chromium is the system's (Debian package `chromium`, installed by .ci/run); Playwright never downloads a browser.
Set APP_SCREENSHOT=docs/app.png to write the page's screenshot after generating there (how docs/app.png was made).
"""

import ast
import io
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_app_pipeline import IMAGE_SIZE

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the networking switches Chromium's background services try the network, which this closed one refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(app, pipeline_folder):
    """app.py's page for the tiny pipeline, served from a thread of this process; yields (url, loaded)."""
    loaded = app.load_pipeline(str(pipeline_folder))
    loaded.pipe.set_progress_bar_config(disable=True)
    demo = app.build_demo(loaded)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url, loaded
    demo.close()


@pytest.fixture
def page(server, tmp_path):
    """A fresh headless Chromium (its own profile folder) on the page."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [test] extra)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        reason = f"no browser at {CHROMIUM}: apt-get install -y chromium (what .ci/run does)"
        if os.environ.get("CI"):  # .ci/run installs it: a skip there would hide an untested page
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server[0])
        page.get_by_role("button", name="Generate").wait_for()
        yield page
        context.close()


def pick_class(page, typed: str, option: str) -> None:
    """Types into the class picker and clicks the option it finds, as a person would."""
    box = page.get_by_label("Classes")
    box.click()
    box.fill(typed)
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def set_number(page, label: str, value: str) -> None:
    """The number box of a slider (or a plain number field), committed by leaving it."""
    box = page.get_by_label(f"number input for {label}").or_(page.get_by_label(label, exact=True))
    box.fill(value)
    box.press("Tab")


def test_page_generates_the_picked_classes(page, server, tmp_path):
    pick_class(page, "tabby cat", "281: tabby, tabby cat")  # found by a synonym; class 0 stays picked by default
    set_number(page, "Images per class", "2")
    set_number(page, "Seed", "11")
    page.get_by_role("button", name="Generate").click()

    images = page.locator("#gallery img[alt]")  # the gallery's images, captioned by their class
    page.wait_for_function("document.querySelectorAll('#gallery img[alt]').length == 4")
    assert [images.nth(i).get_attribute("alt") for i in range(4)] == ["tench #1", "tench #2", "tabby #1", "tabby #2"]
    for i in range(4):
        images.nth(i).evaluate("img => img.decode()")
        assert images.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight]") == [IMAGE_SIZE, IMAGE_SIZE]
    snippet = page.locator("#snippet .cm-content").inner_text()
    assert "class_labels=[0, 281]" in snippet and "num_images_per_" in snippet and "manual_seed(11)" in snippet
    screenshot = Path(os.environ.get("APP_SCREENSHOT") or tmp_path / "app.png")
    picture = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    assert picture.width == 1280 and picture.height > 900  # the whole page, below the fold too
    picture.quantize(256).save(screenshot, optimize=True)  # 256 colours: a small doc image


def test_page_refuses_bad_settings_in_one_line(page):
    set_number(page, "Guidance from t =", "0.9")
    set_number(page, "to t = (1 is noise)", "0.2")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("guidance interval: need 0 <= from <= to <= 1, got from 0.9 to 0.2.").wait_for()
    assert page.locator("#gallery img[alt]").count() == 0


def snippet_call_arguments(snippet: str) -> tuple[dict, int]:
    """The keyword values of the snippet's ``pipe(...)`` call, and its generator's seed."""
    (call,) = [n for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Call) and ast.unparse(n.func) == "pipe"]
    arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "generator"}
    (generator,) = [k.value for k in call.keywords if k.arg == "generator"]
    return arguments, ast.literal_eval(generator.args[0])


def test_gradio_client_gets_what_the_snippet_reproduces(server, tmp_path):
    """Over the page's API: the gallery's PNGs equal pipe(**the returned snippet's arguments), pixel for pixel."""
    client_module = pytest.importorskip("gradio_client", reason="gradio_client is not installed (the [test] extra)")
    url, loaded = server
    client = client_module.Client(url, verbose=False, download_files=str(tmp_path))
    gallery, snippet = client.predict([207, 1], "heun", 3, 2.0, 0.1, 0.9, 7, 2, api_name="/generate")
    arguments, seed = snippet_call_arguments(snippet)
    assert arguments["class_labels"] == [207, 1] and arguments["sampler"] == "heun" and seed == 7
    assert arguments["guidance_interval"] == (0.1, 0.9) and arguments["num_inference_steps"] == 3
    expected = loaded.pipe(**arguments, generator=torch.Generator().manual_seed(seed)).images
    assert [item["caption"] for item in gallery] == [
        "golden retriever #1",
        "golden retriever #2",
        "goldfish #1",
        "goldfish #2",
    ]
    for item, reference in zip(gallery, expected, strict=True):
        image = Image.open(item["image"])
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(reference))

    # users at the same time wait in the queue (one generation at a time) and all get their images
    jobs = [client.submit([0], "sde", 20, 2.0, 0.0, 1.0, seed, 4, api_name="/generate") for seed in range(3)]
    results = [job.result(timeout=TIMEOUT_MS / 1000) for job in jobs]
    assert [len(gallery) for gallery, _ in results] == [4, 4, 4]
    assert [f"manual_seed({seed})" in snippet for seed, (_, snippet) in enumerate(results)] == [True] * 3

    with pytest.raises(client_module.exceptions.AppError, match="pick at least one class"):
        client.predict([], "sde", 3, 2.0, 0.0, 1.0, 0, 1, api_name="/generate")


def test_page_shows_the_sampling_progress(page):
    """The progress bar follows the pipeline's step callback: '<done>/<total> model evaluations' while sampling."""
    set_number(page, "Steps", "1000")
    set_number(page, "Images per class", "8")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(re.compile(r"sampling.*\b\d+/1000 model evaluations")).first.wait_for()
    page.wait_for_function("document.querySelectorAll('#gallery img[alt]').length == 8")
