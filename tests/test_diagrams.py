"""The committed diagrams name the stages and the training functions of every path as the code does, and the
modules they point at exist; the rendered SVGs are kept in step with their sources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qlora_pipeline"
DIAGRAMS = REPO / "diagrams"


def stages(*files: str) -> set[str]:
    """The stages a module runs: its own `run.stage("...")` blocks, and the data stage when it calls the shared
    `data_stage` (the sft path passes its own preparation of instruction records to it)."""
    found = set()
    for name in files:
        code = (PACKAGE / name).read_text()
        found |= set(re.findall(r'run\.stage\("(\w+)"\)', code)) | ({"data"} if "data_stage(" in code else set())
    return found


SHARED = stages("pipeline.py", "stages.py")
EMBEDDINGS = stages("embeddings/run.py")
QLORA = stages("finetune/run.py")
SFT = stages("sft/run.py")


def diagram(name: str, suffix: str) -> str:
    return (DIAGRAMS / f"{name}{suffix}").read_text(encoding="utf-8")


def test_both_paths_have_stages_to_check() -> None:
    assert {"data", "report"} <= SHARED
    assert {"embeddings", "classifiers", "evaluation", "visualize"} <= EMBEDDINGS
    assert {"training", "calibration", "save", "evaluation", "visualize"} <= QLORA
    assert {"data", "model", "training", "save", "evaluation", "visualize"} <= SFT


@pytest.mark.parametrize("suffix", [".dot", ".svg"])
def test_data_flow_names_every_stage_of_the_embeddings_path(suffix: str) -> None:
    text = diagram("data_flow", suffix)
    missing = sorted(stage for stage in SHARED | EMBEDDINGS if not re.search(rf"\b{stage}\b", text))
    assert not missing, f"diagrams/data_flow{suffix} lacks {missing}; edit the .dot, run scripts/render_diagrams.py"


def test_training_flow_has_a_node_per_stage_of_the_qlora_path() -> None:
    """Each qlora stage of its own is a node `q_<stage>`; the stages it shares are drawn in data_flow."""
    text = diagram("training_flow", ".dot")
    missing = sorted(stage for stage in QLORA - SHARED - EMBEDDINGS if f"q_{stage} [" not in text)
    assert not missing, f"diagrams/training_flow.dot has no node q_<stage> for {missing}"


def test_training_flow_has_a_node_per_stage_of_the_sft_path() -> None:
    """The sft path runs its own data stage too (instruction records): every stage of it is a node `s_<stage>`."""
    text = diagram("training_flow", ".dot")
    missing = sorted(stage for stage in SFT - {"report"} if f"s_{stage} [" not in text)
    assert not missing, f"diagrams/training_flow.dot has no node s_<stage> for {missing}"


@pytest.mark.parametrize("suffix", [".dot", ".svg"])
@pytest.mark.parametrize(
    ("path", "functions"),
    [
        ("embeddings/run.py", ["fit_head", "tune_threshold", "fit_baseline"]),
        ("finetune/run.py", ["setup", "train", "calibrate", "save", "predict_proba", "fit_baseline", "train_replica"]),
        ("sft/run.py", ["prepare_instructions", "setup", "encode", "train", "save", "evaluate", "train_replica"]),
    ],
)
def test_training_flow_names_the_functions_that_train(path: str, functions: list[str], suffix: str) -> None:
    code, text = (PACKAGE / path).read_text(), diagram("training_flow", suffix)
    for function in functions:
        assert re.search(rf"\b{function}\(", code), f"{path} no longer calls {function}"
        assert re.search(rf"\b{function}\b", text), f"diagrams/training_flow{suffix} lacks {function}"


@pytest.mark.parametrize("name", ["data_flow", "training_flow"])
def test_the_modules_a_diagram_names_exist(name: str) -> None:
    named = set(re.findall(r"[\w/]+\.py\b", diagram(name, ".dot")))
    assert named, f"diagrams/{name}.dot names no module"
    files = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    found = files | {m for m in named if (REPO / m).is_file()}  # scripts/, tests/
    missing = sorted(m for m in named if m not in found and not any(f.endswith("/" + m) for f in files))
    assert not missing, f"diagrams/{name}.dot names modules that do not exist: {missing}"
