"""Images in and out: decoding with its limits, ImageNet statistics, contact sheets.

Everything that turns untrusted bytes into pixels goes through here: the style jobs, the dataset
decoder and every Serve route, so one set of checks (size from the header, decompression bombs,
truncated files) guards them all.
"""
from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

from jobs.cli import UserError

# torchvision's ImageNet statistics: what VGG-19 and the ImageNet-pretrained classifiers expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 40_000_000  # default limit of load_image: a 40 MP photo decodes to 120 MB of RGB


class ImageInputError(UserError):
    """An input image that cannot be used (missing, not an image, empty, too many pixels).

    A `UserError`, so the CLI prints one line; an HTTP front end answers it with a 4xx.
    """


def load_image(source, max_pixels: int = MAX_PIXELS, name: str = "image") -> Image.Image:
    """Open a path, bytes or PIL image as RGB, refusing bad input before decoding it.

    The pixel count is read from the header, so a decompression bomb (a small file that
    decodes to gigapixels) is refused without allocating its pixels.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            fp, label = io.BytesIO(bytes(source)), name
        else:
            path = os.fspath(source)
            if not os.path.isfile(path):
                raise ImageInputError(f"{name} not found: {path}")
            fp, label = path, f"{name} {path}"
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError:
            raise ImageInputError(f"{label} has too many pixels (decompression bomb?)") from None
        except (Image.UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageInputError(f"{label} is not a readable image ({type(e).__name__})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{name} has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageInputError(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    try:
        return img.convert("RGB")  # decodes; a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{name} cannot be decoded ({type(e).__name__}: {e})") from None


def decode_pixels(raw: bytes, name: str, image_size: int | None = None, fit: str = "stretch") -> np.ndarray:
    """A dataset image's bytes -> (H, W, 3) uint8, optionally made image_size x image_size.

    fit="stretch" resizes both sides (bilinear); fit="center" resizes the shorter side and
    centre-crops, with the same ops as `Preset.eval_transform`'s first steps, so cached pixels
    are served pixels. A file that does not decode is a `UserError` naming it.
    """
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            if image_size and fit == "center":
                from torchvision.transforms import v2

                x = v2.CenterCrop(image_size)(v2.Resize(image_size, antialias=True)(v2.ToImage()(im)))
                return x.permute(1, 2, 0).numpy()
            if image_size:
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"cannot decode image {name}: {e}") from None


def contact_sheet(tiles: Sequence[Image.Image | None], cols: int, cell: int = 160,
                  captions: Sequence[tuple[str, str]] | None = None,
                  marked: Sequence[bool] | None = None) -> Image.Image:
    """A white sheet of `tiles` laid out row by row in `cols` columns, each scaled (up or down: tiny
    test images stay visible) to fit a `cell` x `cell` square and centred in it; None leaves a
    cell blank. With `captions`, two lines of text under each tile; a `marked` tile gets a red
    frame and a red second line (e.g. a sweep's Pareto front)."""
    from PIL import ImageDraw, ImageFont

    text_h, pad = (30, 4) if captions else (0, 0)
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for n, img in enumerate(tiles):
        x, y = (n % cols) * cell, (n // cols) * (cell + text_h)
        mark = bool(marked and marked[n])
        if img is not None:
            scale = (cell - 2 * pad) / max(img.width, img.height)
            thumb = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if mark:
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline="red", width=3)
        if captions:
            draw.text((x + pad, y + cell), captions[n][0], fill="black", font=font)
            draw.text((x + pad, y + cell + 14), captions[n][1], fill="red" if mark else "black", font=font)
    return sheet
