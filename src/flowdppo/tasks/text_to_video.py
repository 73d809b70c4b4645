"""Text-to-video with a diffusers video pipeline (Wan 2.1): prompts as ``text_to_image``, video rewards, and the
run's sample videos.

A group is ``G`` videos of one prompt. Rewards (``reward.names``): any image reward scored on
``reward.video_frames`` evenly spaced frames and aggregated (``reward.video_aggregation``), the video reward
``temporal_consistency``, or your own ``module:function`` called as ``(videos, prompts, metadata)`` with videos
``(B, F, 3, H, W)`` uint8 (``rewards.video.UserVideoReward``).

Outputs: ``samples.png`` holds frame strips (one row per prompt, up to 8 evenly spaced frames) of the base and the
trained policy from the same noise; ``samples.mp4`` (H.264 through PyAV, ``pip install 'flowdppo[video]'``) plays
them side by side, or ``samples.gif`` where no encoder is installed (``save_videos``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flowdppo.config import task_options
from flowdppo.files import write_atomic
from flowdppo.plots import grid_mosaic
from flowdppo.policies.pipelines import PipelinePolicy, pipeline_policy_class
from flowdppo.policies.video import VIDEO_FAMILIES
from flowdppo.rewards import Reward
from flowdppo.rewards.video import FrameReward, UserVideoReward, frame_indices
from flowdppo.settings import require
from flowdppo.tasks.text_to_image import TextToImageConfig, TextToImageTask

STRIP_FRAMES = 8  # frames per row of samples.png
GIF_FPS = 8
VIDEO_FPS = 16  # Wan's frame rate
MP4_CODECS = ("libx264", "h264", "mpeg4")  # the first PyAV has an encoder for


@dataclass
class TextToVideoConfig(TextToImageConfig):
    """The text_to_video task's options (``text_to_video.*``): the text_to_image ones and the video's size."""

    height: int = 0
    """Frame height in pixels (0: resolution)."""
    width: int = 0
    """Frame width in pixels (0: resolution)."""
    num_frames: int = 81
    """Frames per video (Wan: 4k + 1)."""
    vae_slicing: bool = False
    """Decode a batch one video at a time (the VAE's enable_slicing)."""

    def check(self, prefix: str = "text_to_video.") -> None:
        super().check(prefix)
        require(self, prefix, ">= 0", "height", "width", "num_frames")


class TextToVideoTask(TextToImageTask):
    """``text_to_image`` with a video pipeline: latents ``(C, F, h, w)``, videos ``(F, 3, H, W)`` in [0, 1]."""

    reward_kinds = ("video", "image")

    @staticmethod
    def policy_class(cfg) -> type[PipelinePolicy]:
        """The video adapter class of the pipeline ``cfg.model`` names (an image pipeline: a ``ConfigError``)."""
        return pipeline_policy_class(cfg.model, VIDEO_FAMILIES, "text_to_video")

    def __init__(self, cfg, device: torch.device | str = "cpu") -> None:
        self._videos: dict[int, Tensor] = {}  # the last sample videos of each velocity (by id), for save_videos
        super().__init__(cfg, device)

    @staticmethod
    def policy_options(cfg) -> dict:
        options = task_options(cfg)
        return {
            "families": VIDEO_FAMILIES,
            "task": "text_to_video",
            "height": options.height,
            "width": options.width,
            "num_frames": options.num_frames,
            "guidance_scale_2": cfg.sampler.guidance_scale_2,
            "vae_slicing": options.vae_slicing,
        }

    def wrap_reward(self, reward: Reward, source: str, name: str) -> Reward:
        """A video reward as it is; a user's ``module:function`` on the whole videos (as uint8); an image reward (or
        a reward server's) on ``reward.video_frames`` frames of each video."""
        if source == "video":
            return reward
        if source == "user":
            return UserVideoReward(reward, name)
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
        videos = self.sample_videos(velocity, self.grid_records)
        return videos[:, frame_indices(videos.shape[1], STRIP_FRAMES)].permute(0, 1, 3, 4, 2).numpy()

    def save_videos(self, folder: Path | None, velocities: dict) -> None:
        """``folder/samples.mp4`` (``samples.gif`` without an MP4 encoder): the sample videos of each velocity side
        by side (a column each, a row per prompt), from the same noise; the videos ``sample_grid`` last made are
        reused. ``folder`` None: nothing written (a process other than the writer)."""
        records = self.grid_records
        videos = [self._videos.get(id(v)) for v in velocities.values()]
        videos = [
            self.sample_videos(v, records) if x is None else x for v, x in zip(velocities.values(), videos, strict=True)
        ]
        if folder is not None:
            write_video(Path(folder) / "samples", torch.stack(videos, dim=1))


def mp4_codec() -> str | None:
    """The H.264 (else MPEG-4) encoder of the installed PyAV, or None (no PyAV, or no such encoder)."""
    try:
        import av
    except ImportError:
        return None
    return next((codec for codec in MP4_CODECS if codec in av.codecs_available), None)


def write_video(stem: Path, videos: Tensor) -> Path:
    """``stem.mp4`` (``write_mp4``) where an encoder is installed, else ``stem.gif`` (``write_gif``); the path."""
    codec = mp4_codec()
    path = stem.with_suffix(".gif" if codec is None else ".mp4")
    write_atomic(path, lambda tmp: write_gif(tmp, videos) if codec is None else write_mp4(tmp, videos, codec))
    return path


def mosaic_frames(videos: Tensor) -> np.ndarray:
    """``videos`` ``(rows, cols, F, 3, H, W)`` in [0, 1] -> ``(F, H', W', 3)`` uint8: frame ``f`` is the mosaic
    (``grid_mosaic``, white lines between videos) of every video's frame ``f``."""
    grids = videos.permute(2, 0, 1, 4, 5, 3).numpy()  # (F, rows, cols, H, W, 3)
    return np.stack([(grid_mosaic(grid) * 255).round().astype(np.uint8) for grid in grids])


def write_mp4(path: Path, videos: Tensor, codec: str, fps: int = VIDEO_FPS) -> None:
    """An MP4 (PyAV, ``codec``, yuv420p) of the mosaic frames (``mosaic_frames``), padded white to even sides."""
    import av

    frames = mosaic_frames(videos)
    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))  # yuv420p: even height and width
    frames = np.pad(frames, pad, constant_values=255)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def write_gif(path: Path, videos: Tensor, fps: int = GIF_FPS) -> None:
    """An animated GIF (looping) of ``videos`` ``(rows, cols, F, 3, H, W)`` in [0, 1] (``mosaic_frames``)."""
    frames = [Image.fromarray(frame) for frame in mosaic_frames(videos)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
