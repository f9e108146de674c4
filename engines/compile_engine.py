"""`torch.compile` engine: one compiled graph per batch-size bucket, CUDA graphs on the GPU; text encoders too.

Batches are padded up to the next bucket (the padding repeats the last row and is sliced
off), so a scan compiles at most `len(BUCKETS)` graphs however its batches fall. On CUDA
the mode is "reduce-overhead" (CUDA graphs: one replay per batch instead of hundreds of
kernel launches) and the UNet runs channels-last; on the CPU the default mode, so that the
engine can be tested there. Each text encoder module is compiled the same way, bucketed alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Conditioning, DenoiserEngine, TextEncoder

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding `rows` rows (`rows` <= the largest bucket)."""
    return next(b for b in buckets if b >= rows)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows."""
    missing = rows - len(tensor)
    return tensor if missing == 0 else torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def in_buckets(
    run: Callable[..., tuple[torch.Tensor, ...]], rows: dict[str, torch.Tensor], buckets: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    """`run(**rows)` with the rows (all `[R, ...]`) cut to the largest bucket and each piece padded to its bucket; outputs sliced back."""
    largest = buckets[-1]
    total = len(next(iter(rows.values())))
    pieces = []
    for start in range(0, total, largest):
        n = min(largest, total - start)
        bucket = bucket_for(n, buckets)
        out = run(**{k: pad_rows(v[start : start + n], bucket) for k, v in rows.items()})
        # CUDA graph outputs live in buffers that the next replay overwrites: copy them out.
        pieces.append([o[:n].clone() for o in out])
    return tuple(parts[0] if len(pieces) == 1 else torch.cat(parts) for parts in zip(*pieces))


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
        self._compiled = 0
        self._forward = self._compile(denoiser)

    def _compile(self, module: torch.nn.Module) -> Callable:
        self._compiled += 1
        # One graph per bucket and module must fit the recompile limit, or dynamo falls back to eager;
        # the limit counts per code object, and text encoders of one class (SD3's two CLIPs) share theirs.
        limit = 2 * len(self.buckets) * self._compiled
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        return torch.compile(module, mode="reduce-overhead" if self.cuda_graphs else None, dynamic=False)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's raw output for latents `[R, C, H, W]`, one timestep, conditioning rows `[R, ...]`."""
        # A 0-d timestep tensor keeps one graph for every step (a Python int would be baked in).
        t = torch.as_tensor(timestep, device=self.device)

        def run(sample: torch.Tensor, **cond: torch.Tensor) -> tuple[torch.Tensor]:
            if self.cuda_graphs:
                sample = sample.contiguous(memory_format=torch.channels_last)
            return (self._forward(sample, t, **cond),)

        return in_buckets(run, {"sample": latents, **conditioning}, self.buckets)[0]

    def _text_encoder(self, name: str, module: torch.nn.Module) -> TextEncoder:
        """The text encoder module compiled as the denoiser is, its batches padded to the same buckets."""
        forward = self._compile(module)
        return lambda **inputs: in_buckets(forward, inputs, self.buckets)
