"""The committed diagrams name the same stages as the code, in source and in the rendered SVG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = sorted(set(re.findall(r'run\.stage\("(\w+)"\)', (REPO / "qlora_pipeline" / "pipeline.py").read_text())))


def test_the_pipeline_has_stages_to_check() -> None:
    assert {"data", "evaluation", "visualize", "report"} <= set(STAGES)


@pytest.mark.parametrize("suffix", [".dot", ".svg"])
def test_data_flow_diagram_names_every_pipeline_stage(suffix: str) -> None:
    text = (REPO / "diagrams" / f"data_flow{suffix}").read_text(encoding="utf-8")
    missing = [stage for stage in STAGES if not re.search(rf"\b{stage}\b", text)]
    assert not missing, f"diagrams/data_flow{suffix} lacks {missing}; edit the .dot, run scripts/render_diagrams.py"


@pytest.mark.parametrize("suffix", [".dot", ".svg"])
def test_training_flow_diagram_names_the_functions_that_train(suffix: str) -> None:
    text = (REPO / "diagrams" / f"training_flow{suffix}").read_text(encoding="utf-8")
    pipeline = (REPO / "qlora_pipeline" / "pipeline.py").read_text()
    for function in ("fit_head", "tune_threshold", "fit_baseline"):
        assert f"{function}(" in pipeline and function in text, function
