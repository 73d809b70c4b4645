"""Algorithms: how a rollout and its advantages become training elements and a loss.

``policy_gradient`` trains the sampler's per-step Gaussian policies with the losses of ``flowdppo.losses``
(Flow-DPPO, Flow-GRPO, Flow-CPS, GRPO-Guard); ``diffusion_nft`` and ``awm`` are likelihood-free and train
on the final samples with forward noising. Add an algorithm: one file with an ``Algorithm`` subclass (its
settings section and method presets inside) and one line in ``ALGORITHMS`` (outside the package: a module named in
``FLOWDPPO_PLUGINS`` that calls ``settings.register_algorithms({"name": Class})``).
"""

from flowdppo.algorithms.awm import AWM
from flowdppo.algorithms.base import Algorithm, Elements, NonFiniteGuard
from flowdppo.algorithms.crd import CRD
from flowdppo.algorithms.dgpo import DGPO
from flowdppo.algorithms.diffusion_dpo import DiffusionDPO
from flowdppo.algorithms.diffusion_nft import DiffusionNFT
from flowdppo.algorithms.opd import OPD
from flowdppo.algorithms.policy_gradient import PolicyGradient
from flowdppo.algorithms.sft import SFT
from flowdppo.settings import ALGORITHMS, register_algorithms

register_algorithms(
    {
        "policy_gradient": PolicyGradient,
        "diffusion_nft": DiffusionNFT,
        "awm": AWM,
        "dgpo": DGPO,
        "crd": CRD,
        "opd": OPD,
        "diffusion_dpo": DiffusionDPO,
        "sft": SFT,
    }
)


def get_algorithm(cfg) -> Algorithm:
    """The configured algorithm (``cfg.algorithm``), ready to ``setup`` on the policy."""
    return ALGORITHMS[cfg.algorithm](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "Elements", "NonFiniteGuard", "get_algorithm"]
