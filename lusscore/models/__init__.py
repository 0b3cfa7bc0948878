"""Models: backbones, heads and pixel attention."""
