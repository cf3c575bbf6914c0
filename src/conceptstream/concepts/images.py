"""Collecting a concept's image paths and loading them safely as RGB (any common mode; bad files named).

Non-image files in a folder (any suffix not in ``IMAGE_SUFFIXES``) are skipped with a warning
(documented behaviour; hidden files and subfolders are ignored); a file with an image suffix that cannot be decoded
(truncated, corrupt, not really an image) is an error naming the file, since silently training on
fewer photos than the user gave would be worse. Every readable image is converted to 8-bit RGB:
grayscale, palette, alpha (composited on white), 16-bit and float images, CMYK/LAB/HSV and EXIF
rotations; images larger than ``MAX_PIXELS`` are refused as possible decompression bombs.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from conceptstream.concepts.folder import IMAGE_SUFFIXES
from conceptstream.errors import UserInputError

MAX_PIXELS = 8192 * 8192  # refuse decompression bombs beyond this
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit scaled, palettes expanded.

    Raises :class:`UserInputError` (never another exception) for an image that cannot be converted.
    """
    try:
        return _to_rgb(img)
    except (ValueError, OSError, SyntaxError, TypeError, KeyError, IndexError, struct.error) as exc:
        raise UserInputError(f"cannot convert a {img.mode} image to RGB ({type(exc).__name__}: {exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.width < 1 or img.height < 1:
        raise ValueError(f"the image is empty ({img.width}x{img.height} pixels)")
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray((arr / hi * 255).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: Path, size: int | None = None) -> Image.Image:
    """Open one image as RGB (optionally resized: shorter side to ``size``, centre crop)."""
    if size is not None and (not isinstance(size, int) or size < 1):
        raise UserInputError(f"image size must be a positive integer, got {size!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height}")
                if size is not None:
                    im.draft("RGB", (size * 2, size * 2))  # fast JPEG downscale for very large photos
                im.load()
                img = _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserInputError(f"{path} is too large ({MAX_PIXELS} pixels at most); downscale it") from None
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError,
            struct.error, ZeroDivisionError, MemoryError) as exc:
        raise UserInputError(f"{path} is not a readable image ({type(exc).__name__}: {exc}); "
                             "remove or replace it") from None
    if size is not None:
        img = ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    return img


def collect_image_paths(source: str | Path) -> list[Path]:
    """Image files of a folder (or a concept folder's train/), non-images skipped with a warning."""
    src = Path(source)
    if not src.exists():
        raise UserInputError(f"image folder {src} does not exist")
    if src.is_file():
        return [src]
    if (src / "concept.json").is_file() and (src / "train").is_dir():
        src = src / "train"
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if skipped:
        warnings.warn(f"skipping {len(skipped)} non-image file(s) in {src}: {', '.join(skipped[:5])}", stacklevel=2)
    if not images:
        raise UserInputError(f"no images found in {src} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def load_images(source: str | Path | list[Path], size: int) -> list[Image.Image]:
    """Load a folder's images (or the given paths) as ``size x size`` RGB images."""
    paths = source if isinstance(source, list) else collect_image_paths(source)
    return [load_image(p, size) for p in paths]
