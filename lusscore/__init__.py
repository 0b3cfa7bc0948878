"""lusscore: large-scale unsupervised semantic segmentation (PASS) on a C++/CUDA core."""
__version__ = "0.1.0"

from lusscore.utils import LusscoreError  # noqa: E402,F401


def build_info() -> dict:
    """What this installation was built with and whether a GPU is usable now."""
    from lusscore._build import build_info as _build_info
    return _build_info()
