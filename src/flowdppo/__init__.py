"""flowdppo: online RL fine-tuning of flow-matching generators with Flow-DPPO and its baselines."""

__version__ = "0.1.0"
