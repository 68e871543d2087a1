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
# the formats load_image decodes by default: what people send. Pillow knows many more (EPS runs
# Ghostscript, others have had decoder bugs); each one refused is code an upload cannot reach.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class ImageInputError(UserError):
    """An input image that cannot be used (missing, not an image, empty, too many pixels).

    A `UserError`, so the CLI prints one line; an HTTP front end answers it with `status`.
    """

    status = 422


class UnsupportedImageFormat(ImageInputError):
    """An image in a format Pillow knows but `load_image` was not asked to decode (415 over HTTP)."""

    status = 415


def load_image(source, max_pixels: int = MAX_PIXELS, name: str = "image",
               formats: Sequence[str] | None = IMAGE_FORMATS) -> Image.Image:
    """Open a path, bytes or PIL image as RGB, refusing bad input before decoding it.

    The pixel count is read from the header, so a decompression bomb (a small file that
    decodes to gigapixels) is refused without allocating its pixels. Only `formats` (Pillow's
    names; None: any) are opened: another format Pillow recognises is `UnsupportedImageFormat`.
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
            img = Image.open(fp, formats=list(formats) if formats is not None else None)
        except Image.DecompressionBombError:
            raise ImageInputError(f"{label} has too many pixels (decompression bomb?)") from None
        except Image.UnidentifiedImageError:
            other = _known_format(fp) if formats is not None else None
            if other is not None and other not in formats:
                raise UnsupportedImageFormat(f"{label} is {other}; accepted formats: {', '.join(formats)}") from None
            raise ImageInputError(f"{label} is not a readable image (UnidentifiedImageError)") from None
        except (OSError, ValueError) as e:
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


def _known_format(fp) -> str | None:
    """The Pillow format whose signature check accepts the file's first bytes, or None. Only the
    plugins' `accept` functions run (a look at the magic bytes), never a decoder."""
    if isinstance(fp, str):
        with open(fp, "rb") as f:
            prefix = f.read(16)
    else:
        fp.seek(0)
        prefix = fp.read(16)
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's check that cannot judge 16 bytes says nothing
            continue
    return None


def decode_pixels(raw: bytes, name: str, image_size: int | None = None, fit: str = "stretch") -> np.ndarray:
    """A dataset image's bytes -> (H, W, 3) uint8, optionally made image_size x image_size.

    fit="stretch" resizes both sides (bilinear); fit="center" resizes the shorter side and
    centre-crops, with the same ops as `Preset.eval_transform`'s first steps, so cached pixels
    are served pixels. A file that does not decode is a `UserError` naming it.
    """
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            if image_size and im.size == (image_size, image_size):
                return np.asarray(im, dtype=np.uint8)  # either fit is the identity here: skip its cost
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
