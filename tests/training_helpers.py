"""Helpers the training tests share (test modules never import each other)."""

from accelerate.state import AcceleratorState, GradientState


def reset_accelerate():
    """Forget accelerate's process-global state, which a test run before may have set up."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
