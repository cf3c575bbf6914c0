"""What the tabletop world contains: base classes, colours, backgrounds, personal concepts, sequences.

Base classes train the bundled model. Personal concepts are specific instances of base classes
with a patterned texture that never appears in base training, so learning them is genuinely new.
Named sequences (:data:`SEQUENCES`): ``tabletop-3``, ``-6``, ``-10`` and ``-50`` are prefixes of the
50 concepts; ``tabletop-6b`` is an independent confirmation stream for what ``tabletop-6`` tunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conceptstream.errors import UserInputError


@dataclass(frozen=True)
class ObjectClass:
    """A base object class: a mesh (or URDF) from ``pybullet_data`` and its class noun."""

    key: str
    noun: str
    path: str
    urdf: bool = False
    # Euler angles (radians) that stand the mesh upright in a z-up world.
    upright: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # True when the asset carries its own texture; base renders then keep it most of the time.
    textured: bool = False


_HALF_PI = 1.5707963267948966

BASE_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("duck", "rubber duck", "duck.obj", upright=(_HALF_PI, 0.0, 0.0), textured=True),
    ObjectClass("teddy", "teddy bear", "teddy2_VHACD_CHs.obj", upright=(_HALF_PI, 0.0, 0.0)),
    ObjectClass("robot", "toy robot", "r2d2.urdf", urdf=True),
    ObjectClass("ball", "soccer ball", "soccerball.obj", textured=True),
    ObjectClass("lego", "lego brick", "lego/lego.obj", upright=(3.141592653589793, 0.0, 0.0)),
    ObjectClass("bunny", "bunny figurine", "bunny.obj", upright=(_HALF_PI, 0.0, 0.0)),
    ObjectClass("mug", "mug", "objects/mug.obj"),
    ObjectClass("donut", "donut", "torus/torus_textured.obj", upright=(_HALF_PI, 0.0, 0.0), textured=True),
    ObjectClass("car", "toy car", "racecar/racecar.urdf", urdf=True),
    ObjectClass("domino", "domino", "domino/domino.obj", upright=(_HALF_PI, 0.0, 0.0), textured=True),
)

CLASS_BY_KEY = {c.key: c for c in BASE_CLASSES}
CLASS_BY_NOUN = {c.noun: c for c in BASE_CLASSES}

# Colour words used in base captions, with the RGB tint they stand for.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
    "black": (0.12, 0.12, 0.12),
    "orange": (0.95, 0.50, 0.10),
    "purple": (0.55, 0.20, 0.70),
    "pink": (0.95, 0.55, 0.70),
    "brown": (0.50, 0.30, 0.15),
}

# Background name used in captions -> how it is drawn (see render.py).
BACKGROUNDS: tuple[str, ...] = ("grass", "gravel", "bricks", "a wooden table", "a white table", "a blue cloth")

# The patterns of personal concepts. Base training never draws a concept's look (its class, pattern and
# colour pair); by default it draws no pattern at all (see base_data.pattern_dataset for the option).
PATTERNS: tuple[str, ...] = ("stripes", "checks", "dots", "zigzag", "halves")
# How a caption names each pattern ("a photo of a red and white striped mug"): used only by the
# optional patterned base data (``base_data.pattern_dataset``), never for a concept's own look.
PATTERN_WORDS: dict[str, str] = {"stripes": "striped", "checks": "checkered", "dots": "polka-dot",
                                 "zigzag": "zigzag", "halves": "two-tone"}


@dataclass(frozen=True)
class Concept:
    """A personal concept: one instance of a base class with a distinctive look."""

    name: str
    class_key: str
    pattern: str
    colours: tuple[str, str]
    # Non-uniform stretch that makes the instance's shape its own.
    stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def token(self) -> str:
        return f"<{self.name}>"

    @property
    def noun(self) -> str:
        return CLASS_BY_KEY[self.class_key].noun

    @property
    def object_class(self) -> ObjectClass:
        return CLASS_BY_KEY[self.class_key]


_CONCEPT_COLOURS: tuple[tuple[str, str], ...] = (
    ("red", "white"),
    ("blue", "yellow"),
    ("black", "orange"),
    ("purple", "green"),
    ("pink", "blue"),
)
_STRETCHES: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),
    (1.25, 1.0, 0.85),
    (0.85, 0.85, 1.3),
    (1.0, 1.3, 0.9),
    (1.15, 1.15, 1.15),
)


def _build_concepts() -> tuple[Concept, ...]:
    """50 concepts: every class x 5 looks, ordered so that consecutive concepts differ in class."""
    concepts = []
    for look in range(5):
        for ci, cls in enumerate(BASE_CLASSES):
            pattern = PATTERNS[(ci + look) % len(PATTERNS)]
            colours = _CONCEPT_COLOURS[(ci * 2 + look) % len(_CONCEPT_COLOURS)]
            stretch = _STRETCHES[(ci + 2 * look) % len(_STRETCHES)]
            name = f"{colours[0]}-{colours[1]}-{pattern}-{cls.key}"
            concepts.append(Concept(name, cls.key, pattern, colours, stretch))
    return tuple(concepts)


CONCEPTS: tuple[Concept, ...] = _build_concepts()
CONCEPT_BY_NAME = {c.name: c for c in CONCEPTS}

# tabletop-3/6/10/50 are prefixes of CONCEPTS. tabletop-6b is the confirmation stream of tabletop-6
# (where settings are tuned): CONCEPTS[10:16], the second look of the same six classes in the same
# order. It shares no concept with tabletop-10 (nor with tabletop-6), and each of its concepts differs
# from its tabletop-6 counterpart in pattern, colours and stretch, while the stream keeps tabletop-6's
# design (classes, order, and one pair of concepts, duck and bunny, that share a pattern and colours),
# so a setting chosen on tabletop-6 meets new instances of a task of the same difficulty.
SEQUENCES: dict[str, tuple[str, ...]] = {
    "tabletop-3": tuple(c.name for c in CONCEPTS[:3]),
    "tabletop-6": tuple(c.name for c in CONCEPTS[:6]),
    "tabletop-6b": tuple(c.name for c in CONCEPTS[10:16]),
    "tabletop-10": tuple(c.name for c in CONCEPTS[:10]),
    "tabletop-50": tuple(c.name for c in CONCEPTS),
}
SEQUENCE_DESCRIPTIONS = {
    "tabletop-3": "3 concepts; the demo stream",
    "tabletop-6": "6 concepts of 6 classes (mirrors CustomConcept-6); the stream settings are tuned on",
    "tabletop-6b": "6 other concepts of tabletop-6's classes, none in tabletop-10: confirms what tabletop-6 tuned",
    "tabletop-10": "10 concepts, one per class (mirrors Landmarks-10)",
    "tabletop-50": "50 concepts, 5 per class (mirrors the paper's 50-task setup)",
}


def get_class(name: str) -> ObjectClass:
    """Look a base class up by key or noun, with a one-line error listing the choices."""
    cls = CLASS_BY_KEY.get(name) or CLASS_BY_NOUN.get(name)
    if cls is None:
        choices = ", ".join(c.key for c in BASE_CLASSES)
        raise UserInputError(f"unknown base class {name!r}; choose one of: {choices}")
    return cls


def get_sequence(name: str) -> tuple[Concept, ...]:
    """The concepts of a named sequence, in order."""
    if name not in SEQUENCES:
        raise UserInputError(f"unknown sequence {name!r}; choose one of: {', '.join(SEQUENCES)}")
    return tuple(CONCEPT_BY_NAME[n] for n in SEQUENCES[name])
