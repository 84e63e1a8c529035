"""Image files -> what a model saw in training: 28x28, grayscale, a light item on a dark background.

A 28x28 grayscale image like the dataset's is used as it is; any other is converted (grayscale, inverted when its border is light,
padded to a square with its background, resized, contrast stretched). Images are
read with PIL from the header first, so a file that is not an image, is empty, or
claims more than MAX_PIXELS pixels is refused before anything is decoded.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from fmnist import FmnistError
from fmnist.data import IMAGE_SIZE as SIZE

MAX_PIXELS = 50_000_000  # about 7000 x 7000; larger images are refused before decoding
TRIM = 13  # a pixel this much brighter or darker than the background is part of the item (5%)


class ImageError(FmnistError):
    """An input image cannot be used. The message names the file."""


def load_image(path: str | Path):
    """A 28x28 grayscale (mode "L") PIL image, light item on dark background."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own decompression-bomb guard, at our limit
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if w * h > MAX_PIXELS or w < 1 or h < 1:
                    raise ImageError(f"{path}: {w}x{h} pixels; images up to {MAX_PIXELS:,} pixels are accepted")
                im.draft("L", (SIZE * 4, SIZE * 4))  # JPEG: decode at a reduced scale, much faster
                im = ImageOps.exif_transpose(im)
                gray = _grayscale(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # raised by Image.open
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(n.group(1)):,} pixels" if n else "too many pixels"
        raise ImageError(f"{path}: {size}; images up to {MAX_PIXELS:,} pixels are accepted") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image (PIL cannot read it as PNG, JPEG or any other image format)") from e
    except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {str(e)[:200]})") from e
    return to_model_input(gray)


def _grayscale(im):
    """Grayscale; transparent pixels become white (the usual background of a cut-out photo)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits
        im = im.convert("I").point(lambda v: v * (1 / 256))
    return im.convert("L")


def _border_level(gray) -> int:
    """Median brightness of the outermost pixels: the image's background."""
    import statistics

    w, h = gray.size
    px = gray.load()
    border = [px[x, 0] for x in range(w)] + [px[x, h - 1] for x in range(w)]
    border += [px[0, y] for y in range(h)] + [px[w - 1, y] for y in range(h)]
    return int(statistics.median(border))


def to_model_input(gray):
    """Grayscale PIL image -> 28x28 light-on-dark, as in Fashion-MNIST."""
    from PIL import Image, ImageChops, ImageOps

    if _border_level(gray) > 127:  # light background: invert to a light item on dark
        gray = ImageOps.invert(gray)
    if gray.size == (SIZE, SIZE):
        return gray  # the dataset's format: keep its pixels exactly
    bg = _border_level(gray)
    # Trim to the item, as Fashion-MNIST did: its longest side then spans the 28 pixels.
    mask = ImageChops.difference(gray, Image.new("L", gray.size, bg)).point(lambda v: 255 if v > TRIM else 0)
    if box := mask.getbbox():
        gray = gray.crop(box)
    side = max(gray.size)
    square = Image.new("L", (side, side), bg)
    square.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
    small = square.resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return ImageOps.autocontrast(small)  # background to black, the brightest pixel to white


def to_tensor(images):
    """28x28 mode-"L" PIL images -> a (N, 28, 28) uint8 tensor, as the data set holds them."""
    import torch

    return torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(SIZE, SIZE)
                        for im in images])
