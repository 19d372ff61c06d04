"""Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179): the negative acts in attention space.

In every cross-attention layer, for the positive branch of images whose schedule applies the
negative at this step, the attention output with the prompt, Z+, and with the negative prompt, Z-
(same queries), are extrapolated, L1-normalised and blended before the output projection::

    Z~ = phi Z+ - (phi - 1) Z-                       (extrapolation away from the negative)
    r  = ||Z~||_1 / ||Z+||_1  per token;   Z^ = Z~ * min(r, tau) / r      (normalisation)
    Z  = alpha Z^ + (1 - alpha) Z+                   (blend)

The noise prediction is then plain CFG with the empty prompt on that modified positive branch:
``eps = eps_empty + s (eps_pos^NAG - eps_empty)``; no negative UNet branch is computed. Defaults
(phi 5, tau 2.5, alpha 0.25) are the authors' published ones. ``observe_negative``: also compute the
negative UNet branch on those steps, unused by the image, so attention recorders (the strength
ratio) see the negative prompt's own attention on NAG's trajectory.

Implementation: forward pre-hooks on each cross-attention module (``attn2``) and on its output
projection ``to_out[0]``, so NAG composes with any attention processor, including negstudy's
attention recorder (which then records the positive branch's own attention probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from negstudy.errors import ConfigError
from negstudy.guidance.base import GuideInput, Guidance, Guider


class NAG(Guider):
    name = "nag"

    def __init__(self, phi: float = 5.0, tau: float = 2.5, alpha: float = 0.25, observe_negative: bool = False):
        super().__init__()
        if phi < 1:
            raise ConfigError(f"guidance.phi={phi}: must be >= 1 (1: no extrapolation)")
        if tau <= 0 or not 0 <= alpha <= 1:
            raise ConfigError(f"guidance.tau={tau}, guidance.alpha={alpha}: need tau > 0 and 0 <= alpha <= 1")
        self.phi, self.tau, self.alpha = float(phi), float(tau), float(alpha)
        # compute the negative UNet branch where the negative acts, for recorders only (it never enters the image)
        self.observe_negative = bool(observe_negative)
        self._rows: torch.Tensor | None = None  # batch rows NAG acts on at this UNet call
        self._context: torch.Tensor | None = None  # their negative prompt embeddings (m, T, D)
        self._negative_out: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._unet = None

    def needs(self, negative: bool) -> set[str]:
        return {"empty", "negative"} if negative and self.observe_negative else {"empty"}

    def bind(self, sampler) -> None:
        if self._unet is sampler.unet:
            return
        self.remove()
        self._unet = sampler.unet
        for name, module in sampler.unet.named_modules():
            if name.endswith("attn2") and getattr(module, "is_cross_attention", False):
                self._handles.append(module.register_forward_pre_hook(self._attention_hook, with_kwargs=True))
                self._handles.append(module.to_out[0].register_forward_pre_hook(self._projection_hook(module)))
        if not self._handles:
            raise ValueError("NAG: the UNet has no cross-attention (attn2) layers")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._unet = [], None

    def before_unet(self, step, rows, negative, embeds) -> None:
        picked = [(j, lane) for j, (lane, branch) in enumerate(rows) if branch == "positive" and bool(negative[lane])]
        if picked:
            self._rows = torch.tensor([j for j, _ in picked], device=embeds["negative"].device)
            self._context = embeds["negative"][torch.tensor([lane for _, lane in picked], device=embeds["negative"].device)]
        else:
            self._rows = self._context = None

    def after_unet(self) -> None:
        self._rows = self._context = None
        self._negative_out = {}

    def _attention_hook(self, attn, args, kwargs):
        """Z- of the picked rows: the attention of their queries on the negative prompt (before to_out)."""
        if self._rows is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError("NAG expects transformer cross-attention on (batch, tokens, channels)")
        h = hidden[self._rows]
        context = self._context.to(h.dtype)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(h), attn.to_k(context), attn.to_v(context)
        m, heads = h.shape[0], attn.heads
        head_dim = k.shape[-1] // heads
        q, k, v = (t.view(m, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        z = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        self._negative_out[id(attn)] = z.transpose(1, 2).reshape(m, -1, heads * head_dim).to(h.dtype)
        return None

    def _projection_hook(self, attn):
        def hook(module, args):
            if self._rows is None:
                return None
            z = args[0]
            z_pos, z_neg = z[self._rows], self._negative_out.pop(id(attn))
            z = z.clone()
            z[self._rows] = self.combine(z_pos, z_neg)
            return (z,) + tuple(args[1:])

        return hook

    def combine(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        """The NAG rule on attention outputs (..., tokens, channels): extrapolate, normalise, blend."""
        z = self.phi * z_pos - (self.phi - 1) * z_neg
        ratio = z.norm(p=1, dim=-1, keepdim=True) / z_pos.norm(p=1, dim=-1, keepdim=True).clamp_min(1e-12)
        z = z * (ratio.clamp(max=self.tau) / ratio.clamp_min(1e-12))
        return self.alpha * z + (1 - self.alpha) * z_pos

    def guide(self, x: GuideInput) -> Guidance:
        empty = x.eps["empty"]
        pred = empty + x.scale * (x.eps["positive"] - empty)
        return Guidance(pred, empty, x.eps["positive"] - empty)

    def params(self) -> dict:
        return {"phi": self.phi, "tau": self.tau, "alpha": self.alpha}
