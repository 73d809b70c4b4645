"""Errors the user can act on. The CLI prints them as one line and exits with code 2 (``--debug`` for the traceback)."""


class FlowDPPOError(Exception):
    """Base of every error that says what to fix."""


class ConfigError(FlowDPPOError, ValueError):
    """A configuration or input problem: the message names the key and what is allowed."""


class RewardError(FlowDPPOError, ValueError):
    """A reward could not be loaded, or returned something other than one finite score per image."""


class ConsistencyError(FlowDPPOError, RuntimeError):
    """The replayed policy does not reproduce the rollout policy before any update."""


class NonFiniteError(FlowDPPOError, FloatingPointError):
    """A reward, advantage, loss or gradient norm was NaN or infinite (and was not trained on)."""


class CheckpointError(FlowDPPOError, ValueError):
    """A checkpoint file is missing, truncated, malformed or does not fit the run."""
