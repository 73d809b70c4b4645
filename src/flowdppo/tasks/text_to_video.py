"""Text-to-video with a diffusers video pipeline (Wan 2.1): prompts as ``text_to_image``, video rewards, and the
run's sample videos.

A group is ``G`` videos of one prompt. Rewards (``reward.names``): any image reward scored on
``reward.video_frames`` evenly spaced frames and aggregated (``reward.video_aggregation``), the video reward
``temporal_consistency``, or your own ``module:function`` called as ``(videos, prompts, metadata)`` with videos
``(B, F, 3, H, W)`` float32 in ``[0, 1]`` (``rewards.video``).

Outputs: ``samples.png`` holds frame strips (one row per prompt, up to 8 evenly spaced frames) of the base and the
trained policy from the same noise; ``samples.gif`` plays them side by side (``save_videos``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flowdppo.errors import ConfigError
from flowdppo.plots import grid_mosaic
from flowdppo.policies.pipelines import PipelinePolicy, pipeline_policy_class
from flowdppo.policies.video import VIDEO_FAMILIES
from flowdppo.rewards import Reward
from flowdppo.rewards.video import VIDEO_REWARDS, FrameReward, frame_indices, make_video_reward
from flowdppo.tasks.text_to_image import TextToImageTask, reward_source

STRIP_FRAMES = 8  # frames per row of samples.png
GIF_FPS = 8


class TextToVideoTask(TextToImageTask):
    """``text_to_image`` with a video pipeline: latents ``(C, F, h, w)``, videos ``(F, 3, H, W)`` in [0, 1]."""

    @staticmethod
    def policy_class(cfg) -> type[PipelinePolicy]:
        """The video adapter class of the pipeline ``cfg.model`` names (an image pipeline: a ``ConfigError``)."""
        return pipeline_policy_class(cfg.model, VIDEO_FAMILIES, "text_to_video")

    def __init__(self, cfg, device: torch.device | str = "cpu") -> None:
        self._videos: dict[int, Tensor] = {}  # the last sample videos of each velocity (by id), for save_videos
        super().__init__(cfg, device)

    def policy_options(self) -> dict:
        cfg = self.cfg
        return {"families": VIDEO_FAMILIES, "task": "text_to_video", "height": cfg.height, "width": cfg.width,
                "num_frames": cfg.num_frames}  # fmt: skip

    def load_reward(self, name: str) -> Reward:
        """A video reward by name; an image reward (or a reward server) scored frame by frame; a user's
        ``module:function`` on the whole videos."""
        if name in VIDEO_REWARDS:
            return make_video_reward(name)
        try:
            reward = super().load_reward(name)
        except ConfigError as err:
            raise ConfigError(f"{err}; or a video reward: {', '.join(VIDEO_REWARDS)}") from err
        if reward_source(name) == "user":
            return reward
        return FrameReward(reward, name, self.cfg.reward.video_frames, self.cfg.reward.video_aggregation)

    def sample_videos(self, velocity, records: list[dict]) -> Tensor:
        """One ODE video per record from the fixed noise: ``(len(records), F, 3, H, W)`` (remembered for
        ``save_videos``)."""
        noise, cond = self.fixed_batch(records, 1)
        videos = self.generate(velocity, noise, cond).cpu()
        self._videos[id(velocity)] = videos
        return videos

    def sample_grid(self, velocity, per_prompt: int = 1) -> np.ndarray:
        """Frame strips of up to 4 held-out (or training) prompts: ``(rows, frames, H, W, 3)`` in [0, 1]."""
        videos = self.sample_videos(velocity, (self.eval_records or self.train_records)[:4])
        return videos[:, frame_indices(videos.shape[1], STRIP_FRAMES)].permute(0, 1, 3, 4, 2).numpy()

    def save_videos(self, folder: Path | None, velocities: dict) -> None:
        """``folder/samples.gif``: the sample videos of each velocity side by side (a column each, a row per
        prompt), from the same noise; the videos ``sample_grid`` last made are reused. ``folder`` None: nothing
        written (a process other than the writer)."""
        records = (self.eval_records or self.train_records)[:4]
        videos = [self._videos.get(id(v)) for v in velocities.values()]
        videos = [self.sample_videos(v, records) if x is None else x for v, x in zip(velocities.values(), videos,
                                                                                     strict=True)]  # fmt: skip
        if folder is not None:
            write_gif(Path(folder) / "samples.gif", torch.stack(videos, dim=1))


def write_gif(path: Path, videos: Tensor, fps: int = GIF_FPS) -> None:
    """An animated GIF (looping) of ``videos`` ``(rows, cols, F, 3, H, W)`` in [0, 1]: frame ``f`` is the mosaic
    (``grid_mosaic``) of every video's frame ``f``."""
    grids = videos.permute(2, 0, 1, 4, 5, 3).numpy()  # (F, rows, cols, H, W, 3)
    frames = [Image.fromarray((grid_mosaic(grid) * 255).round().astype(np.uint8)) for grid in grids]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
