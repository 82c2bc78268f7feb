"""Data: image files and class folders (folders), reading images (images), preprocessing (transforms), reproducible
order (samplers), batched in-memory augmentation (augment), the train/val loaders (loaders) and the train/val/test
split of a raw folder (split). The names most callers need are importable from ``utils.data`` directly.

Those names load their sub-module on first use (PEP 562 ``__getattr__``), not when the package is imported: the
split (split_dataset.py) needs no torch, and importing torch would cost it seconds of start-up."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "augment": ("AUGMENT_KEYS", "AugmentConfig", "augment_batch"),
    "folders": ("IMAGE_EXTENSIONS", "SkippedFiles", "class_folders", "describe_error", "images_under", "is_image_file",
                "list_labelled_images", "report_unreadable", "scan_class_folders", "unreadable_line", "walk_tree"),
    "images": ("ImageFiles", "ImageFolderRGB", "collate_readable", "decode_rgb", "load_image_folder", "load_pil_rgb",
               "single_thread", "to_rgb", "worker_ignores_ctrl_c"),
    "loaders": ("DataBundle", "MemoryTrainLoader", "MemoryValLoader", "SkippingLoader", "load_data", "load_split"),
    "samplers": ("EpochBatchSampler", "sample_seeds"),
    "transforms": ("IMAGENET_MEAN", "IMAGENET_STD", "build_eval_transform", "build_train_transform"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'utils.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"utils.data.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
