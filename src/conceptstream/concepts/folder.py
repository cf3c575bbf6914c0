"""The concept folder format: how every command (and every user with their own photos) passes concepts.

    DIR/sequence.json            {"concepts": ["name1", "name2", ...]}   (ordered)
    DIR/<name>/concept.json      {"token": "<name>", "noun": "teddy bear"}
    DIR/<name>/train/*.png       training views
    DIR/<name>/val/*.png         held-out validation views (optional): for tuning and sweeps
    DIR/<name>/eval/*.png        held-out test views (optional for users): for published numbers

The three splits are disjoint views of the same concept. ``eval/`` is the test split (the folder
keeps its name, so folders written before validation views existed stay valid); a folder without
``val/`` simply has no validation views. A single concept folder (``concept.json`` + ``train/``) is
also accepted wherever one concept is expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from conceptstream.errors import UserInputError

# The held-out splits: name -> the folder that holds its views ("test" keeps the historical eval/).
HELDOUT_SPLITS = {"val": "val", "test": "eval"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TOKEN_RE = re.compile(r"^<[A-Za-z0-9][A-Za-z0-9_\-.]*>$")


@dataclass(frozen=True)
class ConceptFolder:
    """One concept on disk."""

    name: str
    token: str
    noun: str
    path: Path

    @property
    def train_dir(self) -> Path:
        return self.path / "train"

    @property
    def val_dir(self) -> Path:
        """Validation views (the ``val`` split)."""
        return self.path / "val"

    @property
    def eval_dir(self) -> Path:
        """Test views (the ``test`` split; the folder is named ``eval/``)."""
        return self.path / "eval"

    def heldout_dir(self, split: str) -> Path:
        """The folder of a held-out split: ``val/`` for ``"val"``, ``eval/`` for ``"test"``."""
        return self.path / _split_folder(split)

    def train_images(self) -> list[Path]:
        return list_images(self.train_dir)

    def val_images(self) -> list[Path]:
        """Validation views; empty when the folder has no ``val/``."""
        return self.heldout_images("val")

    def eval_images(self) -> list[Path]:
        """Test views; empty when the folder has no ``eval/``."""
        return self.heldout_images("test")

    def heldout_images(self, split: str) -> list[Path]:
        """The held-out views of ``split`` (``"val"`` or ``"test"``); empty when its folder is absent."""
        folder = self.heldout_dir(split)
        return list_images(folder) if folder.is_dir() else []


def _split_folder(split: str) -> str:
    if split not in HELDOUT_SPLITS:
        raise ValueError(f"split must be one of {', '.join(HELDOUT_SPLITS)}, got {split!r}")
    return HELDOUT_SPLITS[split]


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder, sorted by name (non-image files are ignored)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_user_json(path: Path, hint: str = ""):
    """Parse a JSON file the user provides; invalid JSON is a one-line UserInputError."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is not valid JSON ({exc}){hint}") from None


def validate_token(token: str) -> str:
    """Modifier tokens look like ``<my-dog>``: angle brackets, no spaces."""
    if not isinstance(token, str) or not TOKEN_RE.match(token):
        raise UserInputError(
            f"invalid token {token!r}: use angle brackets and no spaces, e.g. '<my-dog>' "
            "(letters, digits, '-', '_', '.')"
        )
    return token


def write_concept(folder: Path, token: str, noun: str) -> Path:
    """Create ``folder`` with its ``concept.json`` and empty ``train/``, ``val/`` and ``eval/`` (images
    are written by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("train", *HELDOUT_SPLITS.values()):
        (folder / sub).mkdir(exist_ok=True)
    (folder / "concept.json").write_text(json.dumps({"token": validate_token(token), "noun": noun}, indent=2) + "\n")
    return folder


def read_concept(folder: str | Path) -> ConceptFolder:
    """Read one concept folder, with one-line errors for each way it can be malformed."""
    folder = Path(folder)
    meta_path = folder / "concept.json"
    if not meta_path.is_file():
        raise UserInputError(f"{folder} is not a concept folder: it has no concept.json (expected "
                             '{"token": "<name>", "noun": "class noun"} beside a train/ folder)')
    meta = read_user_json(meta_path, "; fix or rewrite it")
    if not isinstance(meta, dict) or not isinstance(meta.get("token"), str) or not isinstance(meta.get("noun"), str):
        raise UserInputError(f'{meta_path} must be an object with string fields "token" and "noun"')
    token = validate_token(meta["token"])
    noun = meta["noun"].strip()
    if not noun:
        raise UserInputError(f'{meta_path}: "noun" is empty; give the class noun, e.g. "teddy bear"')
    if not (folder / "train").is_dir():
        raise UserInputError(f"{folder} has no train/ folder with the concept's images")
    return ConceptFolder(name=folder.name, token=token, noun=noun, path=folder)


def write_sequence(root: Path, names: list[str]) -> Path:
    """Write ``root/sequence.json`` listing the concept folders in learning order."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sequence.json"
    path.write_text(json.dumps({"concepts": list(names)}, indent=2) + "\n")
    return path


def read_sequence(root: str | Path) -> list[ConceptFolder]:
    """Read a sequence folder: ``sequence.json`` plus one concept folder per listed name."""
    root = Path(root)
    seq_path = root / "sequence.json"
    if not seq_path.is_file():
        raise UserInputError(f"{root} is not a sequence folder: it has no sequence.json "
                             '(expected {"concepts": ["name1", ...]})')
    data = read_user_json(seq_path)
    names = data.get("concepts") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserInputError(f'{seq_path} must hold {{"concepts": [...]}} with at least one concept name')
    concepts = [read_concept(root / n) for n in names]
    tokens = [c.token for c in concepts]
    if len(set(tokens)) != len(tokens):
        raise UserInputError(f"{seq_path}: two concepts share a token; each concept needs its own token")
    return concepts
