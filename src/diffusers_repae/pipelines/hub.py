"""Saved pipeline folders that plain diffusers loads (the code beside the weights), and Hub uploads.

``RepaEPipeline.save_pretrained`` records stable library names in ``model_index.json``::

    "_class_name": ["diffusers_repae", "RepaEPipeline"],
    "transformer": ["diffusers_repae", "SiTTransformer2DModel"],
    "scheduler": ["diffusers_repae", "FlowMatchEulerMaruyamaScheduler"],
    "vae": ["diffusers", "AutoencoderKL"],

and writes the library's inference code as one file, ``diffusers_repae.py``, in the folder root and in each
component folder whose class is ours. That is the layout of Hub custom pipelines: diffusers looks for
``<_class_name[0]>.py`` and ``<component>/<library>.py``, so ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` loads the folder with no diffusers-repae installed. ``RepaEPipeline.from_pretrained`` reads
the same names as "the installed diffusers_repae" and executes nothing from the folder.

Why one file: diffusers copies a component's code file alone (from the Hub it downloads only
``<component>/<library>.py`` of a weights folder), so that code cannot import sibling files. The file is assembled
at save time from this package's modules (the ones the pipeline and its components import), so git keeps one copy.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

LIBRARY = "diffusers_repae"
CODE_FILE = f"{LIBRARY}.py"
_RELATIVE_IMPORT = re.compile(r"^\s*(from\s+\.\S*\s+import|import\s+\.)", flags=re.MULTILINE)


class BundleError(RuntimeError):
    """The package's modules cannot be joined into one file (an import form or a name clash it cannot handle)."""


def _in_bundle() -> bool:
    """True when this code runs from a saved folder's ``diffusers_repae.py`` (``trust_remote_code``)."""
    return not __name__.startswith(f"{LIBRARY}.")


def library_namespace():
    """Where our classes are looked up by name: the installed package, or the bundle file itself."""
    return sys.modules[__name__] if _in_bundle() else importlib.import_module(LIBRARY)


def own_class_name(obj) -> str | None:
    """The stable name of ``obj``'s class if it is one of ours (exported by the package), else None."""
    cls = type(getattr(obj, "_orig_mod", obj))  # torch.compile wraps modules
    defined_here = cls.__module__ == __name__ if _in_bundle() else cls.__module__.startswith(f"{LIBRARY}.")
    if defined_here and getattr(library_namespace(), cls.__name__, None) is cls:
        return cls.__name__
    return None


# ------------------------------------------------------------------------------------------ the bundle
@functools.cache
def _parse(module_name: str) -> tuple[str, ast.Module, str]:
    module = importlib.import_module(module_name)
    source = Path(module.__file__).read_text(encoding="utf-8")
    package = module.__package__ or module_name.rpartition(".")[0]
    return source, ast.parse(source), package


def _own_module(node: ast.ImportFrom, package: str) -> str | None:
    """The absolute module of an import of our own package (relative or absolute), else None."""
    if node.level:
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    if node.module and node.module.split(".")[0] == LIBRARY:
        return node.module
    return None


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _definition(module_name: str, name: str) -> tuple[str, str]:
    """(module, name) where ``name`` imported from ``module_name`` is really defined (follows re-exports)."""
    _, tree, package = _parse(module_name)
    for node in tree.body:
        if name in _defined_names(node):
            return module_name, name
        if isinstance(node, ast.ImportFrom) and (source := _own_module(node, package)):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _definition(source, alias.name)
    if importlib.util.find_spec(f"{module_name}.{name}") is not None:
        raise BundleError(f"{module_name}: importing the submodule {name!r} itself cannot go into one file.")
    raise BundleError(f"{module_name}: cannot find where {name!r} is defined.")


class _Bundle:
    """Joins modules of this package into one source, dependencies first, imports of our own names removed."""

    def __init__(self) -> None:
        self.imports: list[str] = []  # third-party top-level imports, once each
        self.bindings: dict[str, str] = {}  # top-level name -> what it is bound to (a clash is an error)
        self.sections: list[str] = []
        self.state: dict[str, str] = {}  # module -> "open" | "done"

    def bind(self, name: str, meaning: str, where: str) -> bool:
        """Records a top-level name; False if the same binding is already there (the statement is dropped)."""
        if name not in self.bindings:
            self.bindings[name] = meaning
            return True
        if self.bindings[name] == meaning:
            return False
        raise BundleError(f"{where}: the name {name!r} means different things in two modules; rename one.")

    def add(self, module_name: str) -> None:
        """Appends ``module_name``'s code (after the modules of ours it imports) with its imports rewritten."""
        if self.state.get(module_name):
            return  # done, or an import cycle (the later module's code refers to it at call time)
        self.state[module_name] = "open"
        source, tree, package = _parse(module_name)
        # first line (0-based) of a statement -> (its end line, the lines that replace it). The dependencies go in
        # first, so that of two identical definitions the earlier one in the file is kept.
        edits = self._own_import_edits(module_name, tree, package)
        edits.update(self._top_level_edits(module_name, tree, package))
        lines, kept, line = source.splitlines(), [], 0
        while line < len(lines):
            if line in edits:
                end, replacement = edits[line]
                kept.extend(replacement)
                line = end
            else:
                kept.append(lines[line])
                line += 1
        self.sections.append(f"# {'-' * 80} {module_name}\n" + "\n".join(kept).strip("\n") + "\n")
        self.state[module_name] = "done"

    def _top_level_edits(self, module_name: str, tree: ast.Module, package: str) -> dict:
        """Drops the docstring, ``__all__`` and definitions already in the bundle; hoists third-party imports."""
        edits = {}
        for index, node in enumerate(tree.body):
            drop = {node.lineno - 1: (node.end_lineno, [])}
            if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                edits.update(drop)  # the module docstring
            elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
                edits.update(drop)
            elif isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and not _own_module(node, package)):
                for alias in node.names:
                    if isinstance(node, ast.Import) and alias.name.split(".")[0] == LIBRARY:
                        raise BundleError(f"{module_name}: `import {alias.name}`: use a from-import for one file.")
                    if isinstance(node, ast.ImportFrom):
                        bound, meaning = alias.asname or alias.name, f"from {node.module} import {alias.name}"
                    elif alias.asname:
                        bound, meaning = alias.asname, f"import {alias.name}"
                    else:
                        bound = alias.name.split(".")[0]
                        meaning = f"import {bound}"
                    self.bind(bound, meaning, module_name)
                if ast.unparse(node) not in self.imports:
                    self.imports.append(ast.unparse(node))
                edits.update(drop)
            elif isinstance(node, ast.Assign) and _defined_names(node) == ["__all__"]:
                edits.update(drop)
            elif not isinstance(node, ast.ImportFrom):
                names, meaning = _defined_names(node), ast.dump(node)
                if names and not all([self.bind(name, meaning, module_name) for name in names]):
                    edits.update(drop)  # an identical definition is already in the bundle
        return edits

    def _own_import_edits(self, module_name: str, tree: ast.Module, package: str) -> dict:
        """Imports of our own names (anywhere in the module) become nothing, or ``alias = name``; the modules
        defining those names are added first."""
        edits, top_level = {}, set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or (source_module := _own_module(node, package)) is None:
                continue
            replacement = []
            for alias in node.names:
                defining_module, name = _definition(source_module, alias.name)
                self.add(defining_module)
                bound = alias.asname or alias.name
                if bound == name:
                    continue
                if id(node) not in top_level or self.bind(bound, f"{defining_module}:{name}", module_name):
                    replacement.append(f"{bound} = {name}")
            if not replacement and id(node) not in top_level:
                replacement = ["pass"]  # the import was a block's only statement, perhaps
            edits[node.lineno - 1] = (node.end_lineno, [" " * node.col_offset + line for line in replacement])
        return edits

    def source(self, version: str) -> str:
        modules = ", ".join(section.splitlines()[0].rpartition(" ")[2] for section in self.sections)
        header = (
            f"# Written by diffusers-repae {version} (RepaEPipeline.save_pretrained): the library's inference\n"
            "# code in one file, so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads\n"
            f"# this folder without diffusers-repae installed. Modules, in order: {modules}.\n"
            "from __future__ import annotations\n\n"
            "import sys as _sys\n"
            "import types as _types\n"
        )
        body = header + "\n".join(self.imports) + "\n\n\n" + "\n\n".join(self.sections)
        return body + _ONE_SET_OF_CLASSES.format(digest=hashlib.sha256(body.encode()).hexdigest()[:16])


# diffusers re-runs a code file for every model_index.json entry that names it; see the comment in the text.
_ONE_SET_OF_CLASSES = """

# {rule} one set of classes
# diffusers executes this file once per entry of model_index.json that names it (the pipeline, each component),
# again in the same module or, for a Hub repo, under another module name. Every run after the first adopts the
# first run's objects, so that the pipeline's isinstance checks hold for its components.
_BUNDLE_KEY = "_diffusers_repae_bundle_{{digest}}"
if _BUNDLE_KEY in _sys.modules:
    globals().update({{{{k: v for k, v in vars(_sys.modules[_BUNDLE_KEY]).items() if not k.startswith("__")}}}})
else:
    _sys.modules[_BUNDLE_KEY] = _types.ModuleType(_BUNDLE_KEY)
    vars(_sys.modules[_BUNDLE_KEY]).update({{{{k: v for k, v in globals().items() if not k.startswith("__")}}}})
""".format(rule="-" * 80)


def bundle_source(modules: list[str]) -> str:
    """One Python file with the given modules of this package and everything of ours they import."""
    if _in_bundle():
        return Path(__file__).read_text(encoding="utf-8")  # already the one file
    bundle = _Bundle()
    for module_name in modules:
        bundle.add(module_name)
    source = bundle.source(importlib.import_module(LIBRARY).__version__)
    compile(source, CODE_FILE, "exec")
    if _RELATIVE_IMPORT.search(source):
        raise BundleError("a relative import is left in the bundle; diffusers would look for a file beside it.")
    return source


# ----------------------------------------------------------------------------------- saving and loading
def write_remote_code(pipeline, folder: str | Path) -> bool:
    """Rewrites a just-saved folder's ``model_index.json`` with stable names and writes the code beside the weights.

    Returns False (with a warning, the weights stay loadable by ``RepaEPipeline.from_pretrained``) when the code
    cannot be assembled.
    """
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    own = {name: own_class_name(module) for name, module in pipeline.components.items() if module is not None}
    components = {name: class_name for name, class_name in own.items() if class_name is not None and name in index}
    modules = [type(pipeline).__module__] + [type(pipeline.components[name]).__module__ for name in components]
    try:
        code = bundle_source(list(dict.fromkeys(modules)))
    except (BundleError, OSError, SyntaxError) as error:
        warnings.warn(
            f"save_pretrained: the pipeline code was not written beside the weights ({error}); the folder loads "
            f"with RepaEPipeline.from_pretrained, not with plain DiffusionPipeline.from_pretrained.",
            stacklevel=3,
        )
        return False
    index["_class_name"] = [LIBRARY, type(pipeline).__name__]
    index.pop("_name_or_path", None)  # where a reloaded pipeline came from: a local path, not for the Hub
    (folder / CODE_FILE).write_text(code, encoding="utf-8")
    for name in pipeline.components:
        if name in components:
            index[name] = [LIBRARY, components[name]]
            (folder / name / CODE_FILE).write_text(code, encoding="utf-8")
        elif (folder / name / CODE_FILE).is_file():
            (folder / name / CODE_FILE).unlink()  # left by an earlier save whose component there was ours
    # The ImageNet names are the in-memory default for 1000 classes; the folder states them, as transformers'
    # configs do, so that any loader (this package or the code beside the weights) has them without a side file.
    if index.get("id2label") is None and getattr(pipeline, "id2label", None):
        index["id2label"] = {str(key): value for key, value in sorted(pipeline.id2label.items())}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def as_installed_classes(config: dict) -> dict:
    """``["diffusers_repae", Name]`` entries -> the module of the installed (or bundled) class, for diffusers to
    resolve in this process instead of importing the folder's code file."""
    namespace = library_namespace()
    for key, value in config.items():
        if key != "_class_name" and isinstance(value, list) and len(value) == 2 and value[0] == LIBRARY:
            cls = getattr(namespace, value[1], None)
            if not isinstance(cls, type):  # an edited or newer folder: say which entry, not "trust_remote_code"
                raise ValueError(
                    f"model_index.json: {key} names the class {value[1]!r}, which {LIBRARY} does not have; allowed: "
                    f'one of its classes (e.g. ["{LIBRARY}", "SiTTransformer2DModel"] for the transformer), or '
                    "a newer diffusers-repae if the folder was written by one."
                )
            config[key] = [cls.__module__, value[1]]
    return config


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    ignore_patterns: list[str] | None = None,
) -> str:
    """Creates ``repo_id`` (if needed) and uploads ``folder``; returns the repo id. Network: the Hub."""
    import huggingface_hub

    repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message or "Upload RepaEPipeline",
        create_pr=create_pr,
        ignore_patterns=ignore_patterns,
    )
    return repo_id


class RepaEHubMixin:
    """Mixed into our pipelines before ``DiffusionPipeline``: folders with code beside the weights, loaded back
    without executing it, and ``save_pretrained(push_to_hub=True)`` that uploads the complete folder."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        hub = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "commit_message", "create_pr")
            if key in kwargs
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(self, save_directory)
        if push_to_hub:
            repo_id = hub.pop("repo_id", Path(save_directory).name)
            if not (Path(save_directory) / "README.md").exists():  # a model card, as diffusers' own push writes
                from diffusers.utils import hub_utils

                card = hub_utils.load_or_create_model_card(repo_id, token=hub.get("token"), is_pipeline=True)
                hub_utils.populate_model_card(card, tags=["repa-e", "class-conditional"])
                card.save(Path(save_directory) / "README.md")
            push_folder_to_hub(save_directory, repo_id, **hub)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # This class is the pipeline that ["diffusers_repae", "RepaEPipeline"] names: diffusers must not import the
        # folder's copy of it (that needs trust_remote_code and would run code from disk).
        config = super()._dict_from_json_file(json_file)
        class_name = config.get("_class_name")
        if isinstance(class_name, list) and len(class_name) == 2 and class_name[0] == LIBRARY:
            config["_class_name"] = class_name[1]
        return config

    @classmethod
    def load_config(cls, *args, **kwargs):
        outputs = super().load_config(*args, **kwargs)
        as_installed_classes(outputs[0] if isinstance(outputs, tuple) else outputs)
        return outputs
