"""`benchmarks/digits_folder.py`: scikit-learn's digits as an image folder the demo reads (sklearn is optional)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def script():
    spec = importlib.util.spec_from_file_location("digits_folder", REPO / "benchmarks" / "digits_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_digits():
    ink = np.zeros((3, 8, 8))
    ink[:, 2:6, 3] = 16.0  # a vertical stroke at full ink
    return np.round(255 * (1 - ink / 16)).astype(np.uint8), np.array([1, 7, 1])


def test_writes_one_folder_per_digit_with_dark_ink_on_white(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "digits_as_images", _fake_digits)
    out = script.main(["--output_dir", str(tmp_path / "digits")])
    assert sorted(p.name for p in out.iterdir()) == ["digit_1", "digit_7"]
    assert len(list((out / "digit_1").glob("*.png"))) == 2
    image = np.asarray(Image.open(out / "digit_7" / "0001.png"))
    assert image.shape == (8, 8, 3)
    assert image[3, 3].tolist() == [0, 0, 0] and image[0, 0].tolist() == [255, 255, 255]


def test_refuses_to_overwrite_a_folder(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script, "digits_as_images", _fake_digits)
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        script.run_cli(script.main, ["--output_dir", str(tmp_path / "digits")])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "digits" / "mine.txt").read_text() == "keep"


def test_without_scikit_learn_the_error_names_the_install(script, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(script.UserError, match="pip install scikit-learn"):
        script.digits_as_images()
