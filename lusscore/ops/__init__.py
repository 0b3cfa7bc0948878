"""The custom ops (torch.ops.lusscore.*) with their fake kernels and autograd."""
from lusscore._build import load_extension

load_extension()

from lusscore.ops.label_codec import rgb_to_label  # noqa: E402,F401
from lusscore.ops.overlap_gather import overlap_gather  # noqa: E402,F401
from lusscore.ops.kmeans import kmeans_assign, kmeans_update  # noqa: E402,F401
from lusscore.ops.attention_pool import attention_pool  # noqa: E402,F401
from lusscore.ops.hp_loss import hp_contrastive_loss  # noqa: E402,F401
from lusscore.ops.munkres import munkres_assign  # noqa: E402,F401
from lusscore.ops.photometric import photometric_augment  # noqa: E402,F401
from lusscore.ops.seg_metrics import seg_metrics_update_  # noqa: E402,F401
from lusscore.ops.switch import (apply_ops_config, ops_from_config, ops_mode,  # noqa: E402,F401
                                 reference_enabled, set_ops_mode, use_reference)
