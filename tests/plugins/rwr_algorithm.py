"""Reward-weighted regression (RWR), an algorithm added from outside the package: this one file and its one
registry line at the bottom (``FLOWDPPO_PLUGINS=rwr_algorithm`` imports it with the built-in parts).

Per element (a final sample ``x0`` forward-noised to ``x_s = (1 - s) x0 + s eps``) the flow-matching error
``||v_theta(x_s, s) - (eps - x0)||^2`` is weighted by ``w = exp(A / temperature)``, normalised to mean 1 over the
mini-batch: samples better than their group are fitted more, worse ones less.
"""

from dataclasses import dataclass

import torch

from flowdppo.algorithms.base import Algorithm
from flowdppo.algorithms.likelihood_free import LIKELIHOOD_FREE_SAMPLER, mean_squared, noised_elements, timesteps_error
from flowdppo.settings import Section, register_algorithms, require


@dataclass
class RWRConfig(Section):
    temperature: float = 0.5
    """Temperature of the weights exp(A / temperature)."""
    train_timesteps: int = 4
    """Noise levels each final sample is trained at (stratified over the schedule)."""

    def check(self, prefix: str = "rwr.") -> None:
        require(self, prefix, "> 0", "temperature", "train_timesteps")


class RewardWeightedRegression(Algorithm):
    name = "rwr"
    sections = {"rwr": RWRConfig}
    presets = {"rwr": {"sampler": LIKELIHOOD_FREE_SAMPLER}}
    reads = ("rwr.",)

    @classmethod
    def config_error(cls, cfg) -> str | None:
        return timesteps_error("rwr", "stratified", cfg.rwr.train_timesteps, cfg.sampler.num_steps)

    def elements(self, traj, advantages, policy, rng, dist):
        return noised_elements(traj, advantages, "stratified", self.cfg.rwr.train_timesteps, rng, dist)

    def loss(self, velocity, base_velocity, mb, cond, first, dist):
        weights = torch.softmax(mb["advantages"].float() / self.cfg.rwr.temperature, dim=0) * len(mb["advantages"])
        error = mean_squared(velocity(mb["noised"], mb["sigma"], cond), mb["eps"] - mb["x0"])
        loss = (weights * error).mean()
        return loss, {"policy_loss": loss.detach(), "weight_max": weights.max().detach()}


register_algorithms({"rwr": RewardWeightedRegression})
