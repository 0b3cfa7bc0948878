"""Data layer: ImageNet-S layout, label PNG codec, synthetic dataset."""
from lusscore.data.imagenet_s import (  # noqa: F401
    ImageNetS, ImageSample, SegmentationSample, benchmark_categories, benchmark_names, read_categories,
    read_names, write_categories, write_names, load_segmentation_pair, check_same_size,
)
from lusscore.data.label_io import (  # noqa: F401
    IGNORE_INDEX, OTHER_INDEX, decode_label_rgb, encode_label_rgb, read_label_png,
    write_label_png, read_image, image_size,
)
from lusscore.data.views import (  # noqa: F401
    MultiCropBatch, MultiCropSample, MultiCropTransform, collate_multicrop,
)
