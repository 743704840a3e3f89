"""`make demo` (placeholder until end-to-end training lands): builds the tiny CPU recipe and runs one SiT forward."""

import torch

from diffusers_repae import build_from_recipe

components = build_from_recipe("tiny-cpu")
sit = components["transformer"]
latents = torch.randn(2, sit.config.in_channels, sit.config.sample_size, sit.config.sample_size)
velocity = sit(latents, torch.tensor([1.0, 0.5]), torch.tensor([0, 1])).sample
print("NOTE: end-to-end training is not wired into `make demo` yet; this only builds the tiny recipe.")
print(f"tiny-cpu SiT: {sum(p.numel() for p in sit.parameters()):,} parameters; velocity {tuple(velocity.shape)}")
