"""The training loop and the `train` command on a tiny random Llama: loss falls, output is plain PEFT."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from server.train.__main__ import main
from server.train.command import add_train_arguments
from server.train.data import Example, encode_all, pad_id_of
from server.train.evaluate import mean_loss
from server.train.trainer import TrainConfig, parse_targets, train, wrap_with_lora

OVERFIT = [Example(f"Input: item {i}\nOutput:", f" answer {i % 3}") for i in range(4)]


def test_loss_decreases_on_a_tiny_overfit_set(tiny_base):
    tokenizer = tiny_base.tokenizer
    data, _ = encode_all(OVERFIT, tokenizer, max_length=32)
    config = TrainConfig(rank=4, alpha=8, lr=2e-2, epochs=10, batch_size=2, seed=0)
    model = wrap_with_lora(tiny_base.model, config)
    before = mean_loss(model, data, pad_id_of(tokenizer))
    stats = train(model, data, config, pad_id_of(tokenizer), progress=False)
    after = mean_loss(model, data, pad_id_of(tokenizer))
    assert stats.steps == 20 and stats.last_loss < stats.first_loss
    assert after < 0.8 * before


def test_base_weights_stay_frozen(tiny_base):
    tokenizer = tiny_base.tokenizer
    frozen = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    data, _ = encode_all(OVERFIT, tokenizer, max_length=32)
    model = wrap_with_lora(tiny_base.model, TrainConfig(rank=4, epochs=1, targets=["q_proj", "v_proj"]))
    train(model, data, TrainConfig(rank=4, epochs=1), pad_id_of(tokenizer), progress=False)
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, frozen[key]), name


def test_parse_targets():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in examples))
    return path


def test_command_writes_a_standard_peft_folder(tiny_model_dir: Path, tiny_base, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", OVERFIT)
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    code = main([str(data), "--output", str(out), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--epochs", "2", "--batch-size", "2",
                 "--eval", str(data), "--report", str(report), "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "loraplex.json"]
    contract = json.loads((out / "loraplex.json").read_text())
    assert contract["defaults"]["temperature"] == 0 and contract["description"].endswith("train.jsonl")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == tiny_model_dir.name
    saved = load_file(out / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_base.model, out)
    state = loaded.state_dict()
    assert saved and all(torch.equal(v, state[k.replace(".weight", ".default.weight")]) for k, v in saved.items())
    result = json.loads(report.read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["mean_loss"] > 0 and result["examples"] == 4
    assert "rank 4" in (out / "README.md").read_text()  # our card, not PEFT's
    assert '"accuracy"' in capsys.readouterr().out


def test_command_rejects_bad_input(tiny_model_dir: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no completion"}\n')
    code = main([str(bad), "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--no-progress"])
    assert code == 2 and "bad.jsonl:1" in capsys.readouterr().err
    assert main([str(bad), "--output", str(tmp_path / "out"), "--rank", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_arguments_have_documented_defaults():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["data.jsonl", "-o", "out"])
    assert (args.rank, args.targets, args.model, args.device, args.eval) == (8, "all-linear", None, None, None)


def test_the_epoch_loss_is_the_mean_per_completion_token(tiny_base):
    """The one figure the bar, the epoch line and the summary show: with the weights (almost) unchanged it
    equals the held-out definition (`mean_loss`) over the same data, whatever the batch sizes."""
    tokenizer = tiny_base.tokenizer
    uneven = OVERFIT + [Example("Input: a much longer prompt with more words\nOutput:", " a longer answer here")]
    data, _ = encode_all(uneven, tokenizer, max_length=48)
    config = TrainConfig(rank=4, alpha=8, lr=1e-12, epochs=1, batch_size=2, seed=0)
    model = wrap_with_lora(tiny_base.model, config)
    expected = mean_loss(model, data, pad_id_of(tokenizer))
    lines: list[str] = []
    stats = train(model, data, config, pad_id_of(tokenizer), progress=False, log=lines.append)
    assert abs(stats.train_losses[0] - expected) < 1e-4
    assert lines == [f"epoch 1/1: train loss {stats.last_loss:.4f}"]


def test_early_stopping_keeps_the_best_epoch(tiny_base):
    """Held-out answers the training set contradicts: the held-out loss rises, training stops and the
    weights of the best epoch are restored."""
    tokenizer = tiny_base.tokenizer
    data, _ = encode_all(OVERFIT, tokenizer, max_length=32)
    contrary = [Example(e.prompt, " something else entirely") for e in OVERFIT]
    held, _ = encode_all(contrary, tokenizer, max_length=32)
    config = TrainConfig(rank=4, alpha=8, lr=2e-2, epochs=12, batch_size=2, seed=0, patience=2)
    model = wrap_with_lora(tiny_base.model, config)
    lines: list[str] = []
    stats = train(model, data, config, pad_id_of(tokenizer), progress=False, held_out=held, log=lines.append)
    assert stats.stopped_early and len(stats.held_out_losses) < 12
    assert stats.held_out_loss == min(stats.held_out_losses)
    assert abs(mean_loss(model, held, pad_id_of(tokenizer)) - stats.held_out_loss) < 1e-4  # best weights restored
    assert lines[-1].startswith("early stop") and f"keeping epoch {stats.best_epoch}" in lines[-1]
