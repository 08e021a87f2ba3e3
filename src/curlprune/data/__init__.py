"""Images in memory or streamed: ImageFolder folders or zips and the sklearn digits, their transforms,
batches and top-1 evaluation, and the demo's digits model.

    data.py        datasets held in memory as uint8 (ImageDataset), subsets, batches, evaluation
    decode.py      image bytes to uint8 RGB, the one decoder
    streaming.py   folders/zips above a memory budget, decoded on the fly in DataLoader workers (StreamingDataset)
    transforms.py  image transforms for an InputSpec
    imagetree.py   the files of an ImageFolder folder or zip, directory symlinks followed, cycles refused
    digits.py      the demo model trained on scikit-learn digits
"""
from curlprune.data.data import (
    ImageDataset,
    batches,
    calibration_subset,
    class_balanced_subset,
    count_correct,
    evaluate,
    load_digits_dataset,
    load_image_folder,
    load_splits,
    model_outputs,
    split_names,
    to_input,
)
from curlprune.data.digits import train_digits_model
from curlprune.data.transforms import build_transform

__all__ = [
    "ImageDataset",
    "batches",
    "build_transform",
    "calibration_subset",
    "class_balanced_subset",
    "count_correct",
    "evaluate",
    "load_digits_dataset",
    "load_image_folder",
    "load_splits",
    "model_outputs",
    "split_names",
    "to_input",
    "train_digits_model",
]
