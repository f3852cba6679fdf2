"""The embedded default: the docstring corpus, the tokenizer, the cached deterministic base-model build, the
skills datasets and their splits, and the exact-match evaluator."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from sparse_peft.embedded import SKILLS, completion_batch, skill_dataset, skill_examples
from sparse_peft.embedded.base_model import BaseModelRecipe, tiny_model_path, train_tokenizer
from sparse_peft.embedded.corpus import corpus_fingerprint, docstring_corpus
from sparse_peft.embedded.skills import split_of

MICRO = BaseModelRecipe(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, seq_len=32, batch_size=4, steps=3, warmup_steps=1,
)
"""A recipe that builds in about a second: the build machinery, not the model's quality."""


@pytest.fixture(scope="module")
def corpus():
    return docstring_corpus()


def test_corpus_is_large_fixed_and_has_digits(corpus):
    assert len(corpus) > 1000 and sum(map(len, corpus)) > 200_000
    assert docstring_corpus() == corpus and corpus_fingerprint(corpus) == corpus_fingerprint(list(corpus))
    text = "\n".join(corpus)
    assert ">>>" in text and sum(c.isdigit() for c in text) > 1000


def test_corpus_does_not_depend_on_what_the_process_patched(monkeypatch, corpus):
    """Libraries patch the stdlib (transformers adds methods to ``logging.Logger``, pytest replaces
    ``threading.excepthook``); the corpus, and so the model's cache key, must be the same in every process."""
    from sparse_peft.embedded import corpus as corpus_module

    def warn_once(self, msg):
        """A docstring that only this process would see."""

    monkeypatch.setattr("logging.Logger.warn_once", warn_once, raising=False)
    corpus_module._docstrings_in_fresh_interpreter.cache_clear()
    fresh = docstring_corpus()
    assert fresh == corpus and "A docstring that only this process would see." not in fresh
    assert all(not doc.startswith("This method is identical to `logger.warning()`") for doc in fresh)


def test_tokenizer_spells_digits_and_is_deterministic(corpus):
    tok = train_tokenizer(corpus[:300], 400)
    assert tok.get_vocab() == train_tokenizer(corpus[:300], 400).get_vocab()
    ids = tok("37 + 48 =")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert [t.lstrip("Ġ") for t in tok.convert_ids_to_tokens(ids[1:]) if t.lstrip("Ġ").isdigit()] == list("3748")
    for prompt, completion in (skill_examples(name, "test", 3)[0] for name in SKILLS):
        text = prompt + completion
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_build_is_cached_reproducible_and_keyed(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path / "a"))
    first = tiny_model_path(MICRO, progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "build.json"):
        assert (first / name).is_file(), name
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path(MICRO, progress=False) == first  # cached: not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path / "b"))
    (tmp_path / "b" / f"{first.name}.partial").mkdir(parents=True)  # a build interrupted earlier is ignored
    second = tiny_model_path(MICRO, progress=False)
    assert second.name == first.name
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    other = BaseModelRecipe(**{**MICRO.__dict__, "seed": 1})
    assert other.key(corpus) != MICRO.key(corpus)


def test_concurrent_callers_share_one_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_PEFT_CACHE", str(tmp_path))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_path(MICRO, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and not list(tmp_path.glob("*.partial"))


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
    for prompt, completion in skill_examples("add", "test", 50):
        a, b = prompt.removesuffix(" =").split(" + ")
        assert int(completion) == int(a) + int(b) and completion.startswith(" ")
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
    with pytest.raises(ValueError, match="unknown skill 'sum'.*add"):
        skill_examples("sum")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        skill_examples("add", "dev")
    with pytest.raises(ValueError, match="fewer than 100000 distinct"):
        skill_examples("add", "test", 100_000)
    with pytest.raises(ValueError, match="unknown kind"):
        skill_dataset("add", kind="dpo")


def test_completion_batch_labels_only_the_answer(corpus):
    tok = train_tokenizer(corpus[:300], 400)
    pairs = skill_examples("date", "train", 3)
    batch = completion_batch(tok, pairs)
    for row, (prompt, completion) in enumerate(pairs):
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labels == tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch["attention_mask"][row].sum() == len(tok(prompt)["input_ids"]) + len(labels)
