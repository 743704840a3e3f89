"""Helpers the training tests share (test modules never import each other)."""

from accelerate.state import AcceleratorState, GradientState


def reset_accelerate():
    """Forget accelerate's process-global state, which a test run before may have set up."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def training_script(name: str):
    """``training/<name>.py`` imported as a module (the scripts are not a package), accelerate's state reset."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    try:
        module = __import__(name)
    finally:
        sys.path.pop(0)
    reset_accelerate()
    return module
