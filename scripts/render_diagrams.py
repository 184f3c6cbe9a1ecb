"""Render diagrams/*.dot to SVG beside them with Graphviz (apt-get install graphviz).

Run: python scripts/render_diagrams.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DIAGRAMS = Path(__file__).resolve().parent.parent / "diagrams"


def main() -> int:
    dot = shutil.which("dot")
    if dot is None:
        print("render_diagrams: Graphviz's `dot` not found; install it (apt-get install graphviz)", file=sys.stderr)
        return 2
    for source in sorted(DIAGRAMS.glob("*.dot")):
        target = source.with_suffix(".svg")
        subprocess.run([dot, "-Tsvg", str(source), "-o", str(target)], check=True)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
