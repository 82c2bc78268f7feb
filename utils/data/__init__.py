"""Data: image files and class folders (images), preprocessing (transforms), reproducible order (samplers),
batched in-memory augmentation (augment), the train/val loaders (loaders) and the train/val/test split of a
raw folder (split). The names most callers need are importable from ``utils.data`` directly."""
from utils.data.augment import AUGMENT_KEYS, AugmentConfig, augment_batch
from utils.data.images import (
                               IMAGE_EXTENSIONS,
                               ImageFiles,
                               ImageFolderRGB,
                               SkippedFiles,
                               class_folders,
                               collate_readable,
                               decode_rgb,
                               describe_error,
                               images_under,
                               is_image_file,
                               list_labelled_images,
                               load_image_folder,
                               load_pil_rgb,
                               report_unreadable,
                               scan_class_folders,
                               single_thread,
                               to_rgb,
                               unreadable_line,
                               worker_ignores_ctrl_c,
)
from utils.data.loaders import DataBundle, MemoryTrainLoader, MemoryValLoader, SkippingLoader, load_data, load_split
from utils.data.samplers import EpochBatchSampler, sample_seeds
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform

__all__ = [
    "AUGMENT_KEYS", "AugmentConfig", "augment_batch", "IMAGE_EXTENSIONS", "ImageFiles", "ImageFolderRGB",
    "SkippedFiles", "class_folders", "collate_readable", "decode_rgb", "describe_error", "images_under",
    "is_image_file", "list_labelled_images", "load_image_folder", "load_pil_rgb", "report_unreadable",
    "scan_class_folders", "single_thread", "to_rgb", "unreadable_line", "worker_ignores_ctrl_c", "DataBundle", "MemoryTrainLoader",
    "MemoryValLoader", "SkippingLoader", "load_data", "load_split", "EpochBatchSampler", "sample_seeds",
    "IMAGENET_MEAN", "IMAGENET_STD", "build_eval_transform", "build_train_transform",
]
