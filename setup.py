"""Build hook: the repository's top-level ``pipelines/`` folder (the recipes) becomes the package
``diffusers_repae.recipe_folders`` inside the wheel. It stays the one copy in git; editable installs map the
same folder, so ``importlib.resources.files("diffusers_repae.recipe_folders")`` finds it either way.
Everything else is declared in setup.cfg.
"""

from setuptools import find_packages, setup

setup(
    package_dir={"": "src", "diffusers_repae.recipe_folders": "pipelines"},
    packages=[*find_packages("src"), "diffusers_repae.recipe_folders"],
)
