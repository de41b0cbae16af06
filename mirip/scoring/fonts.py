"""A font that can draw a given text (file names in heatmap legends: Korean, accented, any script).

Pillow's built-in font covers basic Latin only; any other character comes out as an empty box. Installed fonts
are searched for one that covers the text (``/usr/share/fonts`` and the other usual places, or the folders in
``MIRIP_FONT_DIRS``). Where none does (a bare CI machine), the text is drawn in an ASCII form instead: Hangul
romanized, accents dropped, anything else as ``\\uXXXX``, and a warning says so once.
"""

from __future__ import annotations

import functools
import os
import unicodedata
import warnings
from typing import Tuple

from PIL import ImageFont

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc")
# Plain faces before styled ones: a legend wants the regular weight when both cover the text.
_STYLED = ("bold", "italic", "oblique", "mono", "coding", "serif", "myeongjo", "math", "light")
# A private-use code point no font draws: what a missing glyph looks like in a given font.
_UNDRAWABLE = "\U0010FFFD"
_said: set = set()

# Revised Romanization of Korean, per syllable (initial, vowel, final jamo in Unicode's order).
_INITIALS = "g kk n d tt r m b pp s ss - j jj ch k t p h".split()
_VOWELS = "a ae ya yae eo e yeo ye o wa wae oe yo u wo we wi yu eu ui i".split()
_FINALS = ("- k k k n n n t l k m l l l p l m p p t t ng t t k t p t").split()


def font_dirs() -> Tuple[str, ...]:
    env = os.environ.get("MIRIP_FONT_DIRS")
    dirs = env.split(os.pathsep) if env is not None else FONT_DIRS
    return tuple(os.path.expanduser(d) for d in dirs if d)


@functools.lru_cache(maxsize=None)
def font_files(dirs: Tuple[str, ...]) -> Tuple[str, ...]:
    found = [os.path.join(root, name) for d in dirs for root, _, names in os.walk(d)
             for name in names if name.lower().endswith(FONT_EXTENSIONS)]
    return tuple(sorted(found, key=lambda p: (any(s in os.path.basename(p).lower() for s in _STYLED), p)))


def default_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=None)
def _truetype(path: str, size: int):
    try:
        return ImageFont.truetype(path, size)
    except (OSError, ValueError):  # a broken or unsupported font file is skipped, not fatal
        return None


def covers(font, text: str) -> bool:
    """Whether ``font`` has a glyph for every visible character of ``text``."""
    missing = font.getmask(_UNDRAWABLE)
    blank = (bytes(missing), missing.size)
    return all(c.isspace() or (bytes(m), m.size) != blank for c in set(text) for m in [font.getmask(c)])


@functools.lru_cache(maxsize=4096)
def _font_for(text: str, size: int, dirs: Tuple[str, ...]):
    default = default_font(size)
    if covers(default, text):
        return default, text
    for path in font_files(dirs):
        font = _truetype(path, size)
        if font is not None and covers(font, text):
            return font, text
    return default, None


def font_for(text: str, size: int):
    """(font, text to draw): a font covering ``text``, or Pillow's with ``text`` in ``ascii_form`` (said once)."""
    font, drawn = _font_for(text, size, font_dirs())
    if drawn is not None:
        return font, drawn
    shown = ascii_form(text)
    if "ascii" not in _said:
        _said.add("ascii")
        warnings.warn(f"no installed font can draw {text!r}; heatmap legends show such file names in an ASCII "
                      f"form ({shown!r}). Install a font that covers them (fonts-noto-cjk or fonts-nanum for "
                      "Korean) or name its folder in MIRIP_FONT_DIRS", stacklevel=2)
    return font, shown


def _romanize(c: str) -> str:
    i = ord(c) - 0xAC00
    if not 0 <= i < 11172:
        return c
    syllable = _INITIALS[i // 588] + _VOWELS[i % 588 // 28] + _FINALS[i % 28]
    return syllable.replace("-", "")


def ascii_form(text: str) -> str:
    """``text`` in ASCII that a reader can still follow: 한글 -> hangeul, é -> e, 中 -> \\u4e2d."""
    out = []
    for c in text:
        c = _romanize(c)
        c = "".join(x for x in unicodedata.normalize("NFKD", c) if not unicodedata.combining(x))
        out.append(c.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out)
