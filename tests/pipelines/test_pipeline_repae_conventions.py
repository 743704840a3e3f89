"""diffusers' calling conventions on RepaEPipeline: ``num_images_per_prompt`` (with the older ``num_images_per_label``)
and label lists nested one level, each checked against the same call written out flat."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from diffusers_repae import FlowMatchEulerMaruyamaScheduler, RepaEPipeline, SiTTransformer2DModel


@pytest.fixture(scope="module")
def pipe() -> RepaEPipeline:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sit = SiTTransformer2DModel(
        sample_size=4, patch_size=2, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=5
    )
    with torch.no_grad():
        for param in sit.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # labels must change the output for the tests to mean much
    vae = AutoencoderKL(
        block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    pipe = RepaEPipeline(sit.eval(), vae.eval(), FlowMatchEulerMaruyamaScheduler(), default_num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def run(pipe, class_labels, output_type="latent", **kwargs):
    return pipe(class_labels, generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs).images


def test_num_images_per_prompt_equals_the_old_name_and_the_written_out_labels(pipe):
    standard = run(pipe, [1, 2], num_images_per_prompt=2)
    assert standard.shape[0] == 4
    torch.testing.assert_close(standard, run(pipe, [1, 2], num_images_per_label=2), atol=0, rtol=0)
    torch.testing.assert_close(standard, run(pipe, [1, 1, 2, 2]), atol=0, rtol=0)  # consecutive per label
    assert not torch.equal(standard, run(pipe, [1, 2, 1, 2]))  # ...and the labels do matter
    torch.testing.assert_close(run(pipe, [1, 2], num_images_per_prompt=2, num_images_per_label=2), standard)
    assert run(pipe, [3]).shape[0] == 1  # default 1


def test_num_images_per_prompt_gives_pil_images(pipe):
    images = pipe(class_labels=[1, 2], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 4 and images[0].size == (8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_images_per_prompt=2, num_images_per_label=3), "num_images_per_prompt=2 and num_images_per_label=3"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
        (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer >= 1"),
        (dict(num_images_per_label=0), "num_images_per_label must be an integer >= 1"),
    ],
)
def test_bad_image_counts_are_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, [1], **kwargs)


def test_labels_nested_one_level_are_flattened(pipe):
    torch.testing.assert_close(run(pipe, [[1], [1]]), run(pipe, [1, 1]), atol=0, rtol=0)
    torch.testing.assert_close(run(pipe, [[1, 4], (2,)]), run(pipe, [1, 4, 2]), atol=0, rtol=0)
    torch.testing.assert_close(run(pipe, [[1], [2]], num_images_per_prompt=2), run(pipe, [1, 1, 2, 2]), atol=0, rtol=0)
    assert pipe.get_label_ids([[0], [3, 4]]) == [0, 3, 4]


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([[[1]], [[2]]], "nested again"),
        ([[1, [2]]], "nested again"),
        ([[1], 2], "mixes lists with single labels"),
        ([1, [2]], "mixes lists with single labels"),
        ([[1], None], "mixes lists with single labels"),
        ([[], [1]], "empty"),
    ],
)
def test_deeper_or_mixed_nesting_is_a_clear_error(pipe, labels, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, labels)


def test_remote_code_copy_keeps_the_conventions(pipe, tmp_path):
    """A saved folder loaded by plain diffusers (``trust_remote_code``) runs the copied code: diffusers' names,
    ``compatibles``, ``num_images_per_prompt``, and weights in the old attention layout, all still there."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file, save_file

    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    new = load_file(weights)
    old = {}
    for key, value in new.items():  # the pre-rename layout, fused here by hand
        if ".attn.to_q." in key:
            parts = [new[key.replace(".to_q.", f".{name}.")] for name in ("to_q", "to_k", "to_v")]
            old[key.replace(".to_q.", ".qkv.")] = torch.cat(parts)
        elif ".attn.to_out.0." in key:
            old[key.replace(".to_out.0.", ".proj.")] = value
        elif not (".attn.to_k." in key or ".attn.to_v." in key):
            old[key] = value
    save_file(old, weights, metadata={"format": "pt"})

    remote = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    assert not type(remote).__module__.startswith("diffusers_repae")
    assert "transformer_blocks.0.attn.to_out.0.weight" in remote.transformer.state_dict()
    names = {cls.__name__ for cls in remote.scheduler.compatibles}
    assert names == {"FlowMatchEulerMaruyamaScheduler", "FlowMatchHeunScheduler", "FlowMatchEulerDiscreteScheduler",
                     "FlowMatchHeunDiscreteScheduler"}  # fmt: skip
    assert FlowMatchEulerDiscreteScheduler in remote.scheduler.compatibles
    torch.testing.assert_close(
        run(remote, [1, 2], num_images_per_prompt=2), run(pipe, [1, 2], num_images_per_label=2), atol=0, rtol=0
    )
