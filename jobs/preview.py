"""Preview augmentations: apply them N times to one image and save the grid (reference: 2 x 4).

    python -m jobs.preview --image cat1.jpg --aug flip,color,crop --out grid.png
"""
from __future__ import annotations

import argparse

import torch

from jobs.cli import UserError, run_cli
from jobs.images import load_image
from jobs.transforms import AugmentSpec, compose, parse_aug_names


def load_image_tensor(path: str) -> torch.Tensor:
    """Read an image file as a float (3, H, W) tensor in [0, 1]; unreadable files are a UserError
    (`jobs.images.load_image`'s checks)."""
    from torchvision.transforms.functional import to_tensor

    return to_tensor(load_image(path))


def augment_grid(image: torch.Tensor, names: list[str], spec: AugmentSpec, rows: int = 2, cols: int = 4,
                 seed: int = 0) -> torch.Tensor:
    """(3, H, W) -> a (3, H', W') grid of rows*cols augmented copies, batched in one call."""
    import torchvision

    batch = image.unsqueeze(0).expand(rows * cols, -1, -1, -1).contiguous()
    out = compose(names, spec)(batch, torch.Generator().manual_seed(seed))
    return torchvision.utils.make_grid(out, nrow=cols, padding=4, pad_value=1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="input image file (e.g. ../shared/data/cat1.jpg)")
    p.add_argument("--aug", default="flip", help="augmentations, comma-separated: none, flip, vflip, crop, color (default flip)")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.add_argument("--rows", type=int, default=2, help="grid rows (default 2)")
    p.add_argument("--cols", type=int, default=4, help="grid columns (default 4)")
    p.add_argument("--crop-size", type=int, nargs=2, default=[200, 200], metavar=("H", "W"),
                   help="output size of the random resized crop (default 200 200, as the reference demo)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.1, 1.0], metavar=("MIN", "MAX"), help="crop area fraction range (default 0.1 1)")
    p.add_argument("--crop-ratio", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"), help="crop aspect ratio range (default 0.5 2)")
    p.add_argument("--jitter", type=float, nargs=4, default=[0.5, 0.5, 0.5, 0.5], metavar=("B", "C", "S", "H"),
                   help="colour jitter brightness, contrast, saturation, hue (default 0.5 each)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    names = parse_aug_names(args.aug)
    if args.rows < 1 or args.cols < 1 or min(args.crop_size) < 1:
        raise UserError("--rows, --cols and --crop-size must be positive")
    if not 0 <= args.jitter[3] <= 0.5:
        raise UserError("hue jitter must be in [0, 0.5]")
    image = load_image_tensor(args.image)
    spec = AugmentSpec(crop_scale=tuple(args.crop_scale), crop_ratio=tuple(args.crop_ratio),
                       crop_size=tuple(args.crop_size), jitter=tuple(args.jitter))
    if "crop" not in names:  # without a crop every copy keeps the input size
        spec.crop_size = None
    grid = augment_grid(image, names, spec, args.rows, args.cols, args.seed)
    import torchvision
    try:
        torchvision.utils.save_image(grid, args.out)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write {args.out}: {e}") from None
    print(f"wrote {args.out} ({args.rows}x{args.cols} samples of {args.aug})")
    return 0


if __name__ == "__main__":
    run_cli(main)
