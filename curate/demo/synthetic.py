"""Deterministic synthetic image-caption pairs: coloured shapes on coloured backgrounds.

Used to train the bundled tiny CLIP model (scripts/train_small_clip.py), by the tests and by the
demo. Everything here is pure: every random choice comes from the ``rng`` argument (a
``numpy.random.Generator``; an int seed is accepted too), nothing reads or writes global state.

    rng = np.random.default_rng(0)
    a = random_attrs(rng)                        # Attrs(shape='star', color='red', background='gray')
    img = render(a, rng, width=96, height=64)    # PIL RGB image
    caption(a, "de", rng)                        # 'ein roter Stern auf grauem Hintergrund'
    caption(mismatched_attrs(a, rng), "en")      # a caption that does NOT describe img

Captions exist in English, German, French, Spanish, Italian and Polish, several templates each,
with the adjective agreement each language needs, long enough that fastText lid.176 recognises the
language (checked in tests/test_small_clip.py's language test).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "it", "pl")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

# foreground colours: name -> RGB
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 235),
    "yellow": (245, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "brown": (125, 75, 35),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 175),
    "navy": (20, 30, 85),
}

RngLike = Union[np.random.Generator, int]


@dataclass(frozen=True)
class Attrs:
    shape: str
    color: str
    background: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; one of {tuple(COLORS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; one of {tuple(BACKGROUNDS)}")


def _rng(rng: Optional[RngLike]) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise TypeError("an rng (numpy.random.Generator or int seed) is required")
    return np.random.default_rng(rng)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def random_attrs(rng: RngLike) -> Attrs:
    rng = _rng(rng)
    return Attrs(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, tuple(BACKGROUNDS)))


def mismatched_attrs(attrs: Attrs, rng: RngLike) -> Attrs:
    """Attributes that differ from ``attrs`` in the shape, the colour, or both (the background is
    free), so a caption of the result does not describe an image of ``attrs``."""
    rng = _rng(rng)
    mode = int(rng.integers(3))  # 0: shape, 1: colour, 2: both
    shape, color = attrs.shape, attrs.color
    if mode in (0, 2):
        shape = _pick(rng, tuple(s for s in SHAPES if s != attrs.shape))
    if mode in (1, 2):
        color = _pick(rng, tuple(c for c in COLORS if c != attrs.color))
    return Attrs(shape, color, _pick(rng, tuple(BACKGROUNDS)))


# --------------------------------------------------------------------------------------------------
# rendering


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon outline of ``shape`` with circumradius-ish ``r``, rotated by ``angle`` radians."""
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape == "square":
        s = 0.78
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.2) for x, y in pts]
    elif shape == "star":
        pts = []
        for i in range(10):
            t = -math.pi / 2 + i * math.pi / 5
            rad = 1.0 if i % 2 == 0 else 0.42
            pts.append((rad * math.cos(t), rad * math.sin(t)))
    elif shape == "cross":
        a, b = 0.3, 0.95
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    elif shape == "heart":
        pts = []
        for t in np.linspace(0, 2 * math.pi, 48, endpoint=False):
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 + 0.1))
    else:  # pragma: no cover - Attrs validates
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(x)))) for c, x in zip(rgb, d))


def render(attrs: Attrs, rng: RngLike, width: int = 64, height: int = 64) -> Image.Image:
    """An RGB image of ``attrs``: the shape, in its colour, on the background colour, with jitter in
    position, scale, rotation and colour, plus mild pixel noise. The shape lies inside the central
    square of side min(width, height), so a resize-and-centre-crop preprocess keeps all of it."""
    rng = _rng(rng)
    if width < 8 or height < 8:
        raise ValueError("images must be at least 8x8 pixels")
    ss = 2  # supersampling for smooth edges
    W, H = width * ss, height * ss
    side = min(W, H)
    bg = _jitter_color(BACKGROUNDS[attrs.background], rng, 12)
    fg = _jitter_color(COLORS[attrs.color], rng, 15)
    img = Image.new("RGB", (W, H), bg)
    draw = ImageDraw.Draw(img)
    r = side * float(rng.uniform(0.22, 0.36))
    margin = r * 1.05
    x0, y0 = (W - side) / 2, (H - side) / 2
    cx = x0 + float(rng.uniform(margin, max(margin, side - margin)))
    cy = y0 + float(rng.uniform(margin, max(margin, side - margin)))
    max_rot = {"circle": 180, "square": 15, "cross": 15, "triangle": 20, "star": 36, "heart": 20}[attrs.shape]
    angle = math.radians(float(rng.uniform(-max_rot, max_rot)))
    draw.polygon(_shape_points(attrs.shape, cx, cy, r, angle), fill=fg)
    img = img.resize((width, height), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


def to_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# captions


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_EN_SHAPE = {s: s for s in SHAPES}
_EN_COLOR = {c: c for c in COLORS}
_EN_BG = {b: b for b in BACKGROUNDS}


def _caption_en(a: Attrs, t: int) -> str:
    s, c, b = _EN_SHAPE[a.shape], _EN_COLOR[a.color], _EN_BG[a.background]
    return [
        f"a photo of a small {c} {s} on a plain {b} background",
        f"{_an(c)} {s} on {_an(b)} background",
        f"this picture shows {_an(c)} {s} drawn on a simple {b} background",
        f"there is {_an(c)} {s} in the middle of a {b} background",
    ][t % 4]


# German: (noun, gender) ; colour stems take the endings
_DE_SHAPE = {
    "circle": ("Kreis", "m"),
    "square": ("Quadrat", "n"),
    "triangle": ("Dreieck", "n"),
    "star": ("Stern", "m"),
    "cross": ("Kreuz", "n"),
    "heart": ("Herz", "n"),
}
_DE_COLOR = {
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "orange": "orangefarben",
    "purple": "violett",
    "pink": "rosafarben",
    "brown": "braun",
}
_DE_BG = {"white": "weiß", "black": "schwarz", "gray": "grau", "beige": "beige", "navy": "dunkelblau"}


def _caption_de(a: Attrs, t: int) -> str:
    noun, g = _DE_SHAPE[a.shape]
    c, b = _DE_COLOR[a.color], _DE_BG[a.background]
    nom = f"ein {c}er" if g == "m" else f"ein {c}es"  # indefinite, nominative
    acc = f"einen {c}en" if g == "m" else f"ein {c}es"
    return [
        f"ein Foto von einem kleinen {c}en {noun} auf einfachem {b}em Hintergrund",
        f"{nom} {noun} auf {b}em Hintergrund",
        f"auf diesem Bild sieht man {acc} {noun} vor einem {b}en Hintergrund",
        f"das Bild zeigt {acc} {noun} in der Mitte, der Hintergrund ist {b}",
    ][t % 4]


# French: (noun, gender, starts with vowel)
_FR_SHAPE = {
    "circle": ("cercle", "m"),
    "square": ("carré", "m"),
    "triangle": ("triangle", "m"),
    "star": ("étoile", "f"),
    "cross": ("croix", "f"),
    "heart": ("cœur", "m"),
}
_FR_COLOR = {
    "red": ("rouge", "rouge"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"),
    "orange": ("orange", "orange"),
    "purple": ("violet", "violette"),
    "pink": ("rose", "rose"),
    "brown": ("marron", "marron"),
}
_FR_BG = {"white": "blanc", "black": "noir", "gray": "gris", "beige": "beige", "navy": "bleu marine"}


def _caption_fr(a: Attrs, t: int) -> str:
    noun, g = _FR_SHAPE[a.shape]
    c = _FR_COLOR[a.color][0 if g == "m" else 1]
    b = _FR_BG[a.background]
    un = "un" if g == "m" else "une"
    petit = "petit" if g == "m" else "petite"
    e = "" if g == "m" else "e"
    return [
        f"une photo d'{un} {petit} {noun} {c} sur un fond {b} tout simple",
        f"{un} {noun} {c} sur un fond {b}",
        f"sur cette image, on voit {un} {noun} {c} dessiné{e} sur un fond {b}",
        f"il y a {un} {noun} {c} au milieu d'un fond {b}",
    ][t % 4]


_ES_SHAPE = {
    "circle": ("círculo", "m"),
    "square": ("cuadrado", "m"),
    "triangle": ("triángulo", "m"),
    "star": ("estrella", "f"),
    "cross": ("cruz", "f"),
    "heart": ("corazón", "m"),
}
_ES_COLOR = {
    "red": ("rojo", "roja"),
    "green": ("verde", "verde"),
    "blue": ("azul", "azul"),
    "yellow": ("amarillo", "amarilla"),
    "orange": ("naranja", "naranja"),
    "purple": ("morado", "morada"),
    "pink": ("rosa", "rosa"),
    "brown": ("marrón", "marrón"),
}
_ES_BG = {"white": "blanco", "black": "negro", "gray": "gris", "beige": "beige", "navy": "azul marino"}


def _caption_es(a: Attrs, t: int) -> str:
    noun, g = _ES_SHAPE[a.shape]
    c = _ES_COLOR[a.color][0 if g == "m" else 1]
    b = _ES_BG[a.background]
    un = "un" if g == "m" else "una"
    peq = "pequeño" if g == "m" else "pequeña"
    o = "o" if g == "m" else "a"
    return [
        f"una foto de {un} {peq} {noun} {c} sobre un fondo {b} muy sencillo",
        f"{un} {noun} {c} sobre un fondo {b}",
        f"en esta imagen se ve {un} {noun} {c} dibujad{o} sobre un fondo {b}",
        f"hay {un} {noun} {c} en el centro de un fondo {b}",
    ][t % 4]


_IT_SHAPE = {
    "circle": ("cerchio", "m"),
    "square": ("quadrato", "m"),
    "triangle": ("triangolo", "m"),
    "star": ("stella", "f"),
    "cross": ("croce", "f"),
    "heart": ("cuore", "m"),
}
_IT_COLOR = {
    "red": ("rosso", "rossa"),
    "green": ("verde", "verde"),
    "blue": ("blu", "blu"),
    "yellow": ("giallo", "gialla"),
    "orange": ("arancione", "arancione"),
    "purple": ("viola", "viola"),
    "pink": ("rosa", "rosa"),
    "brown": ("marrone", "marrone"),
}
_IT_BG = {"white": "bianco", "black": "nero", "gray": "grigio", "beige": "beige", "navy": "blu scuro"}


def _caption_it(a: Attrs, t: int) -> str:
    noun, g = _IT_SHAPE[a.shape]
    c = _IT_COLOR[a.color][0 if g == "m" else 1]
    b = _IT_BG[a.background]
    un = "un" if g == "m" else "una"
    picc = "piccolo" if g == "m" else "piccola"
    o = "o" if g == "m" else "a"
    return [
        f"una foto di {un} {picc} {noun} {c} su uno sfondo {b} molto semplice",
        f"{un} {noun} {c} su uno sfondo {b}",
        f"in questa immagine c'è {un} {noun} {c} disegnat{o} su uno sfondo {b}",
        f"si vede {un} {noun} {c} al centro di uno sfondo {b}",
    ][t % 4]


# Polish: (nominative, accusative, gender); colour stems (hard-stem "y" / soft-stem "i")
_PL_SHAPE = {
    "circle": ("koło", "koło", "n"),
    "square": ("kwadrat", "kwadrat", "m"),
    "triangle": ("trójkąt", "trójkąt", "m"),
    "star": ("gwiazda", "gwiazdę", "f"),
    "cross": ("krzyż", "krzyż", "m"),
    "heart": ("serce", "serce", "n"),
}
_PL_COLOR = {
    "red": "czerwon",
    "green": "zielon",
    "blue": "niebiesk",
    "yellow": "żółt",
    "orange": "pomarańczow",
    "purple": "fioletow",
    "pink": "różow",
    "brown": "brązow",
}
_PL_BG = {"white": "biał", "black": "czarn", "gray": "szar", "beige": "beżow", "navy": "granatow"}


def _pl_adj(stem: str, case: str) -> str:
    soft = stem.endswith(("k", "g"))
    return (
        stem
        + {
            "m": "i" if soft else "y",
            "f": "a",
            "n": "ie" if soft else "e",
            "f_acc": "ą",
            "loc": "im" if soft else "ym",
        }[case]
    )


def _caption_pl(a: Attrs, t: int) -> str:
    nom, acc, g = _PL_SHAPE[a.shape]
    cs, bs = _PL_COLOR[a.color], _PL_BG[a.background]
    c_nom = _pl_adj(cs, g)
    c_acc = _pl_adj(cs, "f_acc") if g == "f" else c_nom
    maly = {"m": "mały", "f": "mała", "n": "małe"}[g]
    bg_loc = _pl_adj(bs, "loc")
    return [
        f"zdjęcie przedstawia {maly if g != 'f' else 'małą'} {c_acc} {acc} na prostym {bg_loc} tle",
        f"{c_nom} {nom} na {bg_loc} tle",
        f"na tym obrazku widać {c_acc} {acc} narysowan{'y' if g == 'm' else ('ą' if g == 'f' else 'e')} na {bg_loc} tle",
        f"{maly} {c_nom} {nom} znajduje się na środku, a tło jest {_pl_adj(bs, 'n')}",
    ][t % 4]


_CAPTIONERS = {
    "en": _caption_en,
    "de": _caption_de,
    "fr": _caption_fr,
    "es": _caption_es,
    "it": _caption_it,
    "pl": _caption_pl,
}
N_TEMPLATES = 4


def caption(attrs: Attrs, language: str = "en", rng: Optional[RngLike] = None) -> str:
    """A caption describing ``attrs`` in ``language`` (one of LANGUAGES). The template is drawn
    from ``rng``; without one, the first (longest) template is used."""
    try:
        fn = _CAPTIONERS[language]
    except KeyError:
        raise ValueError(f"unsupported language {language!r}; one of {LANGUAGES}") from None
    t = 0 if rng is None else int(_rng(rng).integers(N_TEMPLATES))
    return fn(attrs, t)


# --------------------------------------------------------------------------------------------------
# convenience


@dataclass(frozen=True)
class Pair:
    image: Image.Image
    caption: str
    attrs: Attrs  # what the image shows
    caption_attrs: Attrs  # what the caption says (== attrs when matched)
    language: str
    matched: bool


def pairs(
    n: int,
    seed: int,
    languages: tuple[str, ...] = LANGUAGES,
    sizes: tuple[tuple[int, int], ...] = ((64, 64),),
    mismatch_rate: float = 0.0,
) -> Iterator[Pair]:
    """``n`` pairs from ``seed``; a ``mismatch_rate`` fraction get a caption of other attributes."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        a = random_attrs(rng)
        w, h = sizes[int(rng.integers(len(sizes)))]
        img = render(a, rng, w, h)
        lang = languages[int(rng.integers(len(languages)))]
        matched = bool(rng.random() >= mismatch_rate)
        ca = a if matched else mismatched_attrs(a, rng)
        yield Pair(img, caption(ca, lang, rng), a, ca, lang, matched)
