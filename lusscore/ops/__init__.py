"""The custom ops (torch.ops.lusscore.*) with their fake kernels and autograd."""
from lusscore._build import load_extension

load_extension()

from lusscore.ops.label_codec import rgb_to_label  # noqa: E402,F401
from lusscore.ops.seg_metrics import munkres_assign, seg_metrics_update_  # noqa: E402,F401
