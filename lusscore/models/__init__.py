"""Models: backbones, heads and pixel attention."""
from lusscore.models.heads import D2SHead, ProjectionHead, SegmentationHead  # noqa: F401
from lusscore.models.resnet import ResNetTrunk  # noqa: F401
from lusscore.models.pixel_attention import PixelAttention  # noqa: F401
from lusscore.models.resnet import build_trunk  # noqa: F401
