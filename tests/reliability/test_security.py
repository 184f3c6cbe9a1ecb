"""Security: YAML loads safely; trust_remote_code stays off unless set, and is then logged and in the report;
secrets in the environment never reach config.json, logs, reports or trackers; outputs never land outside their
directory whatever a dataset is called; pickled heads are read only from the run's own models/ and only when they
match the checksum recorded when the run saved them."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import cache_with_model, sets
from procs import EMBEDDINGS, error_lines, read_json, start

from qlora_pipeline.cli import main
from qlora_pipeline.errors import UserError
from qlora_pipeline.runs import inside

PACKAGE = Path(__file__).resolve().parents[2] / "qlora_pipeline"


def calls_in_package(names: set[str]) -> list[str]:
    """`module:line call` for every call of `names` (dotted, as written) anywhere in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in names:
                    found.append(f"{path.relative_to(PACKAGE)}:{ast.unparse(node)[:80]}")
    return found


def test_yaml_is_only_ever_loaded_with_the_safe_loader() -> None:
    loads = calls_in_package({"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.safe_load"})
    assert loads and all("Loader=_Loader" in call or "safe_load" in call for call in loads), loads
    from qlora_pipeline.config import _Loader

    assert issubclass(_Loader, __import__("yaml").SafeLoader)


def test_a_python_tag_in_a_config_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    witness = tmp_path / "pwned"
    config = tmp_path / "c.yaml"
    config.write_text(f"experiment:\n  name: !!python/object/apply:os.system ['touch {witness}']\n")
    assert main(["config", "show", str(config)]) == 2
    assert (
        main(
            [
                "config",
                "show",
                "quick_test",
                "--set",
                f"experiment.name=!!python/object/apply:os.system ['touch {witness}']",
            ]
        )
        == 2
    )
    assert not witness.exists()
    assert all("could not determine a constructor" in line for line in error_lines(capsys.readouterr().err))


def test_unpickling_happens_only_where_heads_are_loaded() -> None:
    """joblib/pickle loads in the package: the head loader alone, which predict reaches only after its checks."""
    loads = calls_in_package({"joblib.load", "pickle.load", "pickle.loads", "torch.load", "np.load"})
    assert [call.split(":")[0] for call in loads] == ["evaluation/trained_head.py"], loads


def test_trust_remote_code_is_off_unless_set(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every from_pretrained of the model and tokenizer gets trust_remote_code=False by default."""
    import transformers

    from qlora_pipeline.config import load_config
    from qlora_pipeline.models.loading import load_model

    seen: list[Any] = []
    for auto in (transformers.AutoModel, transformers.AutoTokenizer):
        original = auto.from_pretrained

        def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    load_model(load_config("quick_test").model, task="encoder")
    assert seen == [False, False]


SECRETS = {  # planted in the environment of a run; none may appear in anything it writes or prints
    "HF_TOKEN": "hf_reliabilityHFtoken0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_reliabilityHubToken987654",
    "OPENAI_API_KEY": "sk-reliability-openai-key-0001",
    "AWS_ACCESS_KEY_ID": "AKIARELIABILITY00001",
    "AWS_SECRET_ACCESS_KEY": "reliability/aws/secret/key/0001",
    "GITHUB_TOKEN": "ghp_reliabilityGithubToken0001",
    "MY_SERVICE_TOKEN": "svc-reliability-token-0001",
    "DATABASE_PASSWORD": "reliability-db-password-0001",
    "WANDB_API_KEY": "reliabilitywandbkey00000000000001",
    "MLFLOW_TRACKING_PASSWORD": "reliability-mlflow-password-01",
}


def leaks(folder: Path, text: str = "") -> list[str]:
    """`file: VARIABLE` for every planted secret found in a file under `folder` (bytes, so binary event files and
    SQLite databases count), or in `text`."""
    found = [f"output: {name}" for name, value in SECRETS.items() if value in text]
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [
                f"{path.relative_to(folder)}: {name}" for name, value in SECRETS.items() if value.encode() in data
            ]
    return found


@pytest.mark.parametrize("tracking", ["tensorboard", pytest.param("mlflow", marks=pytest.mark.slow)])
def test_secrets_in_the_environment_reach_no_output_and_trust_remote_code_is_said(
    tracking: str, tmp_path: Path, tiny_model: Path
) -> None:
    """A run with secrets in its environment, a tracker, and trust_remote_code on: nothing it writes (run directory,
    tracker store, embedding cache) or prints holds a secret; trust_remote_code is in its log, config.json, report."""
    cache = cache_with_model(tmp_path, tiny_model)
    args = [*EMBEDDINGS, *sets(f"output.tracking={tracking}", "model.trust_remote_code=true")]
    process = start([*args, "--output-dir", str(tmp_path / "out")], tmp_path, cache, env=SECRETS)
    assert process.wait() == 0, process.stderr()
    run = tmp_path / "out" / "run_001"
    tracked = {"tensorboard": tmp_path / "out" / "tensorboard", "mlflow": tmp_path / "out" / "mlflow.db"}[tracking]
    assert tracked.exists()
    assert leaks(tmp_path, process.stderr()) == []
    note = "trust_remote_code on: Python code shipped with"
    assert note in (run / "experiment.log").read_text(encoding="utf-8") and note in process.stderr()
    assert any(note in n for n in read_json(run / "config.json")["model"]["notes"])
    assert "| trust_remote_code | **on**" in (run / "experiment_report.md").read_text(encoding="utf-8")


# ---- paths ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../../etc", "/etc", "", "a\\b", "x\0y"])
def test_a_name_from_data_never_makes_a_path_outside_its_folder(name: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot name a folder inside"):
        inside(tmp_path, name, "test")


def test_a_folder_symlinked_elsewhere_is_not_written_through(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="resolves outside"):
        inside(tmp_path / "run", "data", "test")


NAMES = ["..", ".", ".hidden", "../x", "a/b", "x y", "名字", "/etc", "a\\b"]


@pytest.mark.parametrize("name", NAMES)
def test_a_dataset_name_that_is_not_a_plain_folder_name_gets_a_safe_folder_inside_the_run(
    name: str, tmp_path: Path
) -> None:
    """Any name is kept for display (评论 too); its folder is one plain component that stays inside the run."""
    from qlora_pipeline.runs import dataset_folder

    folder = dataset_folder(name)
    assert folder not in (".", "..") and "/" not in folder and "\\" not in folder
    assert inside(tmp_path, folder, "test").resolve().is_relative_to(tmp_path.resolve())


def test_distinct_dataset_names_never_share_a_folder() -> None:
    from qlora_pipeline.runs import dataset_folder

    assert len({dataset_folder(name) for name in NAMES}) == len(NAMES)


def test_a_hostile_file_name_is_read_and_names_no_output(tmp_path: Path, tiny_model: Path) -> None:
    """A data file whose own name holds dots, spaces and shell characters: read like any other; the outputs are
    named by the dataset's name alone, inside the run directory."""
    import pandas as pd

    folder = tmp_path / "in ..; $(touch x) `x` 'q'"
    folder.mkdir()
    data = folder / "..data ;rm -rf ~.csv"
    rows = [(f"好评{i} 很好" if i % 2 else f"差评{i} 很差", "pos" if i % 2 else "neg") for i in range(60)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(data, index=False)
    config = tmp_path / "c.yaml"
    config.write_text(
        "data:\n  sources:\n    - name: mine\n      type: local\n"
        f"      path: {json.dumps(str(data))}\n"
        "model: {name_or_path: 'builtin:tiny-qwen3', quantization: 4bit, compute_dtype: float32, device: cpu}\n"
        "embedding: {max_length: 16, batch_size: 16, fidelity_sample: 0}\n"
        "evaluation: {figures: false, bootstrap: 0}\n",
        encoding="utf-8",
    )
    before = {p for p in tmp_path.rglob("*")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_CACHE_DIR", str(cache_with_model(tmp_path / "c", tiny_model)))
        assert main(["run", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 0
    new = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if not p.is_relative_to(tmp_path / "out") and not p.is_relative_to(tmp_path / "c")]
    assert outside == []
    assert (tmp_path / "out" / "run_001" / "mine" / "test" / "predictions.csv").is_file()


# ---- heads: only the run's own, only as saved ---------------------------------------------------------------------


def test_a_head_symlinked_from_outside_the_run_is_not_unpickled(
    embeddings_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(embeddings_run[0], tmp_path / "run"))
    evil = tmp_path / "evil.joblib"
    shutil.copyfile(copy / "models" / "all" / "logreg.joblib", evil)
    (copy / "models" / "all" / "logreg.joblib").unlink()
    (copy / "models" / "all" / "logreg.joblib").symlink_to(evil)
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), "--text", "好"]) == 2
    assert "resolves outside" in capsys.readouterr().err


def test_a_head_is_never_unpickled_before_its_checksum_is_checked(
    embeddings_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A head replaced by a pickle that would run code when loaded: refused by its checksum, the code never runs."""
    import pickle

    copy = Path(shutil.copytree(embeddings_run[0], tmp_path / "run"))
    witness = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (witness,))

    (copy / "models" / "all" / "logreg.joblib").write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), "--text", "好"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "does not match the checksum recorded when the run saved it" in lines[0]
    assert not witness.exists()
