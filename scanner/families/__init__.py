"""Model families: one small adapter per diffusers text-to-image pipeline (see `base.Family`).

`family_for(path)` picks the adapter from the folder's `model_index.json`; families are
imported only when a folder asks for them.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from ..errors import MemscanError
from .base import SCORE_SPACES, Conditioning, Family, Trajectory, cond_cat, cond_expand, cond_repeat, cond_rows, read_json

# model_index.json `_class_name` -> (module of this package, adapter class)
FAMILIES: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("stable_diffusion", "StableDiffusion"),
    "StableDiffusionXLPipeline": ("sdxl", "StableDiffusionXL"),
    "StableDiffusion3Pipeline": ("sd3", "StableDiffusion3"),
    "FluxPipeline": ("flux", "Flux"),
    "PixArtAlphaPipeline": ("pixart", "PixArt"),
    "PixArtSigmaPipeline": ("pixart", "PixArt"),
}
# Pipelines that are not text-to-image, by a pattern of their class name, with the reason.
NOT_TEXT_TO_IMAGE = (
    (r"Img2Img|ImageToImage|Refiner", "image-to-image (it starts from an input image; an SDXL refiner is one)"),
    (r"Inpaint", "inpainting (conditioned on an image and a mask)"),
    (r"Upscale|SuperRes", "an upscaler (conditioned on a low-resolution image)"),
    (r"ControlNet|Adapter|InstructPix2Pix|Depth|Variation|Redux|Fill|Kontext", "conditioned on an image as well as the text"),
    (r"Video|Animate|I2V|T2V", "a video model"),
    (r"^(DDPM|DDIM|PNDM|LDM|ScoreSdeVe|KarrasVe|DiT|Consistency)Pipeline$", "not conditioned on text (unconditional or class-conditional)"),
)


def family_names() -> list[str]:
    """The supported pipeline classes, for messages."""
    return sorted(FAMILIES)


def family_for(path: Path) -> tuple[type[Family], dict]:
    """The adapter for the pipeline folder `path` (after its own checks) and its `model_index.json`; one-line refusals otherwise."""
    index_file = path / "model_index.json"
    index = read_json(index_file) if index_file.is_file() else {}
    pipeline = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline is None:
        # Older SD 1.x/2.x folders come without model_index.json: their components load one by one.
        if (path / "text_encoder_2").is_dir() or (path / "transformer").is_dir():
            raise MemscanError(f"{path}: no model_index.json, so the pipeline class is unknown; save the pipeline with diffusers' save_pretrained")
        pipeline, index = "StableDiffusionPipeline", {}
    if pipeline not in FAMILIES:
        reason = next((why for pattern, why in NOT_TEXT_TO_IMAGE if re.search(pattern, pipeline)), None)
        reason = reason or f"memscan scores the text-to-image pipelines {', '.join(family_names())}"
        raise MemscanError(f"{path}: {pipeline} is not supported: {reason}")
    module, cls_name = FAMILIES[pipeline]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    cls.check(path, index)
    return cls, index


__all__ = [
    "FAMILIES",
    "SCORE_SPACES",
    "Conditioning",
    "Family",
    "Trajectory",
    "cond_cat",
    "cond_expand",
    "cond_repeat",
    "cond_rows",
    "family_for",
]
