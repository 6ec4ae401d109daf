"""fastdino.data: DINO multi-crop batches from an image folder, on the GPU with DALI.

    from fastdino.data import build_multicrop_loader

    loader = build_multicrop_loader("/data/imagenet/train", batch_size=64, n_local_crops=10,
                                    device="cuda", dtype=torch.bfloat16,
                                    shard_id=rank, num_shards=world_size, seed=0)
    for epoch in range(epochs):
        for crops in loader:  # 2 global (B, 3, 224, 224) + 10 local (B, 3, 96, 96) crops
            ...
        checkpoint["data"] = loader.state_dict()  # resume: loader.load_state_dict(...)

Backends: DALI (GPU "mixed" decoding, or DALI's CPU operators without a GPU) and a
torchvision/PIL fallback; both apply the augmentation draws of ``recipe.py``, so a batch depends
only on (seed, epoch, shard, step). DALI, PIL and torchvision are imported on first use.
"""

from .image_files import DataLoadingError, ImageFolderError, ImageIndex, check_image_file, list_image_files, scan_images
from .loader import (
    DATA_BACKEND_ENV_VAR,
    DATA_BACKENDS,
    BatchPlan,
    MultiCropLoader,
    build_multicrop_loader,
    dali_available,
    resolve_data_backend,
)
from .masking import BlockMaskGenerator, IBOTMaskRecipe, IBOTMasks, sample_ibot_masks
from .recipe import CropParameters, MultiCropRecipe, random_resized_crop_boxes, sample_crop_parameters
from .synthetic import write_sample_photo_folder, write_synthetic_image_folder

__all__ = [
    "BatchPlan",
    "BlockMaskGenerator",
    "IBOTMaskRecipe",
    "IBOTMasks",
    "CropParameters",
    "DATA_BACKENDS",
    "DATA_BACKEND_ENV_VAR",
    "DataLoadingError",
    "ImageFolderError",
    "ImageIndex",
    "MultiCropLoader",
    "MultiCropRecipe",
    "build_multicrop_loader",
    "check_image_file",
    "dali_available",
    "list_image_files",
    "random_resized_crop_boxes",
    "resolve_data_backend",
    "sample_crop_parameters",
    "sample_ibot_masks",
    "scan_images",
    "write_sample_photo_folder",
    "write_synthetic_image_folder",
]
