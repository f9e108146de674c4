"""The testbed training loop's memorization filter (`memscan finetune`).

Each step, `SampleFilter` scores the batch with `scanner.training.MemorizationFilter`
(the step's own conditional prediction plus one unconditional forward) and returns the
keep-mask. The model trains from scratch, so the threshold cannot be fixed in advance:
every `calibrate_every` steps it is re-fitted (`TimestepQuantileThreshold`) on a fixed
sample of normal training pairs at fresh timesteps and noise, drawn from the filter's
own generator so that the training loop's random draws stay those of the unfiltered build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..training import MemorizationFilter, TimestepQuantileThreshold

CHUNK = 256  # calibration pairs per batched forward


@dataclass
class FilterSettings:
    """The threshold rule and how often, and on how many normal pairs, it is re-fitted."""

    quantile: float = 0.99
    bins: int = 10
    calibration_pairs: int = 1000
    calibrate_every: int = 100
    seed: int = 0


SMOKE_FILTER = FilterSettings(bins=2, calibration_pairs=16, calibrate_every=2)


class SampleFilter:
    """Keep-mask per training batch; counts what it drops (planted: index >= num_normal)."""

    def __init__(self, settings: FilterSettings, unet, text_encoder, latents: torch.Tensor, input_ids: torch.Tensor,
                 empty_ids: torch.Tensor, noise_scheduler, num_normal: int):
        self.settings = settings
        self.unet, self.text_encoder, self.noise_scheduler = unet, text_encoder, noise_scheduler
        self.empty_ids = empty_ids[None]
        self.num_normal = num_normal
        self.generator = torch.Generator().manual_seed(settings.seed)
        sample = torch.randperm(num_normal, generator=self.generator)[: settings.calibration_pairs]
        self.calibration_latents, self.calibration_ids = latents[sample], input_ids[sample]
        self.rule = TimestepQuantileThreshold(settings.quantile, settings.bins, noise_scheduler.config.num_train_timesteps)
        self.filter = MemorizationFilter(unet, self._empty_embedding(), self.rule)
        self.seen = {"planted": 0, "normal": 0}
        self.dropped = {"planted": 0, "normal": 0}
        self.skipped_steps = 0
        self.calibrations: list[dict] = []

    @torch.no_grad()
    def _empty_embedding(self) -> torch.Tensor:
        # The text encoder trains jointly, so e_"" moves with it.
        return self.text_encoder(self.empty_ids)[0]

    @torch.no_grad()
    def calibrate(self, step: int) -> None:
        """Re-fit the threshold on the fixed normal sample, at fresh timesteps and noise."""
        latents = self.calibration_latents
        timesteps = self.rule.sample_timesteps(len(latents), self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        magnitudes = torch.cat([
            self.filter.magnitudes(x, t, self.text_encoder(ids)[0])
            for x, t, ids in zip(noisy.split(CHUNK), timesteps.split(CHUNK), self.calibration_ids.split(CHUNK))
        ])
        self.rule.fit(magnitudes, timesteps)
        self.calibrations.append({"step": step, "thresholds": [round(v, 4) for v in self.rule.values.tolist()]})

    def __call__(self, step: int, noisy: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor,
                 prediction: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The keep-mask `[B]` of one training step's batch (training-set indices `idx`)."""
        self.filter.empty_embedding = self._empty_embedding()
        if step % self.settings.calibrate_every == 0:
            self.calibrate(step)
        keep = self.filter(noisy, timesteps, embeddings, cond_prediction=prediction).keep
        planted = idx >= self.num_normal
        for kind, mask in (("planted", planted), ("normal", ~planted)):
            self.seen[kind] += int(mask.sum())
            self.dropped[kind] += int((mask & ~keep).sum())
        self.skipped_steps += not bool(keep.any())
        return keep

    def stats(self) -> dict:
        """Settings, samples seen and dropped per kind, skipped steps, the threshold history."""
        return {
            "settings": asdict(self.settings),
            "seen": dict(self.seen),
            "dropped": dict(self.dropped),
            "dropped_share": {k: self.dropped[k] / max(1, self.seen[k]) for k in self.seen},
            "skipped_steps": self.skipped_steps,
            "calibrations": self.calibrations,
        }
