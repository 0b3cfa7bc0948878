"""Models: backbones, heads and pixel attention."""
from lusscore.models.pixel_attention import PixelAttention  # noqa: F401
