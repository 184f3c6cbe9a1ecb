"""The instruction path without training: records (alpaca, messages; jsonl, csv, parquet, save_to_disk), cleaning,
leakage-free splits, prompts with answer-only labels (the documented template, a real Qwen chat template), truncation,
padding and packing, the reference metrics, and the config's rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from helpers import error_lines, sets

from qlora_pipeline.cli import main
from qlora_pipeline.config import Config, ConfigError, SftConfig, load_config
from qlora_pipeline.data.instructions import prepare_instructions, prompt_keys
from qlora_pipeline.errors import DataError, UserError
from qlora_pipeline.evaluation.text_metrics import normalize_answer, reference_scores, rouge_l, rouge_tokens
from qlora_pipeline.sft.prompts import IGNORE, Encoded, Prompter, resolve_format

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPLITS = ("train", "validation", "test")
CONVERSATION = [
    {"role": "system", "content": "你是酒店助手。"},
    {"role": "user", "content": "这家酒店怎么样？"},
    {"role": "assistant", "content": "房间很干净。"},
    {"role": "user", "content": "早餐呢？"},
    {"role": "assistant", "content": "早餐一般。"},
]
ALPACA = [{"role": "user", "content": "判断情感", "input": "房间太小了"}, {"role": "assistant", "content": "负面"}]


def alpaca_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"instruction": f"把数字{i}写成中文", "input": "" if i % 2 else f"例{i}", "output": f"答案{i}"}
        for i in range(n)
    ]


def config_for(path: Path, **sft: Any) -> Config:
    return Config.from_dict(
        {
            "experiment": {"mode": "sft"},
            "data": {"sources": [{"name": "mine", "type": "local", "path": str(path)}], "val_ratio": 0.2,
                     "test_ratio": 0.2},
            "sft": sft,
        }
    )  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def qwen_tokenizer(tokenizer: Any) -> Any:
    """The tiny tokenizer with Qwen2.5-Instruct's real chat template (no {% generation %} markers)."""
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (FIXTURES / "qwen25_chat_template.jinja").read_text(encoding="utf-8")
    return chat


def labelled(tokenizer: Any, example: Encoded) -> list[str]:
    """The decoded runs of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


# ---- data -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_alpaca_records_load_from_every_local_format(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame(alpaca_rows(30))
    path = tmp_path / f"data{suffix}"
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True, force_ascii=False),
     ".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path)}[suffix]()  # fmt: skip
    config = config_for(path)
    data = prepare_instructions(config.data, config.sft, 42)
    assert data.summary["sources"][0]["format"] == "alpaca"
    everything = pd.concat([data.splits.get(s) for s in ("train", "validation", "test")])
    first = everything.set_index("id").loc["mine:0", "messages"]
    assert first == [{"role": "user", "content": "把数字0写成中文", "input": "例0"},
                     {"role": "assistant", "content": "答案0"}]  # fmt: skip
    assert len(everything) == 30


def test_messages_records_load_multi_turn_with_roles_kept(tmp_path: Path) -> None:
    rows = [{"messages": [*CONVERSATION[:3], {"role": "user", "content": f"问题{i}"},
                          {"role": "assistant", "content": f"回答{i}"}]} for i in range(20)]  # fmt: skip
    config = config_for(write_jsonl(tmp_path / "chat.jsonl", rows))
    data = prepare_instructions(config.data, config.sft, 42)
    assert data.summary["sources"][0]["format"] == "messages"
    assert data.summary["answers_per_record"] == {"max": 2, "multi_turn_records": 20}
    assert [t["role"] for t in data.splits.train["messages"].iat[0]] == ["system", "user", "assistant", "user",
                                                                         "assistant"]  # fmt: skip


def test_a_save_to_disk_folder_keeps_its_own_test_split(tmp_path: Path) -> None:
    import datasets

    parts = {"train": alpaca_rows(40), "dev": alpaca_rows(50)[40:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(tmp_path / "ds")
    config = Config.from_dict(
        {
            "experiment": {"mode": "sft"},
            "data": {"sources": [{"name": "hubcopy", "type": "local", "path": str(tmp_path / "ds"),
                                  "splits": {"train": "train", "test": "dev"}}]},
        }
    )  # fmt: skip
    data = prepare_instructions(config.data, config.sft, 0)
    assert len(data.splits.test) == 10
    assert {m[1]["content"] for m in data.splits.test["messages"]} == {f"答案{i}" for i in range(40, 50)}
    assert len(data.splits.train) + len(data.splits.validation) == 40


def test_cleaning_counts_duplicates_and_empty_answers(tmp_path: Path) -> None:
    rows = alpaca_rows(30)
    rows += [dict(rows[0]), dict(rows[1])]  # exact duplicates
    rows += [{**rows[2], "input": "例 2！"}]  # the same after NFKC and folding white space and punctuation
    rows += [{"instruction": "空的回答", "output": "   "}, {"instruction": "", "output": "没有指令"}]
    config = config_for(write_jsonl(tmp_path / "d.jsonl", rows))
    data = prepare_instructions(config.data, config.sft, 0)
    assert data.summary["removed"] == {"no_answer": 0, "empty_instruction": 1, "empty_answer": 1, "duplicates": 2,
                                       "near_duplicates": 1}  # fmt: skip
    assert data.summary["rows_read"] == 35 and data.summary["rows_after_cleaning"] == 30
    config.data.dedupe_normalized = False
    assert "near_duplicates" not in prepare_instructions(config.data, config.sft, 0).summary["removed"]


def test_splits_never_share_a_prompt_and_are_seeded(tmp_path: Path) -> None:
    rows = [{"instruction": f"问题{i % 25}", "output": f"回答{i}"} for i in range(100)]  # 4 answers per prompt
    config = config_for(write_jsonl(tmp_path / "d.jsonl", rows))
    data = prepare_instructions(config.data, config.sft, 7)
    keys = {name: set(prompt_keys(data.splits.get(name))) for name in ("train", "validation", "test")}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert data.summary["cross_split_overlap"] == 0
    again = prepare_instructions(config.data, config.sft, 7)
    other = prepare_instructions(config.data, config.sft, 8)
    assert again.summary["fingerprint"] == data.summary["fingerprint"] != other.summary["fingerprint"]


def run_exit(tmp_path: Path, rows: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], *settings: str) -> str:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"experiment: {{mode: sft}}\ndata: {{sources: [{{name: mine, type: local, path: {path}}}]}}\n",
        encoding="utf-8",
    )
    args = ["run", "--config", str(config), "--output-dir", str(tmp_path / "out"), *sets(*settings)]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_records_missing_the_answer_are_counted_with_their_line_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows: list[dict[str, Any]] = alpaca_rows(8)
    del rows[2]["output"], rows[5]["output"]
    err = run_exit(tmp_path, rows, capsys)
    assert "2 of 8 records have no 'output'" in err and "(line 3, line 6)" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("run_*/models"))


def test_records_missing_the_instruction_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[dict[str, Any]] = alpaca_rows(4)
    rows[0]["instruction"] = None
    assert "1 of 4 records have no 'instruction'" in run_exit(tmp_path, rows, capsys)


def test_unknown_roles_are_refused_with_their_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"messages": ALPACA}] * 3 + [
        {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}
    ]
    err = run_exit(tmp_path, rows, capsys)
    assert "1 of 4 records have messages with unknown roles 'gpt', 'human'" in err and "(line 4)" in err


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_exit(tmp_path, alpaca_rows(30), capsys, "sft.prompt_format=chat_template")
    assert "sft.prompt_format is chat_template but the tokenizer" in err and "has no chat template" in err


def test_the_bundled_instruction_set_is_built_offline() -> None:
    config = load_config("instruction_sft_tiny", ["data.max_samples=40"])
    data = prepare_instructions(config.data, config.sft, 42)
    answers = {m[-1]["content"] for m in data.splits.train["messages"]}
    assert {"正面", "负面"} & answers and data.summary["rows_after_sampling"] == 40


# ---- prompts and labels -----------------------------------------------------------------------------------------


def test_template_labels_only_the_answers_each_ending_with_eos(tokenizer: Any) -> None:
    prompter = Prompter(tokenizer, resolve_format(tokenizer, SftConfig(), "tiny"))
    assert prompter.format.kind == "template" and prompter.format.stop_token == "<|im_end|>"
    (example,) = prompter.encode(ALPACA)
    assert labelled(tokenizer, example) == ["负面<|im_end|>"]
    assert tokenizer.decode(example.input_ids).startswith("### 指令:\n判断情感\n\n### 输入:\n房间太小了\n\n### 回答:\n")
    (example,) = prompter.encode(CONVERSATION)
    assert labelled(tokenizer, example) == ["房间很干净。<|im_end|>", "早餐一般。<|im_end|>"]


@pytest.mark.parametrize("kind", ["template", "chat_template"])
def test_the_training_prompt_is_token_for_token_the_generation_prompt(
    tokenizer: Any, qwen_tokenizer: Any, kind: str
) -> None:
    tok = tokenizer if kind == "template" else qwen_tokenizer
    prompter = Prompter(tok, resolve_format(tok, SftConfig(), "tiny"))
    assert prompter.format.kind == kind
    for conversation in (ALPACA, CONVERSATION):
        (example,) = prompter.encode(conversation)
        for i, turn in enumerate(conversation):
            if turn["role"] == "assistant":
                prompt = prompter.prompt_ids(conversation[:i])
                assert example.input_ids[: len(prompt)] == prompt
                assert example.labels[len(prompt) - 1] == IGNORE and example.labels[len(prompt)] != IGNORE
    if kind == "chat_template":  # and byte for byte the text the tokenizer's own template renders
        text = tok.apply_chat_template(
            [{"role": "user", "content": "判断情感\n\n房间太小了"}], tokenize=False, add_generation_prompt=True
        )
        assert tok.decode(prompter.prompt_ids(ALPACA[:1])).encode() == text.encode()


def test_a_real_qwen_template_labels_each_assistant_turn_through_im_end(qwen_tokenizer: Any) -> None:
    prompter = Prompter(qwen_tokenizer, resolve_format(qwen_tokenizer, SftConfig(), "qwen"))
    assert prompter.format.stop_token == "<|im_end|>"
    (example,) = prompter.encode(CONVERSATION)
    assert labelled(qwen_tokenizer, example) == ["房间很干净。<|im_end|>", "早餐一般。<|im_end|>"]


def test_a_template_that_renders_history_differently_gets_one_example_per_turn(qwen_tokenizer: Any) -> None:
    # The generation prompt opens an empty reasoning block that earlier answers lose in the history (as Qwen3's
    # template does with enable_thinking=False): no generation prompt is a prefix of the whole conversation.
    qwen_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think></think>"
        "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "<think></think>{% endif %}"
    )
    prompter = Prompter(qwen_tokenizer, resolve_format(qwen_tokenizer, SftConfig(), "odd"))
    examples = prompter.encode(CONVERSATION)
    assert [labelled(qwen_tokenizer, e) for e in examples] == [["房间很干净。<|im_end|>"], ["早餐一般。<|im_end|>"]]
    assert prompter.counts.per_turn_examples == 1


def test_keep_answer_truncation_cuts_the_prompt_and_counts_it(tokenizer: Any) -> None:
    prompter = Prompter(tokenizer, resolve_format(tokenizer, SftConfig(), "tiny"))
    long = [{"role": "user", "content": "判断情感", "input": "房间太小了。" * 40}, ALPACA[1]]
    (example,) = prompter.encode(long)
    fitted = prompter.fit(example, 32, "keep_answer")
    assert fitted is not None and len(fitted.input_ids) == 32
    assert labelled(tokenizer, fitted) == ["负面<|im_end|>"]  # the whole answer, at the end
    counts = prompter.counts
    assert counts.truncated == 1 and counts.prompt_tokens_cut == len(example.input_ids) - 32
    assert counts.answer_tokens_cut == counts.dropped == 0


def test_right_truncation_drops_an_answer_cut_away_and_counts_it(tokenizer: Any) -> None:
    prompter = Prompter(tokenizer, resolve_format(tokenizer, SftConfig(), "tiny"))
    long = [{"role": "user", "content": "判断情感", "input": "房间太小了。" * 40}, ALPACA[1]]
    (example,) = prompter.encode(long)
    assert prompter.fit(example, 32, "right") is None
    answer_tokens = sum(label != IGNORE for label in example.labels)  # 负面 and <|im_end|>
    assert prompter.counts.dropped == 1 and prompter.counts.answer_tokens_cut == answer_tokens


def test_when_truncation_cuts_every_answer_the_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"instruction": "很长的问题" * 30 + str(i), "output": f"回答{i}"} for i in range(30)]
    err = run_exit(tmp_path, rows, capsys, "sft.truncation=right", "training.max_length=16")
    assert "every train example lost its whole answer to truncation (22 of 22)" in err


def test_batches_pad_to_their_longest_example_and_packing_gives_the_same_loss(tokenizer: Any) -> None:
    from qlora_pipeline.sft import recipe

    config = load_config("instruction_sft_tiny", ["training.lora_dropout=0"])
    tuned = recipe.setup(config, 42)
    prompter = tuned.prompter()
    rows = []
    for text in ("短", "长一点的评论，" * 5, "中等长度的评论"):
        (example,) = prompter.encode([{"role": "user", "content": "判断情感", "input": text}, ALPACA[1]])
        rows.append({"input_ids": example.input_ids, "attention_mask": [1] * len(example.input_ids),
                     "labels": example.labels})  # fmt: skip
    padded = recipe.collator(tuned, packing=False)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert padded["input_ids"].shape == (3, longest) < (3, config.training.max_length)
    assert (padded["labels"][padded["attention_mask"] == 0] == IGNORE).all()
    packed = recipe.collator(tuned, packing=True)(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    model = tuned.loaded.model
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), abs=1e-5)


# ---- metrics and config -----------------------------------------------------------------------------------------


def test_rouge_l_reads_chinese_characters_and_matches_the_lcs_definition() -> None:
    assert rouge_tokens("房间很干净, Very CLEAN!") == ["房", "间", "很", "干", "净", "very", "clean"]
    # LCS of 房间干净 and 房间很干净 is 4: precision 4/5, recall 4/4.
    assert rouge_l(rouge_tokens("房间干净"), rouge_tokens("房间很干净")) == pytest.approx(2 * 0.8 / 1.8)
    assert rouge_l([], ["a"]) == 0.0


def test_reference_scores_are_chinese_aware_and_exact_match_ignores_edge_punctuation() -> None:
    assert normalize_answer(" 正面。") == normalize_answer("正面") == "正面"
    scores = reference_scores(["房间很干净，服务也不错。", "负面"], ["房间干净，服务很好。", "负面。"])
    assert scores["n"] == 2 and scores["exact_match"] == 0.5
    assert scores["bleu"] > 0 and scores["chrf"] > 0 and scores["rouge_l"] > 0  # unsegmented Chinese still scores
    perfect = reference_scores(["房间很干净。"], ["房间很干净。"])
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(100)


def test_early_stopping_in_sft_mode_must_watch_the_validation_loss() -> None:
    with pytest.raises(ConfigError, match="training.early_stopping_metric must be 'loss' in experiment.mode sft"):
        Config.from_dict({"experiment": {"mode": "sft"}, "training": {"eval_steps": 2, "early_stopping_patience": 1}})


def test_prompt_templates_must_name_their_fields() -> None:
    with pytest.raises(ConfigError, match=r"sft.prompt_template must be a template with \{instruction\} and"):
        Config.from_dict({"sft": {"prompt_template": "{instruction}: "}})


def test_a_chat_template_without_an_end_of_turn_token_is_refused(tokenizer: Any) -> None:
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    plain.chat_template += "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(UserError, match="no end-of-turn token"):
        resolve_format(plain, SftConfig(), "plain")


def test_a_messages_cell_that_is_not_a_conversation_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"messages": [json.dumps(ALPACA, ensure_ascii=False), "not json"]}).to_csv(path, index=False)
    config = config_for(path)
    with pytest.raises(DataError, match=r"1 of 2 records have no list of \{role, content\} messages.*\(line 3\)"):
        prepare_instructions(config.data, config.sft, 0)


def test_import_help_and_load_generator_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, qlora_pipeline\n"
        "from qlora_pipeline.cli import build_parser\n"
        "build_parser().format_help(); qlora_pipeline.load_generator; qlora_pipeline.Generator\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_a_fixed_instruction_serves_data_with_only_an_input_and_an_answer(tmp_path: Path) -> None:
    rows = [{"content": f"类型#上衣*颜色#{i}", "summary": f"一件好看的上衣{i}"} for i in range(20)]  # AdvertiseGen-like
    config = config_for(
        write_jsonl(tmp_path / "ads.jsonl", rows),
        instruction="写一段广告文案。",
        input_column="content",
        output_column="summary",
    )
    data = prepare_instructions(config.data, config.sft, 0)
    user, answer = data.splits.train["messages"].iat[0]
    assert (
        user["content"] == "写一段广告文案。"
        and user["input"].startswith("类型#上衣")
        and answer["role"] == "assistant"
    )
    from qlora_pipeline.sft.generation import as_conversation

    # At generation a plain prompt of such a run is the input to the same instruction.
    assert as_conversation("类型#裙", "写一段广告文案。") == [
        {"role": "user", "content": "写一段广告文案。", "input": "类型#裙"}
    ]


def test_data_settings_instruction_records_do_not_use_are_named(tmp_path: Path) -> None:
    config = config_for(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20)))
    assert prepare_instructions(config.data, config.sft, 0).summary["settings_not_applied"] == []
    config.data.lowercase, config.data.balance = True, "upsample"
    summary = prepare_instructions(config.data, config.sft, 0).summary
    assert summary["settings_not_applied"] == ["data.lowercase", "data.balance"]


def test_qlora_check_plans_an_sft_run_and_names_what_would_fail(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "instruction_sft_tiny", "--set", "data.max_samples=60"]) == 0
    out = capsys.readouterr().out
    assert "prompts: template (sft.prompt_format auto); answers end with '<|im_end|>'" in out
    assert "truncation (keep_answer)" in out and out.rstrip().endswith("no run directory was created")
    args = ["check", "instruction_sft_tiny", "--set", "data.max_samples=60", "--set", "sft.truncation=right"]
    assert main([*args, "--set", "training.max_length=16"]) == 2
    assert "every train example loses its whole answer to truncation" in capsys.readouterr().err


def test_one_file_per_split_keeps_each_records_split(tmp_path: Path) -> None:
    """`files:` in mode sft: every record stays in the split its file names (it hit an assert before)."""
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(20))
    test = write_jsonl(
        tmp_path / "test.jsonl", [dict(r, output=f"测试{i}") for i, r in enumerate(alpaca_rows(30)[20:])]
    )
    config = Config.from_dict(
        {
            "experiment": {"mode": "sft"},
            "data": {"sources": [{"name": "mine", "type": "local", "files": {"train": str(train), "test": str(test)}}],
                     "val_ratio": 0.2},
        }
    )  # fmt: skip
    data = prepare_instructions(config.data, config.sft, 0)
    answers = {name: {m[-1]["content"] for m in getattr(data.splits, name)["messages"]} for name in SPLITS}
    assert answers["test"] == {f"测试{i}" for i in range(10)}
    assert answers["train"] | answers["validation"] == {f"答案{i}" for i in range(20)}
    assert len(answers["validation"]) == 4
    assert data.summary["sources"][0]["origin"] == f"train: {train.resolve()}; test: {test.resolve()}"


def test_a_local_file_is_read_with_the_sources_encoding(tmp_path: Path) -> None:
    """`encoding: gbk` is honoured in mode sft and recorded (it was ignored: the file was read as UTF-8)."""
    path = tmp_path / "gbk.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in alpaca_rows(10)).encode("gbk"))
    config = Config.from_dict({**config_for(path).to_dict(), "data": {"sources": [
        {"name": "mine", "type": "local", "path": str(path), "encoding": "gbk"}]}})  # fmt: skip
    data = prepare_instructions(config.data, config.sft, 0)
    answers = {m[-1]["content"] for name in SPLITS for m in getattr(data.splits, name)["messages"]}
    assert answers == {f"答案{i}" for i in range(10)}
    assert data.summary["sources"][0]["encoding"] == "gbk"


@pytest.mark.parametrize("mode", ["sft", "embeddings"])
def test_an_encoding_on_a_save_to_disk_folder_is_refused(tmp_path: Path, mode: str) -> None:
    import datasets

    from qlora_pipeline.data.prepare import prepare_data

    datasets.Dataset.from_list(alpaca_rows(4)).save_to_disk(tmp_path / "ds")
    source = {"name": "mine", "type": "local", "path": str(tmp_path / "ds"), "encoding": "gbk"}
    config = Config.from_dict({"experiment": {"mode": mode}, "data": {"sources": [source]}})
    with pytest.raises(DataError, match=r"encoding is only read for text files, and .* is a folder"):
        if mode == "sft":
            prepare_instructions(config.data, config.sft, 0)
        else:
            prepare_data(config.data, 0)
