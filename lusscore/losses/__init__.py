"""Losses of PASS: SwAV, P2P and D2S."""
