"""A frozen ViT from timm as HP's backbone, with weights from a DINO checkpoint file the user
supplies (nothing is downloaded).

ViTBackbone(x) gives the last block's normalised patch tokens as a (B, C, H/p, W/p) map (the
image padded up to a multiple of the patch size); `with_attention(x)` also gives the last
block's patch-to-patch attention, averaged over the heads, (B, hw, hw): what HP's local hidden
positives are mixed by.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lusscore.utils import LusscoreError

# DINO's checkpoints: the backbone alone (its released files), or a training checkpoint whose
# "teacher" (or "student") holds it behind DDP's and the multi-crop wrapper's prefixes.
_WRAPPERS = ("teacher", "student", "model", "state_dict")
_PREFIXES = ("module.", "backbone.")


def dino_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ViT weights of a DINO checkpoint file, in timm's names (the DINO head dropped)."""
    path = Path(path)
    if not path.is_file():
        raise LusscoreError(f"hp.vit.weights: {path} not found (a DINO ViT checkpoint file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LusscoreError(f"{path}: not a state dict of tensors (nor one under {', '.join(_WRAPPERS)})")
    out = {}
    for name, value in state.items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if not name.startswith("head."):
            out[name] = value
    return out


class ViTBackbone(nn.Module):
    def __init__(self, arch: str, weights: str | Path | None, **kwargs):
        super().__init__()
        try:
            import timm
        except ImportError as exc:  # a dependency of the package; a trimmed environment may lack it
            raise LusscoreError("hp.backbone vit needs timm: pip install timm") from exc
        try:
            self.vit = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                         dynamic_img_pad=True, **kwargs)
        except RuntimeError as exc:
            raise LusscoreError(f"hp.vit.arch: timm has no model {arch!r} ({exc})") from exc
        if weights is None:
            raise LusscoreError("hp.backbone vit needs hp.vit.weights: a DINO checkpoint file "
                                "(nothing is downloaded)")
        state = dino_state_dict(weights)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LusscoreError(f"{weights} does not fit timm's {arch}: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        self.out_channels = self.vit.embed_dim
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self._attention: torch.Tensor | None = None

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        return -(-x.shape[2] // p), -(-x.shape[3] // p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self._grid(x)
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, C, h, w), the last block's patch-to-patch attention (B, hw, hw))."""
        block = self.vit.blocks[-1]
        handle = block.norm1.register_forward_hook(self._keep_attention)
        try:
            features = self(x)
        finally:
            handle.remove()
        attention, self._attention = self._attention, None
        return features, attention

    def _keep_attention(self, module, inputs, normed: torch.Tensor) -> None:
        attn = self.vit.blocks[-1].attn
        b, n, c = normed.shape
        qkv = attn.qkv(normed).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1).mean(1)
        skip = self.vit.num_prefix_tokens
        self._attention = weights[:, skip:, skip:]
