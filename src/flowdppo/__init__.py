"""flowdppo: online RL fine-tuning of flow-matching generators with Flow-DPPO and the methods it is measured
against."""

from transformers.utils import logging as _transformers_logging

# diffusers imports every image-processor class of transformers; without torchvision each announces, once, its
# fallback to PIL. That backend is never used here: the notice is noise on every import.
_transformers_logging.get_logger("transformers.utils.import_utils").setLevel(_transformers_logging.ERROR)

__version__ = "0.1.0"

# The built-in parts register their settings sections, algorithms and tasks (flowdppo.settings); then the modules
# FLOWDPPO_PLUGINS names.
from flowdppo import algorithms, samplers, tasks, tracking  # noqa: E402, F401
from flowdppo.settings import load_plugins  # noqa: E402

load_plugins()
