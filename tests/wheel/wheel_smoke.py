"""Run by tests/wheel/test_wheel_packaging.py with the interpreter of a clean environment holding the built wheel and
the core dependencies only. Argument: a JSON object with ``recipes`` (the names git holds in pipelines/) and ``work``
(a scratch folder). Exits non-zero on the first failed check."""

import json
import sys
import time
from pathlib import Path

start = time.perf_counter()
args = json.loads(sys.argv[1])
work = Path(args["work"])

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

import diffusers_repae  # noqa: E402
from diffusers_repae import RepaEPipeline, list_recipes, resolve_recipe  # noqa: E402

package = Path(diffusers_repae.__file__).resolve()
assert str(package).startswith(sys.prefix), f"diffusers_repae imported from {package}, not the installed wheel"
assert resolve_recipe("tiny-cpu").resolve().is_relative_to(package.parent), resolve_recipe("tiny-cpu")
assert list_recipes() == args["recipes"], list_recipes()
for extra in ("accelerate", "datasets", "lpips", "torch_fidelity", "matplotlib"):
    try:
        __import__(extra)
    except ModuleNotFoundError:
        continue
    raise AssertionError(f"{extra} is importable: this environment should hold the core dependencies only")

for subpackage, extra in (("training", "train"), ("evaluation", "eval")):
    try:
        __import__(f"diffusers_repae.{subpackage}")
    except ModuleNotFoundError as error:
        assert f"pip install 'diffusers-repae[{extra}]'" in str(error), error
    else:
        raise AssertionError(f"diffusers_repae.{subpackage} imported without its extra")

pipe = RepaEPipeline.from_recipe("tiny-cpu")
pipe.set_progress_bar_config(disable=True)
call = dict(class_labels=[0, 1], num_inference_steps=2, output_type="pt")
images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
assert images.shape[:2] == (2, 3) and bool(torch.isfinite(images).all())

pipe.save_pretrained(work / "saved")
for loader in (RepaEPipeline.from_pretrained, lambda p: DiffusionPipeline.from_pretrained(p, trust_remote_code=True)):
    loaded = loader(work / "saved")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(again, images), f"{type(loaded).__module__}: the reloaded pipeline samples differently"
print(f"wheel smoke test passed in {time.perf_counter() - start:.1f} s")
