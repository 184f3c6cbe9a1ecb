"""The instruction path end to end on the tiny model (`qlora quick-test --mode sft`, made smaller): training, the
adapter reloaded by plain peft, generation from Python and from the command line, the merged export, the report and
dashboard, reproduction and resume."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import open_in_chromium, plain_nf4_base, sets, torchrun

from qlora_pipeline.cli import main
from qlora_pipeline.runs import RunInterrupted

FAST = [
    "data.max_samples=120",
    "training.max_steps=8",
    "training.eval_steps=4",
    "generation.samples=12",
    "generation.max_new_tokens=6",
]


def sft_args(root: Path, *extra: str) -> list[str]:
    return ["quick-test", "--mode", "sft", "--output-dir", str(root), *sets(*FAST, *extra)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    assert main(sft_args(root)) == 0
    return root / "run_001"


@pytest.fixture(scope="module")
def test_generations(sft_run: Path) -> list[dict[str, Any]]:
    return read_jsonl(sft_run / "snownlp_instructions" / "test" / "generations.jsonl")


def test_the_run_writes_adapter_generations_metrics_and_report(sft_run: Path) -> None:
    status = json.loads((sft_run / "status.json").read_text())
    assert status["state"] == "succeeded"
    assert list(status["stages"]) == ["data", "model", "training", "save", "evaluation", "visualize", "report"]
    adapter = sft_run / "models" / "all" / "lora_adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "sft.json"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert set(metrics["splits"]["test"]) == {"sft", "base"} and metrics["primary_head"] == "sft"
    assert metrics["signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:zh")
    report = (sft_run / "experiment_report.md").read_text()
    for text in ("## Results", "base without adapter", "Δ tuned − base", "### Answers: snownlp_instructions/test",
                 "truncation (train)"):  # fmt: skip
        assert text in report, text
    assert (sft_run / "figures" / "training_curves.png").is_file()
    assert (sft_run / "figures" / "generation_metrics.png").is_file()


def test_generations_sit_beside_their_references_and_the_base_answers(
    sft_run: Path, test_generations: list[dict[str, Any]]
) -> None:
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert len(test_generations) == metrics["splits"]["test"]["sft"]["overall"]["generated"] == 12
    first = test_generations[0]
    assert {"id", "messages", "prompt", "reference", "answer", "base_answer", "stopped"} <= set(first)
    assert first["prompt"].startswith("### 指令:\n") and first["prompt"].endswith("### 回答:\n")


def test_training_loss_falls_and_the_adapter_lowers_the_validation_loss(sft_run: Path) -> None:
    with (sft_run / "training_log.csv").open() as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle) if r["loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    validation = json.loads((sft_run / "metrics.json").read_text())["splits"]["validation"]
    assert validation["sft"]["overall"]["loss"] < validation["base"]["overall"]["loss"]
    summary = json.loads((sft_run / "training_summary.json").read_text())
    assert summary["truncation"]["train"]["examples"] == summary["train_examples"] > 0
    assert 0 < summary["answer_tokens_per_epoch"] < summary["train_tokens_per_epoch"]  # loss on the answers only


def test_the_adapter_reloads_with_plain_peft_and_writes_the_runs_answers(
    sft_run: Path, test_generations: list[dict[str, Any]]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = sft_run / "models" / "all" / "lora_adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    sft = json.loads((adapter / "sft.json").read_text())
    stops = sft["prompt_format"]["stop_token_ids"]
    model = PeftModel.from_pretrained(plain_nf4_base(AutoModelForCausalLM, base_path), adapter).eval()
    for row in test_generations[:4]:
        ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
        answer = out[: out.index(stops[0])] if stops[0] in out else out
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == row["answer"]


def test_load_generator_answers_as_the_run_did(sft_run: Path, test_generations: list[dict[str, Any]]) -> None:
    import qlora_pipeline
    from qlora_pipeline.models.device import cpu_threads

    generator = qlora_pipeline.load_generator(sft_run)
    rows = test_generations[:6]
    with cpu_threads(generator.config.model.cpu_threads):  # as the run generated (fast on a shared CPU)
        assert generator.generate([r["messages"] for r in rows]) == [r["answer"] for r in rows]
        assert generator.generate([r["messages"] for r in rows], adapter=False) == [r["base_answer"] for r in rows]
        record = rows[0]["messages"][0]  # the same prompt as an alpaca dict and as a conversation
        alpaca = {"instruction": record["content"], "input": record["input"]}
        assert generator.generate([alpaca]) == [rows[0]["answer"]]
        prompt = ["判断这条评论的情感。"]
        sampled = [generator.generate(prompt, do_sample=True, seed=3, max_new_tokens=5) for _ in "ab"]
        assert sampled[0] == sampled[1]  # seeded sampling repeats itself


def test_qlora_generate_answers_a_file_prompts_and_lines(
    sft_run: Path,
    test_generations: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = sft_run / "snownlp_instructions" / "test" / "generations.jsonl"
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--run", str(sft_run), "--file", str(source), "--out", str(out)]) == 0
    answered = read_jsonl(out)
    assert [r["id"] for r in answered] == [r["id"] for r in test_generations]
    assert [r["answer"] for r in answered] == [r["answer"] for r in test_generations]
    capsys.readouterr()
    assert main(["generate", "--run", str(sft_run), "--prompt", "你好", "--prompt", "判断情感", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["你好", "判断情感"] and all("answer" in line for line in lines)
    # --interactive: a line in, an answer out (blank lines skipped); --history carries the conversation on.
    monkeypatch.setattr("sys.stdin", io.StringIO("判断情感\n\n你好\n"))
    assert main(["generate", "--run", str(sft_run), "--interactive", "--history", "--json"]) == 0
    chat = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in chat] == ["判断情感", "你好"] and chat[0]["answer"] == lines[1]["answer"]


def test_export_writes_a_merged_model_that_plain_transformers_loads_and_answers_alike(
    sft_run: Path, test_generations: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    assert main(["export", "--run", str(sft_run), "--merge", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.float32
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    for row in test_generations:
        ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(input_ids=ids, max_new_tokens=6)[0, ids.shape[1] :].tolist()  # its generation_config
        stops = model.generation_config.eos_token_id
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        assert tokenizer.decode(new[:cut], skip_special_tokens=True).strip() == row["answer"]
    capsys.readouterr()
    assert main(["export", "--run", str(sft_run), "--merge", str(merged)]) == 2  # never over an existing model
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_the_dashboard_has_a_generations_tab_and_renders_without_errors(sft_run: Path) -> None:
    page = sft_run / "dashboard.html"
    html = page.read_text(encoding="utf-8")
    assert ">Generations</button>" in html and ">Training</button>" in html
    assert "base without adapter" in html and "### 回答:" in html
    body = open_in_chromium(page)
    assert body["data-errors"] == "0" and int(body["data-rendered"]) == html.count('class="plot"') > 0


def test_compare_sets_sft_runs_side_by_side(sft_run: Path, tmp_path: Path) -> None:
    from qlora_pipeline.reporting.compare import compare

    markdown, _ = compare([sft_run, sft_run], tmp_path / "compare.md")
    assert "| dataset | run | loss | perplexity | chrf | bleu | rouge_l | exact_match |" in markdown


def test_an_sft_run_is_not_a_classifier_and_a_classifier_run_writes_no_answers(
    sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--run", str(sft_run), "--text", "好"]) == 2
    assert "instruction (sft) run" in capsys.readouterr().err
    from qlora_pipeline.config import Config

    fake = tmp_path / "run_001"
    fake.mkdir()
    (fake / "status.json").write_text(json.dumps({"state": "succeeded"}))
    (fake / "config.json").write_text(json.dumps({"config": Config.from_dict({"experiment": {"mode": "qlora"}})
                                                  .to_dict()}))  # fmt: skip
    assert main(["generate", "--run", str(fake), "--prompt", "你好"]) == 2
    assert "is a qlora run (a classifier)" in capsys.readouterr().err


def test_an_sft_checkpoint_records_its_data_and_resumes_only_on_it(
    sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each checkpoint is stamped with the data fingerprint, and a resume on other data is refused in one line
    before the model loads (the sft path stamped none and checked nothing)."""
    from qlora_pipeline.training.checkpoints import MARKER

    checkpoint = sorted((sft_run / "checkpoints").glob("checkpoint-*"))[0]
    marker = json.loads((checkpoint / MARKER).read_text())
    assert marker["data_fingerprint"] == json.loads((sft_run / "data_summary.json").read_text())["fingerprint"]
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    (copy / MARKER).write_text(json.dumps({**marker, "data_fingerprint": "0" * 64}))
    config = tmp_path / "config.json"  # the run's resolved config, as `qlora reproduce` reads it
    config.write_text(json.dumps(json.loads((sft_run / "config.json").read_text())["config"]))
    args = ["run", "--config", str(config), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--resume", str(copy)]) == 2
    assert "trained on other data" in capsys.readouterr().err


@pytest.mark.slow  # a second full run: ~25 s here
def test_an_sft_run_reproduces_bit_for_bit(sft_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", str(sft_run)]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "generations.jsonl" in out


@pytest.mark.slow  # an interrupted run and its resumption: ~40 s here
def test_an_interrupted_sft_run_resumes_to_the_same_result(
    sft_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import TrainerCallback

    from qlora_pipeline.sft import recipe

    class Interrupt(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 4:
                raise RunInterrupted("test interruption after the step-4 checkpoint")

    original = recipe.training_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "training_callbacks", lambda cfg, marker: [*original(cfg, marker), Interrupt()])
        assert main(sft_args(tmp_path)) == 143  # as SIGTERM ends a run: one line, exit 128 + 15
    assert main(["resume", str(tmp_path / "run_001")]) == 0
    resumed = tmp_path / "run_002"
    assert json.loads((resumed / "metrics.json").read_text()) == json.loads((sft_run / "metrics.json").read_text())
    for name in ("training_log.csv", "snownlp_instructions/test/generations.jsonl"):
        assert (resumed / name).read_text() == (sft_run / name).read_text(), name


@pytest.mark.slow  # a torchrun job of two CPU processes: ~40 s here
def test_two_processes_train_one_sft_run_written_by_rank_0(tmp_path: Path) -> None:
    args = sft_args(tmp_path, "training.max_steps=4", "training.eval_steps=2", "evaluation.figures=false")
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_001"]
    run_dir = tmp_path / "run_001"
    training = json.loads((run_dir / "config.json").read_text())["training"]
    assert training["world_size"] == 2 and training["effective_batch_size"] == 2 * 8 * 2
    assert done.stdout.count("run directory:") == 1
    for checkpoint in sorted((run_dir / "checkpoints").glob("checkpoint-*")):  # both ranks saved their RNG state
        assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (run_dir / "snownlp_instructions" / "test" / "generations.jsonl").is_file()
