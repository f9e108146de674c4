"""`attention-entropy`: Ren et al., ECCV 2024 (code: renjie3/MemAttn, `detect.py --mode E`).

At the first step on `x_T`, in one cross-attention layer of the UNet, the conditional branch's
attention probabilities over all key tokens (BOS, prompt, EOS and padding; no mask) are
averaged over heads and query positions, and the score is that distribution's entropy:

    p_j = mean_h mean_q softmax_j(Q_hq . K_hj * scale),   score = -sum_j p_j ln p_j

(the entropy of the averaged distribution, natural log), averaged over generations. The
layer is the reference's `down_blocks[1].attentions[1]` on SD 1.x (index 3 of its 16): by
rule, the last transformer block's `attn2` of the second down block that has cross-attention,
or of the only one. The forward stops right after that layer, so one prompt costs part of
one conditional forward.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..encode import TokenizedPrompts
from ..errors import MemscanError
from ..families import cond_repeat
from .base import Detector, prompt_rows


@dataclass(frozen=True)
class AttentionEntropySettings:
    """The reference's defaults (`text2img.py`, `detect.py` mode E): one generation, first step."""

    generations: int = 1
    num_inference_steps: int = 50
    layer: str | None = None  # module path of an `attn2`; None: the rule above


class _Recorded(Exception):
    """Raised by the hook once the layer's probabilities are recorded: the rest of the forward is not needed."""


def default_layer(unet: torch.nn.Module) -> str:
    """The reference's layer by rule: the last `attn2` of the second cross-attention down block (or the only one)."""
    blocks = [i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)]
    if not blocks:
        raise MemscanError("the UNet has no cross-attention down block, so attention-entropy has no layer to read")
    block = blocks[min(1, len(blocks) - 1)]
    attention = len(unet.down_blocks[block].attentions) - 1
    transformer = len(unet.down_blocks[block].attentions[attention].transformer_blocks) - 1
    return f"down_blocks.{block}.attentions.{attention}.transformer_blocks.{transformer}.attn2"


def token_distribution(attn: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """`[R, L]`: the cross-attention probabilities of `attn` averaged over heads and queries, in fp32 or wider."""
    if attn.norm_cross is not None:
        context = attn.norm_encoder_hidden_states(context)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    q = attn.to_q(hidden).to(dtype)
    k = attn.to_k(context).to(dtype)
    rows, heads = q.shape[0], attn.heads
    q = q.view(rows, q.shape[1], heads, -1).transpose(1, 2)  # [R, H, Lq, d]
    k = k.view(rows, k.shape[1], heads, -1).transpose(1, 2)  # [R, H, L, d]
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    return probs.mean(dim=(1, 2))


class AttentionEntropyDetector(Detector):
    """Entropy of one cross-attention layer's token distribution at the first step."""

    name = "attention-entropy"
    settings_type = AttentionEntropySettings
    eager_only = "it reads a cross-attention layer of the eager UNet through a hook"

    def __init__(self, scanner, settings: AttentionEntropySettings | None = None):
        super().__init__(scanner, settings)
        from diffusers import UNet2DConditionModel

        unet = self.family.denoiser
        if not isinstance(unet, UNet2DConditionModel):
            raise MemscanError(
                f"attention-entropy reads a UNet2DConditionModel's cross-attention; the {self.family.name} family's "
                f"denoiser is a {type(unet).__name__}"
            )
        self.layer = self.settings.layer or default_layer(unet)
        try:
            self.attention = unet.get_submodule(self.layer)
        except AttributeError:
            raise MemscanError(f"the UNet has no module {self.layer!r}") from None
        if not getattr(self.attention, "is_cross_attention", False):
            raise MemscanError(f"{self.layer} is not a cross-attention layer")
        # The hook needs the eager module that the engine runs.
        self.engine = scanner.autograd_engine()
        self.trajectory = self.family.schedule(self.settings.num_inference_steps)
        self.x = self.trajectory.initial(self.latents(self.settings.generations))

    def forwards_per_prompt(self) -> int:
        """One conditional forward per generation (stopped after the layer)."""
        return self.settings.generations

    def score(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> np.ndarray:
        """The entropy of the layer's head- and query-averaged token distribution, per prompt."""
        return self.entropy(self.distribution(prompts, tokens))

    def distribution(self, prompts: Sequence[str], tokens: TokenizedPrompts | None = None) -> torch.Tensor:
        """`[B, n, L]`: the layer's averaged token distribution for each prompt and generation (`tokens` as for `score`)."""
        n, b = self.settings.generations, len(prompts)
        owner = threading.get_ident()
        recorded: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            # The UNet may be shared with another thread (the service): only this call stops.
            if threading.get_ident() != owner:
                return None
            recorded.append(token_distribution(module, args[0], kwargs["encoder_hidden_states"]))
            raise _Recorded

        with torch.no_grad():
            cond = cond_repeat(self.encode(prompts, tokens), n)
            x = self.trajectory.model_input(prompt_rows(self.x, b), 0)
            handle = self.attention.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                self.engine.predict(x, self.trajectory.timesteps[0], cond)
            except _Recorded:
                pass
            finally:
                handle.remove()
        if not recorded:
            raise MemscanError(f"the forward did not reach {self.layer}")
        return recorded[0].view(b, n, -1)

    @staticmethod
    def entropy(p: torch.Tensor) -> np.ndarray:
        """`-sum_j p_j ln p_j` over the last axis, averaged over generations -> `[B]`."""
        return (-torch.special.xlogy(p, p).sum(dim=-1)).mean(dim=1).double().cpu().numpy()
