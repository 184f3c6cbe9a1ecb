"""Fonts for PNG figures: Latin text in DejaVu Sans (matplotlib's own), Chinese class names, dataset names and texts
in Noto Sans SC, so a figure of a Chinese task draws its labels instead of boxes on a machine without CJK fonts.

The font comes from a package the install pulls in (`pylopdf-fonts-zh-cn`: Google's Noto Sans SC, SIL OFL 1.1,
all 6763 GB2312 characters). Only its font file is read: the package is located without importing it, so none of
its code runs. Where it is missing (an install with --no-deps), the first CJK font matplotlib finds on the system
is used (`SYSTEM_CJK_FAMILIES`, in order); with none, one warning says what to install and figures still draw.

Nothing global changes at import, and nothing is left behind: the font file is registered with matplotlib's font
manager once (on first use), and every figure is built and saved inside `rc_context` with the family list, which
matplotlib restores afterwards. Matplotlib falls back glyph by glyph along the list, so Latin text keeps DejaVu.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

LATIN_FAMILY = "DejaVu Sans"
FONT_PACKAGE = "pylopdf_fonts_zh_cn"  # PyPI: pylopdf-fonts-zh-cn
FONT_FILE = "NotoSansSC-Regular.otf"
# Used in this order when the packaged font is missing: families of common CJK system fonts.
SYSTEM_CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
    "Arial Unicode MS",
)

F = TypeVar("F", bound=Callable[..., Any])


def packaged_font() -> Path | None:
    """The Noto Sans SC file of the font package, located without importing the package; None when not installed."""
    spec = importlib.util.find_spec(FONT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / FONT_FILE
        if candidate.is_file():
            return candidate
    return None


@functools.cache  # registering a file twice would list its family twice
def cjk_family() -> str | None:
    """The family name that draws Chinese: the packaged font (registered with matplotlib on first call), else a
    system CJK font, else None (with one warning)."""
    from matplotlib import font_manager

    path = packaged_font()
    if path is not None:
        font_manager.fontManager.addfont(str(path))
        return str(font_manager.FontProperties(fname=str(path)).get_name())
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    for family in SYSTEM_CJK_FAMILIES:
        if family in installed:
            log.info("figures: Chinese text in the system font %s (the package pylopdf-fonts-zh-cn is missing)", family)
            return family
    log.warning(
        "figures: no font for Chinese text (CJK class or dataset names draw as boxes); "
        "pip install pylopdf-fonts-zh-cn, or install a CJK system font such as Noto Sans CJK SC"
    )
    return None


def families() -> list[str]:
    """The font family list every figure uses: DejaVu Sans, then the CJK font when there is one."""
    cjk = cjk_family()
    return [LATIN_FAMILY, cjk] if cjk else [LATIN_FAMILY]


@contextmanager
def figure_fonts() -> Iterator[None]:
    """Build and save figures inside this: their text draws with `families()`; rcParams are restored afterwards."""
    import matplotlib

    with matplotlib.rc_context({"font.family": families()}):
        yield


def with_figure_fonts(function: F) -> F:
    """Decorate a function that builds and saves a figure, so it does both inside `figure_fonts()`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with figure_fonts():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
