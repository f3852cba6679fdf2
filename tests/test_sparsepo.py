"""SparsePOTrainer: equals DPO's sigmoid loss with all-ones masks and no KL; trains every adapter type with both
mask variants; masks are sane; learned masks are optimised and saved; bad configs fail clearly."""

from __future__ import annotations

import pytest
import torch
import trl
from sparse_peft.trainers import SparsePOConfig, SparsePOTrainer, activation_mask

from sparse_peft.embedded.toy import tiny_llama
from tests.trl_helpers import (
    SPARSE_METHODS,
    TRAIN_ARGS,
    adapter_configs,
    assert_only_adapter_changed,
    preference_dataset,
    snapshot,
    word_tokenizer,
)

COMMON = {**TRAIN_ARGS, "max_length": 16}


def make(tmp_path, method: str = "sora", **config) -> SparsePOTrainer:
    settings = {
        **COMMON,
        **config,
    }  # s2ft: see test_trl_trainers
    return SparsePOTrainer(
        model=tiny_llama(0),
        args=SparsePOConfig(output_dir=str(tmp_path), **settings),
        train_dataset=preference_dataset(),
        processing_class=word_tokenizer(),
        peft_config=adapter_configs()[method],
    )


def batch_of(trainer: SparsePOTrainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def test_all_ones_masks_without_kl_equal_dpo_sigmoid_loss(tmp_path):
    trainer = make(tmp_path, "sparse_delta", mask_type="ones", use_kl=False, bf16=False, max_steps=2)
    trainer.train()  # move the adapter away from the reference so the loss is not log 2
    batch = batch_of(trainer)
    model = trainer.model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        margins = trainer._metrics["eval"]["rewards/margins"][-1]
        dpo = trl.DPOTrainer._compute_loss(trainer, model, batch, False)  # TRL's own loss, same batch
        dpo_margins = trainer._metrics["eval"]["rewards/margins"][-1]
    assert abs(ours.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4
    torch.testing.assert_close(ours, dpo, rtol=1e-5, atol=1e-6)
    assert margins == pytest.approx(dpo_margins, rel=1e-4, abs=1e-6)


def test_kl_and_activation_masks_change_the_loss(tmp_path):
    trainer = make(tmp_path, "sparse_delta", mask_type="activation", bf16=False, max_steps=2)
    trainer.train()
    batch = batch_of(trainer)
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)
        dpo = trl.DPOTrainer._compute_loss(trainer, trainer.model, batch, False)
    assert torch.isfinite(ours) and not torch.allclose(ours, dpo)
    density = trainer._metrics["eval"]["mask/density"][-1]
    assert 0 < density < 1


def test_activation_mask_is_scaled_per_completion():
    torch.manual_seed(0)
    hidden = tuple(torch.randn(3, 7, 5) for _ in range(3))
    completion = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]).float()
    mask = activation_mask(hidden, completion)
    assert mask.shape == completion.shape and not mask.requires_grad
    assert torch.all(mask[completion == 0] == 0)
    for row, keep in zip(mask, completion.bool(), strict=True):
        assert row[keep].min().item() == 0.0 and row[keep].max().item() == pytest.approx(1.0)


def test_activation_mask_threshold_zeroes_the_weights_below_it_and_keeps_the_rest():
    torch.manual_seed(0)
    hidden = tuple(torch.randn(2, 12, 5) for _ in range(3))
    completion = torch.ones(2, 11)
    dense = activation_mask(hidden, completion)
    sparse = activation_mask(hidden, completion, threshold=0.5)
    assert torch.equal(sparse, torch.where(dense >= 0.5, dense, torch.zeros_like(dense)))
    assert 0 < (sparse > 0).float().mean() < (dense > 0).float().mean()


@pytest.mark.parametrize("method", [*SPARSE_METHODS, "lora"])
def test_sparsepo_trains_every_adapter(tmp_path, method):
    mask = "learned" if method in ("sora", "s2ft", "lora") else "activation"
    sharing = "independent" if method == "s2ft" else "shared"
    trainer = make(tmp_path, method, mask_type=mask, mask_sharing=sharing, mask_l1_reward=0.1, mask_l1_kl=0.1)
    before = snapshot(trainer.model)
    nets = {n: p.detach().clone() for n, p in trainer.mask_networks.named_parameters()}
    trainer.train()
    assert_only_adapter_changed(before, snapshot(trainer.model), "default")
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    for key in (
        "mask/density",
        "mask/chosen_mean",
        "mask/rejected_mean",
        "rewards/margins",
        "rewards/accuracies",
    ):
        assert key in logs and torch.isfinite(torch.tensor(logs[key])), key
    if mask == "learned":
        assert len(trainer.mask_networks) == (2 if sharing == "independent" else 1)
        assert any(not torch.equal(p, nets[n]) for n, p in trainer.mask_networks.named_parameters())
        if sharing == "independent":
            assert "mask/kl_density" in logs
        trainer.save_model(str(tmp_path / "out"))
        saved = torch.load(tmp_path / "out" / "sparsepo_masks.pt")
        assert set(saved) == set(trainer.mask_networks.state_dict())
    if method in ("sora", "group_sparse_lora"):
        assert "sparsity/active_fraction" in logs  # SparseUpdateCallback runs under SparsePOTrainer too


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"mask_type": "attention"}, "mask_type"),
        ({"mask_sharing": "both"}, "mask_sharing"),
        ({"loss_type": "ipo"}, "loss_type"),
        ({"mask_l1_reward": -1.0}, ">= 0"),
        ({"mask_threshold": 1.0}, r"mask_threshold must be in \[0, 1\)"),
        ({"mask_type": "learned", "mask_threshold": 0.5}, "activation"),
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        SparsePOConfig(output_dir=str(tmp_path), use_cpu=True, **bad)


def test_needs_its_config(tmp_path):
    with pytest.raises(TypeError, match="SparsePOConfig"):
        SparsePOTrainer(
            model=tiny_llama(0),
            args=trl.DPOConfig(output_dir=str(tmp_path), **COMMON),
            train_dataset=preference_dataset(),
            processing_class=word_tokenizer(),
            peft_config=adapter_configs()["sora"],
        )


def test_benchmark_section_renders_the_committed_results():
    import json
    from pathlib import Path

    from benchmarks import sparsepo

    data = json.loads((Path(__file__).resolve().parents[1] / "docs/sparsepo.json").read_text())
    text = sparsepo.render(data)
    assert data["command"] in text and data["machine"] in text and data["date"] in text
    for method in sparsepo.METHODS:
        assert f"| {method} |" in text
    assert text in sparsepo.DOC.read_text()  # docs/sparsepo.md shows the committed figures


def test_resuming_a_learned_mask_run_equals_the_uninterrupted_run(tmp_path):
    """Adapter, learned mask networks and their optimizer state come back from the checkpoint: resuming at step 2 of
    4 ends exactly where the uninterrupted run ends."""
    settings = {
        "mask_type": "learned",
        "bf16": False,
        "max_steps": 4,
        "save_steps": 2,
        "save_strategy": "steps",
        "seed": 0,
        "data_seed": 0,
        "learning_rate": 0.05,
    }

    def state(trainer: SparsePOTrainer) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in snapshot(trainer.model).items() if ".default" in k}
        tensors.update(
            {f"mask.{k}": v.detach().clone() for k, v in trainer.mask_networks.state_dict().items()}
        )
        return tensors

    straight = make(tmp_path / "straight", "sparse_delta", **settings)
    straight.train()
    resumed = make(tmp_path / "resumed", "sparse_delta", **settings)
    resumed.train()  # writes checkpoint-2 (and -4); resume a fresh trainer from step 2
    again = make(tmp_path / "resumed", "sparse_delta", **settings)
    again.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected, got = state(straight), state(again)
    assert expected.keys() == got.keys() and any(k.startswith("mask.") for k in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    start = make(tmp_path / "start", "sparse_delta", **settings)
    assert any(
        not torch.equal(start.mask_networks.state_dict()[k.removeprefix("mask.")], v)
        for k, v in got.items()
        if k.startswith("mask.")
    )  # the mask networks really trained


def test_chunked_token_terms_equal_full_logits_with_gradients():
    """Scoring a few rows at a time (each chunk recomputed in backward) gives the full-logits values and gradients."""
    from sparse_peft.trainers import completion_token_terms

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    rows, ref_rows = torch.randn(7, 8, requires_grad=True), torch.randn(7, 8)
    labels = torch.randint(0, 11, (7,))

    def full() -> tuple[torch.Tensor, ...]:
        logp = head(rows).log_softmax(-1)
        with torch.no_grad():  # the reference is a constant, as in DPO
            ref_logp = head(ref_rows).log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        return logp.gather(-1, labels[:, None])[:, 0], ref_logp.gather(-1, labels[:, None])[:, 0], kl

    for with_kl in (True, False):
        expected = full()
        expected_grad = torch.autograd.grad(
            expected[0].sum() + with_kl * expected[2].sum(), (rows, head.weight)
        )
        got = completion_token_terms(rows, ref_rows, labels, head, with_kl, rows_per_chunk=3)
        got_grad = torch.autograd.grad(got[0].sum() + with_kl * got[2].sum(), (rows, head.weight))
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1].detach())
        torch.testing.assert_close(got[2], expected[2].detach() if with_kl else torch.zeros(7))
        for g, e in zip(got_grad, expected_grad, strict=True):
            torch.testing.assert_close(g, e)


def _reference_loss(trainer: SparsePOTrainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """SparsePO with all-ones masks written out from full logits: −log σ(β(u − (KL_r − KL_c))) + L1 on Σ m per
    completion (TDPO's / the SparsePO authors' sign)."""
    model = trainer.model
    completion = batch["completion_mask"][:, 1:].float()
    labels = batch["input_ids"][:, 1:, None]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logp = model(**kwargs).logits[:, :-1].float().log_softmax(-1)
    with model.disable_adapter():
        ref_logp = model(**kwargs).logits[:, :-1].float().log_softmax(-1)
    reward = ((logp.gather(-1, labels) - ref_logp.gather(-1, labels))[..., 0] * completion).sum(1)
    kl = ((ref_logp.exp() * (ref_logp - logp)).sum(-1) * completion).sum(1)
    (u_c, u_r), (kl_c, kl_r) = reward.chunk(2), kl.chunk(2)
    loss = -torch.nn.functional.logsigmoid(trainer.beta * ((u_c - u_r) - (kl_r - kl_c))).mean()
    l1 = (trainer.args.mask_l1_reward + trainer.args.mask_l1_kl) / 2
    return loss + l1 * completion.sum(1).mean()


@pytest.mark.parametrize("hidden_state_path", [True, False])
def test_loss_matches_the_written_out_formula_and_both_paths_agree(tmp_path, hidden_state_path, monkeypatch):
    trainer = make(tmp_path, "sparse_delta", mask_type="ones", bf16=False, max_steps=2, mask_l1_reward=0.01,
                   mask_l1_kl=0.03)  # fmt: skip
    trainer.train()
    if not hidden_state_path:  # the full-logits fallback of models whose LM head output is rescaled
        monkeypatch.setattr(SparsePOTrainer, "_hidden_state_path", lambda self, causal_lm: False)
    batch = batch_of(trainer)
    trainer.model.eval()
    ours = trainer.compute_loss(trainer.model, batch)
    expected = _reference_loss(trainer, batch)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for got, want in zip(
        torch.autograd.grad(ours, params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_a_learned_mask_that_is_zero_everywhere_warns(tmp_path):
    trainer = make(tmp_path, "sparse_delta", mask_type="learned", bf16=False, max_steps=1)
    trainer.mask_networks["reward"].mix.weight.data.zero_()
    with pytest.warns(UserWarning, match="0 on every token"):
        trainer.train()
