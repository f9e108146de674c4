"""MS-SSIM as torchmetrics 1.3.2 computes it (the version NeMo pins), batched over groups.

`multiscale_structural_similarity_index_measure(x, y, reduction="none", betas=...)` with the
defaults `gaussian_kernel=True, sigma=1.5, k1=0.01, k2=0.03, data_range=None, normalize="relu"`:
at each scale, reflect-pad by the kernel radius, Gaussian-filter (window `2 * int(3.5 sigma + 0.5) + 1`),
crop the maps by the radius, take `cs` (and at the last scale the full SSIM) as the mean
over channels and positions, `relu`, then `prod_s v_s ** beta_s`; scales are 2x average-pooled.
The data range `R = max(range(x), range(y))` is recomputed at every scale, over one call's
whole batch: here over each group (leading axis) separately, as one call per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import MemscanError

K1, K2 = 0.01, 0.03


def gaussian_radius(sigma: float) -> int:
    """The kernel radius torchmetrics derives from sigma (`kernel_size` is ignored with a Gaussian kernel)."""
    return int(3.5 * sigma + 0.5)


def check_size(size: int, sigma: float, scales: int) -> None:
    """Refuse images too small for `scales` scales: the last must be over twice the radius (reflect pad, crop)."""
    radius, smallest = gaussian_radius(sigma), size >> (scales - 1)
    if smallest <= 2 * radius:
        need = (2 * radius + 1) << (scales - 1)
        raise MemscanError(
            f"MS-SSIM with sigma {sigma} (window {2 * radius + 1}) over {scales} scales needs images of at least "
            f"{need} x {need}; these are {size} x {size} (use a larger latent size, fewer scales or a smaller sigma)"
        )


def _kernel(sigma: float, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = gaussian_radius(sigma)
    d = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-((d / sigma) ** 2) / 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, -1, -1)


def _sim_and_cs(x: torch.Tensor, y: torch.Tensor, sigma: float, data_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and contrast sensitivity per image `[N]` of `[N, C, H, W]`; `data_range` per image."""
    channels, radius = x.shape[1], gaussian_radius(sigma)
    c1 = ((K1 * data_range) ** 2)[:, None, None, None]
    c2 = ((K2 * data_range) ** 2)[:, None, None, None]
    pad = (radius,) * 4
    x, y = F.pad(x, pad, mode="reflect"), F.pad(y, pad, mode="reflect")
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), _kernel(sigma, channels, x.dtype, x.device), groups=channels)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(len(x))
    s_xx = (e_xx - mu_x**2).clamp_min(0)
    s_yy = (e_yy - mu_y**2).clamp_min(0)
    s_xy = e_xy - mu_x * mu_y
    upper = 2 * s_xy + c2
    lower = s_xx + s_yy + c2
    ssim = ((2 * mu_x * mu_y + c1) * upper) / ((mu_x**2 + mu_y**2 + c1) * lower)
    cs = upper / lower
    crop = (..., slice(radius, -radius), slice(radius, -radius))
    return ssim[crop].flatten(1).mean(dim=1), cs[crop].flatten(1).mean(dim=1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, betas: Sequence[float] = (0.33, 0.33, 0.33), sigma: float = 1.5) -> torch.Tensor:
    """`[G, P]` MS-SSIM of image pairs `x[g, p]`, `y[g, p]` (`[G, P, C, H, W]`), each group `g` as one torchmetrics call."""
    check_size(min(x.shape[-2:]), sigma, len(betas))
    groups, pairs = x.shape[:2]
    values = []
    for scale in range(len(betas)):
        data_range = torch.maximum(_spread(x), _spread(y)).repeat_interleave(pairs)
        sim, cs = _sim_and_cs(x.flatten(0, 1), y.flatten(0, 1), sigma, data_range)
        values.append((sim if scale == len(betas) - 1 else cs).relu())
        if scale + 1 < len(betas):
            x = F.avg_pool2d(x.flatten(0, 1), 2).unflatten(0, (groups, pairs))
            y = F.avg_pool2d(y.flatten(0, 1), 2).unflatten(0, (groups, pairs))
    weights = torch.tensor(betas, dtype=x.dtype, device=x.device)[:, None]
    return (torch.stack(values) ** weights).prod(dim=0).view(groups, pairs)


def _spread(t: torch.Tensor) -> torch.Tensor:
    """`max - min` over everything but the leading (group) axis."""
    flat = t.flatten(1)
    return flat.amax(dim=1) - flat.amin(dim=1)
