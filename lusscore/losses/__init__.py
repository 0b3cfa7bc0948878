"""Losses of PASS: SwAV, P2P and D2S."""
from lusscore.losses.p2p import P2PLoss, p2p_cosine_loss, pixel_mlp  # noqa: F401
