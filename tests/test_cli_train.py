"""``sparse-peft train`` end to end on a tiny local model: sft / dpo / sparsepo write an adapter that
PeftModel.from_pretrained loads with the trained outputs, plus a run summary; bad arguments fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sparse_peft.cli import main
from sparse_peft.embedded.toy import tiny_llama
from tests.trl_helpers import preference_dataset, sft_dataset, word_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama(0).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    sft_dataset("prompt_completion").to_json(root / "sft.jsonl")
    sft_dataset("text").to_csv(root / "sft.csv")
    preference_dataset().to_parquet(root / "pairs.parquet")
    return root


@pytest.mark.parametrize(
    "kind, method, data, extra",
    [
        ("sft", "sparse_delta", "sft.jsonl", ["--density", "0.05", "--reselect-every", "2"]),
        ("sft", "sparse_delta", "sft.jsonl", ["--r", "2", "--block-size", "16", "--selection", "magnitude"]),
        ("sft", "s2ft", "sft.csv", ["--r", "2"]),
        ("dpo", "sora", "pairs.parquet", ["--r", "4", "--sparse-lambda", "0.5"]),
        ("sparsepo", "group_sparse_lora", "pairs.parquet", ["--mask-type", "learned", "--mask-l1", "0.1"]),
    ],
)
def test_train_writes_a_loadable_adapter(files, tmp_path, capsys, kind, method, data, extra):
    out = tmp_path / "adapter"
    argv = ["train", kind, "--method", method, "--model", str(files / "model"), "--data", str(files / data)]
    argv += ["--output", str(out), "--steps", "3", "--lr", "0.03", "--batch-size", "4", "--max-length", "16"]
    argv += ["--logging-steps", "1", "--no-progress", *extra]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trainable params" in printed and "peak memory" in printed
    if "--block-size" in extra:  # the flag reaches the saved config
        size = int(extra[extra.index("--block-size") + 1])
        assert json.loads((out / "adapter_config.json").read_text())["block_size"] == size
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and 0 < summary["trainable_params"] < summary["total_params"]
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    if method in ("sora", "group_sparse_lora"):
        assert "sparsity/active_fraction" in summary["statistics"]
    if kind == "sparsepo":
        assert "mask/density" in summary["statistics"] and (out / "sparsepo_masks.pt").is_file()
    base = AutoModelForCausalLM.from_pretrained(files / "model")
    ids = torch.randint(5, 45, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        after = loaded(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the saved adapter carries the training


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "sft", "--method", "sora", "--density", "0.1"],
            "--density applies to --method sparse_delta",
        ),
        (["train", "sft", "--method", "sora", "--selection", "magnitude"], "--selection magnitude"),
        (["train", "sft", "--r", "4", "--density", "0.1"], "not both"),
        (["train", "sft", "--method", "sora", "--block-size", "16"], "--block-size applies to --method sparse_delta"),
        (["train", "sft", "--block-size", "16", "--reselect-every", "2"], "use `block_size=1`"),
        (["train", "sft", "--data", "missing.jsonl"], "no such file"),
        (["train", "dpo", "--data", "{sft}"], "'chosen' and 'rejected'"),
        (["train", "sft", "--data", "{pairs}"], "'text', 'messages'"),
        (
            ["train", "sparsepo", "--data", "{pairs}", "--mask-type", "learned", "--mask-threshold", "0.5"],
            "mask_type='activation' only",
        ),
    ],
)
def test_bad_arguments_are_clear_errors(files, capsys, argv, message):
    argv = [a.format(sft=files / "sft.jsonl", pairs=files / "pairs.parquet") for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(files / "sft.jsonl")]
    argv += ["--model", str(files / "model")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "error"),
        (["train", "ppo"], "error"),
        (["train", "sft", "--steps", "0", "--data", "x"], "error"),
        (["train", "sparsepo", "--mask-threshold", "1.5", "--data", "x"], "--mask-threshold: must be in [0, 1)"),
    ],
)
def test_argparse_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--method",
        "--model",
        "--data",
        "--output",
        "--r",
        "--density",
        "--mask-type",
        "--mask-threshold",
        "--beta",
        "--steps",
    ):
        assert option in text
