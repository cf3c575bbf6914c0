"""Reading a user's concept images safely: any common mode converted to RGB, bad files named.

Non-image files in a folder are skipped with a warning (documented behaviour); an image that
cannot be decoded is an error naming the file, since silently training on fewer photos than the
user gave would be worse.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from conceptstream.errors import UserInputError
from conceptstream.world.folders import IMAGE_SUFFIXES

MAX_PIXELS = 8192 * 8192  # refuse decompression bombs beyond this
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit scaled, palettes expanded."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / hi * 255).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: Path, size: int | None = None) -> Image.Image:
    """Open one image as RGB (optionally resized: shorter side to ``size``, centre crop)."""
    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft("RGB", (size * 2, size * 2))  # fast JPEG downscale for very large photos
            im.load()
            img = to_rgb(im)
    except Image.DecompressionBombError:
        raise UserInputError(f"{path} is too large ({MAX_PIXELS} pixels at most); downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
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
    paths = source if isinstance(source, list) else collect_image_paths(source)
    return [load_image(p, size) for p in paths]
