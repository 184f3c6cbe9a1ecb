"""The tiny built-in checkpoint and the one model loader, on CPU, offline."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TEXTS, cfg, forward, quantized_bytes

from qlora_pipeline.errors import UserError
from qlora_pipeline.models.device import cpu_threads
from qlora_pipeline.models.loading import LoadedModel, load_model
from qlora_pipeline.models.tiny import build_tiny_qwen3, ensure_tiny_qwen3, resolve_model_path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's isolated cache (tests/conftest.py sets QLORA_CACHE_DIR), else a private one."""
    return Path(os.environ.get("QLORA_CACHE_DIR") or tmp_path_factory.mktemp("qlora_cache"))


def go_offline(mp: pytest.MonkeyPatch, cache_dir: Path) -> None:
    import huggingface_hub.constants

    mp.setenv("QLORA_CACHE_DIR", str(cache_dir))
    mp.setenv("HF_HUB_OFFLINE", "1")  # for subprocesses; huggingface_hub read it once, at import:
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _offline(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch, cache_dir)


@pytest.fixture(scope="session")
def loaded_4bit(cache_dir: Path) -> LoadedModel:
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp, cache_dir)
        return load_model(cfg(device="cpu"), task="encoder")


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    first = digests(build_tiny_qwen3(tmp_path / "a"))
    assert first == digests(build_tiny_qwen3(tmp_path / "b"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(first)


def test_build_keeps_an_existing_checkpoint(tmp_path: Path) -> None:
    target = build_tiny_qwen3(tmp_path / "m")
    before = digests(target)
    build_tiny_qwen3(target)  # a racing builder finishing second discards its copy
    assert digests(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind


def test_saved_weights_load_back_unchanged() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = ensure_tiny_qwen3()
    saved = load_file(path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_tokenizer_gives_chinese_characters_their_own_tokens() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_qwen3())
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == (
        "<|endoftext|>",
        "<|im_end|>",
        "right",
    )
    assert 4000 <= len(tokenizer) <= 8000
    ids = tokenizer("好书")["input_ids"]
    assert len(ids) <= 2 and tokenizer.decode(ids) == "好书"


def test_resolve_builtin_local_dir_and_hub_id(tmp_path: Path) -> None:
    assert resolve_model_path("builtin:tiny-qwen3") == str(ensure_tiny_qwen3())
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("Qwen/Qwen3-Embedding-0.6B") == "Qwen/Qwen3-Embedding-0.6B"


def test_unknown_builtin_lists_the_builtins() -> None:
    with pytest.raises(UserError, match="builtin:tiny-qwen3"):
        resolve_model_path("builtin:huge-qwen")


def test_4bit_load_has_nf4_linear4bit_layers(loaded_4bit: LoadedModel) -> None:
    import bitsandbytes as bnb

    linears = [m for m in loaded_4bit.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert {m.weight.quant_state.quant_type for m in linears} == {"nf4"}  # type: ignore[attr-defined]
    assert all(m.weight.dtype == torch.uint8 for m in linears)
    assert (loaded_4bit.quantization, loaded_4bit.compute_dtype, loaded_4bit.device) == ("4bit-nf4", "float32", "cpu")


def test_4bit_forward_gives_hidden_states(loaded_4bit: LoadedModel) -> None:
    hidden = forward(loaded_4bit)
    assert hidden.shape[0] == len(TEXTS) and hidden.shape[-1] == loaded_4bit.model.config.hidden_size == 128
    assert torch.isfinite(hidden).all()


def test_forward_leaves_the_quantized_weights_untouched() -> None:
    loaded = load_model(cfg(device="cpu"))
    before = quantized_bytes(loaded.model)
    first = forward(loaded)
    assert quantized_bytes(loaded.model) == before
    assert torch.equal(forward(loaded), first)


def test_loading_is_deterministic_in_process(loaded_4bit: LoadedModel) -> None:
    again = load_model(cfg(device="cpu"))
    assert quantized_bytes(again.model) == quantized_bytes(loaded_4bit.model)
    assert torch.equal(forward(again), forward(loaded_4bit))


def test_loading_is_deterministic_across_processes(loaded_4bit: LoadedModel, cache_dir: Path) -> None:
    script = (
        "import hashlib, sys, torch\n"
        "sys.path.insert(0, sys.argv[1] + '/tests')\n"
        "from helpers import cfg, forward, quantized_bytes\n"
        "from qlora_pipeline.models.loading import load_model\n"
        "m = load_model(cfg(device='cpu'))\n"
        "print(hashlib.sha256(quantized_bytes(m.model)).hexdigest())\n"
        "print(hashlib.sha256(forward(m).numpy().tobytes()).hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "QLORA_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}  # set by _offline too
    out = subprocess.run(
        [sys.executable, "-c", script, str(root)], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    expected = [
        hashlib.sha256(quantized_bytes(loaded_4bit.model)).hexdigest(),
        hashlib.sha256(forward(loaded_4bit).numpy().tobytes()).hexdigest(),
    ]
    assert out.stdout.split() == expected


def test_no_quantization_loads_plain_linear() -> None:
    loaded = load_model(cfg(quantization="none", device="cpu"))
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    assert loaded.quantization == "none"


def test_8bit_loads_linear8bitlt_on_cpu() -> None:
    import bitsandbytes as bnb

    loaded = load_model(cfg(quantization="8bit", device="cpu"))
    assert loaded.quantization == "8bit"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in loaded.model.modules())


def test_sequence_classification_head_is_seeded_and_pads() -> None:
    a = load_model(cfg(device="cpu"), task="sequence_classification", num_labels=2)
    b = load_model(cfg(device="cpu"), task="sequence_classification", num_labels=2)
    assert torch.equal(a.model.score.weight, b.model.score.weight)
    assert a.model.config.pad_token_id == a.tokenizer.pad_token_id
    batch = a.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert a.model(**batch).logits.shape == (len(TEXTS), 2)


def test_unknown_local_path_names_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UserError, match="no-such-model") as info:
        load_model(cfg(name_or_path=missing, device="cpu"))
    assert "builtin:tiny-qwen3" in str(info.value)


def test_offline_unknown_hub_id_is_a_user_error() -> None:
    with pytest.raises(UserError, match="acme/not-a-model") as info:
        load_model(cfg(name_or_path="acme/not-a-model", device="cpu"))
    assert isinstance(info.value.__cause__, OSError)


def test_explicit_4bit_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import qlora_pipeline.models.loading as loading

    monkeypatch.setattr(loading, "bitsandbytes_problem", lambda device: "bitsandbytes is not installed")
    with pytest.raises(UserError, match="'4bit'"):
        load_model(cfg(device="cpu"))
    auto = load_model(cfg(quantization="auto", device="cpu"))
    assert auto.quantization == "none" and any("auto → none" in note for note in auto.notes)


def test_cpu_threads_applies_inside_and_restores_after_even_on_error() -> None:
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    with pytest.raises(RuntimeError, match="inside"), cpu_threads(wanted):
        assert torch.get_num_threads() == wanted
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
