"""Tiny randomly initialised Stable Diffusion pipelines, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

from tiny_families import clip_config, clip_tokenizer, seeded, tiny_vae


def build_tiny_pipeline(out_dir: Path, variant: str = "sd1", seed: int = 0) -> Path:
    """Save an SD 1.x-style (epsilon) or SD 2.x-style (`sd2`: v-prediction) pipeline folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd2 = variant == "sd2"
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4) if sd2 else 8,
            use_linear_projection=sd2,
        )
        text_encoder = CLIPTextModel(clip_config(32, layers=2, hidden_act="gelu" if sd2 else "quick_gelu"))
        vae = tiny_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    # SD 2.x pads with "!" (id 0), SD 1.x with the end-of-text token.
    tokenizer = clip_tokenizer(out_dir, "tokenizer", "!" if sd2 else "<|endoftext|>")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_pipeline.py OUT_DIR")
    print(build_tiny_pipeline(Path(sys.argv[1])))
