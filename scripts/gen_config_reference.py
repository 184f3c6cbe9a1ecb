"""Regenerate docs/config_reference.md from the config dataclasses: python scripts/gen_config_reference.py"""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.config import config_reference_markdown

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config_reference.md"


def main() -> None:
    REFERENCE.write_text(config_reference_markdown(), encoding="utf-8")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
