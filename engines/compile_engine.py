"""`torch.compile` engine: one compiled graph per batch-size bucket, CUDA graphs on the GPU.

Batches are padded up to the next bucket (the padding repeats the last row and is sliced
off), so a scan compiles at most `len(BUCKETS)` graphs however its batches fall. On CUDA
the mode is "reduce-overhead" (CUDA graphs: one replay per batch instead of hundreds of
kernel launches) and the UNet runs channels-last; on the CPU the default mode, so that the
engine can be tested there.
"""

from __future__ import annotations

import torch

from .base import Conditioning, DenoiserEngine

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding `rows` rows (`rows` <= the largest bucket)."""
    return next(b for b in buckets if b >= rows)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows."""
    missing = rows - len(tensor)
    return tensor if missing == 0 else torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class CompileEngine(DenoiserEngine):
    """Runs the denoiser through `torch.compile`, padding batches to fixed bucket sizes."""

    name = "compile"

    def __init__(self, denoiser: torch.nn.Module, buckets: tuple[int, ...] = BUCKETS):
        self.device = next(denoiser.parameters()).device
        self.cuda_graphs = self.device.type == "cuda"
        if self.cuda_graphs:
            denoiser = denoiser.to(memory_format=torch.channels_last)
        self.denoiser = denoiser
        self.buckets = buckets
        # One graph per bucket must fit the recompile limit, or dynamo falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(buckets))
        self._forward = torch.compile(denoiser, mode="reduce-overhead" if self.cuda_graphs else None, dynamic=False)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's raw output for latents `[R, C, H, W]`, one timestep, conditioning rows `[R, ...]`."""
        largest = self.buckets[-1]
        outputs = []
        for start in range(0, len(latents), largest):
            x = latents[start : start + largest]
            n = len(x)
            rows = bucket_for(n, self.buckets)
            x = pad_rows(x, rows)
            if self.cuda_graphs:
                x = x.contiguous(memory_format=torch.channels_last)
            cond = {k: pad_rows(v[start : start + largest], rows) for k, v in conditioning.items()}
            # A 0-d timestep tensor keeps one graph for every step (a Python int would be baked in).
            t = torch.as_tensor(timestep, device=self.device)
            out = self._forward(x, t, **cond)
            # CUDA graph outputs live in buffers that the next replay overwrites: copy them out.
            outputs.append(out[:n].clone())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
