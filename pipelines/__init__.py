"""The recipes: one folder per supported model, in ``RepaEPipeline.save_pretrained`` layout minus weights.

This folder is the package ``diffusers_repae.recipe_folders`` once installed (setup.py maps it into the wheel;
editable installs map it too), so ``diffusers_repae.list_recipes()`` finds these folders with ``importlib.resources``.
"""
