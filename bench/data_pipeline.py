"""Data pipeline throughput on real CIFAR-10: ours (uint8 tensors + batched flip/crop) vs the reference.

Reference = what the recipe does: torchvision PIL transforms (RandomHorizontalFlip +
RandomResizedCrop + ToTensor) through `DataLoader(num_workers=0)`, batch 256. Measured on two
reference datasets: the images held in memory as arrays (torchvision's CIFAR10 class: one
`Image.fromarray` per item) and an ImageFolder over the extracted JPEGs (decoded every epoch).
Ours = `jobs.data` (decoded once into a uint8 tensor, cached) + `jobs.transforms` on the batch.

    python bench/data_pipeline.py --zip ../shared/data/cifar10-jpeg.zip --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.transforms import AugmentSpec, compose  # noqa: E402
from jobs.data import iterate_batches, load_image_data, shard_indices  # noqa: E402

BATCH = 256


def ours(x, y, n_images, seed):
    aug = compose(["flip", "crop"], AugmentSpec())
    g = torch.Generator().manual_seed(seed)
    idx = shard_indices(len(x), 0, 1, epoch=seed, seed=0)[:n_images]
    t0 = time.perf_counter()
    for images, labels in iterate_batches(x, y, idx, BATCH, torch.device("cpu")):
        out = aug(images.float().div_(255), g)
    return n_images / (time.perf_counter() - t0), out.shape


def reference(dataset, n_images):
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, torch.randperm(len(dataset))[:n_images].tolist()), batch_size=BATCH,
                        shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    for images, labels in loader:
        out = images
    return n_images / (time.perf_counter() - t0), out.shape


class ArrayDataset(torch.utils.data.Dataset):
    """torchvision CIFAR10's __getitem__: PIL image from an in-memory array, then the transform."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zip", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10 ImageFolder zip")
    p.add_argument("--images", type=int, default=10240, help="images per measurement")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (the median is reported)")
    p.add_argument("--data-root", default="data", help="decoded-tensor cache")
    args = p.parse_args()
    torch.set_num_threads(1)  # one core each: a DataLoader(num_workers=0) is one process
    import torchvision
    from torchvision import transforms as T

    t0 = time.perf_counter()
    data = load_image_data(args.zip, args.data_root)
    decode_s = time.perf_counter() - t0
    tf = T.Compose([T.RandomHorizontalFlip(), T.RandomResizedCrop(32, scale=(0.1, 1.0), ratio=(0.5, 2.0)), T.ToTensor()])
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.zip) as zf:
            zf.extractall(tmp)
        root = next(p for p in Path(tmp).rglob("train") if p.is_dir())
        folder = torchvision.datasets.ImageFolder(str(root), transform=tf)
        arrays = ArrayDataset(data.train_x, data.train_y, tf)
        rows = {"ours": [], "reference_in_memory": [], "reference_jpeg_folder": []}
        for r in range(args.repeats):
            rows["ours"].append(ours(data.train_x, data.train_y, args.images, r)[0])
            rows["reference_in_memory"].append(reference(arrays, args.images)[0])
            rows["reference_jpeg_folder"].append(reference(folder, args.images)[0])
    med = {k: statistics.median(v) for k, v in rows.items()}
    report = {"images_per_measurement": args.images, "repeats": args.repeats, "threads": 1,
              "median_images_per_s": med, "all_images_per_s": rows,
              "speedup_vs_in_memory": med["ours"] / med["reference_in_memory"],
              "speedup_vs_jpeg_folder": med["ours"] / med["reference_jpeg_folder"],
              "one_time_decode_s": decode_s}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
