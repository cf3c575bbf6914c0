"""The concept folder format: how every command (and every user with their own photos) passes concepts.

    DIR/sequence.json            {"concepts": ["name1", "name2", ...]}   (ordered)
    DIR/<name>/concept.json      {"token": "<name>", "noun": "teddy bear"}
    DIR/<name>/train/*.png       training views
    DIR/<name>/eval/*.png        held-out evaluation views (optional for users)

A single concept folder (``concept.json`` + ``train/``) is also accepted wherever one concept is
expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from conceptstream.errors import UserInputError

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
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def train_images(self) -> list[Path]:
        return list_images(self.train_dir)

    def eval_images(self) -> list[Path]:
        return list_images(self.eval_dir) if self.eval_dir.is_dir() else []


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
    """Create ``folder`` with its ``concept.json`` (images are written by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train").mkdir(exist_ok=True)
    (folder / "eval").mkdir(exist_ok=True)
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
