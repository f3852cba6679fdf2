"""SparsePO (arXiv 2410.05102): DPO whose per-token reward and KL terms are weighted by sparse token masks.

Per completion token ``t`` (positions shifted as for the log-probs): ``r_t = log π(y_t) − log π_ref(y_t)`` and
``k_t = KL(π_ref(·|y_<t) ‖ π(·|y_<t))`` over the vocabulary. With token masks ``m_u`` (reward) and ``m_d`` (KL):

    u = Σ m_u·r (chosen) − Σ m_u·r (rejected),   d = Σ m_d·k (rejected) − Σ m_d·k (chosen)
    L = −log σ(β(u − d)) + λ_u·Σ m_u + λ_d·Σ m_d      (L1 sums per completion, averaged over the batch)

``d`` is TDPO's sequential-KL difference (rejected minus chosen), the sign the SparsePO authors' code uses
(``huawei-noah/HEBO``, ``SparsePO/src/trainers/sparse_trainer.py``: their token term is ``−k_t``, chosen minus
rejected). With one shared learned mask the two L1 weights are averaged, as in their code.

Masks come from the reference model's hidden states, so they cost one ``output_hidden_states`` on the reference
forward that DPO runs anyway:

* ``activation``: mean hidden activation over layers and features, z-normalised over each completion, min–max
  scaled to [0, 1] and detached (no parameters);
* ``learned``: a shared ``LayerNorm``, then per layer ``Linear(h, 1) → ReLU``, mixed across layers by a bias-free
  ``Linear(L, 1) → ReLU`` (the authors' ``SimpleMaskAllLayers``); one network shared by the reward and KL masks or
  one each (``mask_sharing``); trained with the adapter;
* ``ones``: every mask is 1 — with ``use_kl=False`` this is exactly DPO's sigmoid loss (the ablation and the test).

Memory: like TRL's fused LM head, the ``(batch, T, vocab)`` logits are never built. Both forwards stop at the
backbone's last hidden state (``logits_to_keep=1``); the label log-probs and the full-vocabulary KL are computed from
it over the completion positions only, a few rows at a time, each chunk recomputed in backward
(:func:`completion_token_terms`), so peak memory is DPO's plus one chunk of logits.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .callbacks import SparseUpdateCallback

__all__ = ["MaskNetwork", "SparsePOConfig", "SparsePOTrainer", "activation_mask", "completion_token_terms"]

MASK_TYPES = ("activation", "learned", "ones")
MASK_FILE = "sparsepo_masks.pt"
LOGIT_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32): rows per chunk = this // vocabulary size
# configs whose LM head output is rescaled in ways the hidden-state path does not reproduce: such models fall back
# to scoring their own full logits (correct, at the old memory cost)
_UNHANDLED_LOGIT_SCALING = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class SparsePOConfig(DPOConfig):
    """:class:`trl.DPOConfig` plus SparsePO's token masks (the loss is always the sigmoid loss).

    Args:
        mask_type: ``activation`` (reference activations), ``learned`` (mask network) or ``ones`` (plain DPO).
        mask_sharing: for ``learned``: ``shared`` (one mask for reward and KL) or ``independent`` (one each).
        use_kl: include the token-level KL term ``d``.
        mask_l1_reward: λ_u, L1 weight on the reward mask (its sum over each completion, averaged over the batch;
            the authors' scale, so their settings, e.g. 0.001, carry over).
        mask_l1_kl: λ_d, L1 weight on the KL mask (a shared mask pays the mean of the two weights).
        mask_learning_rate: learning rate of the mask network (default: ``learning_rate``).
        mask_threshold: for ``activation``: token weights below it become 0, so the mask is sparse (0 keeps the
            dense min–max mask; 0.5 keeps the tokens in the upper half of each completion's activation range).
    """

    mask_type: Literal["activation", "learned", "ones"] = field(
        default="activation", metadata={"help": f"Token mask: one of {MASK_TYPES}."}
    )
    mask_sharing: Literal["shared", "independent"] = field(
        default="shared", metadata={"help": "Learned masks: one for reward and KL ('shared') or one each."}
    )
    use_kl: bool = field(default=True, metadata={"help": "Include the token-level KL term."})
    mask_l1_reward: float = field(default=0.0, metadata={"help": "L1 weight λ_u on the reward mask."})
    mask_l1_kl: float = field(default=0.0, metadata={"help": "L1 weight λ_d on the KL mask."})
    mask_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the mask network (default: learning_rate)."}
    )
    mask_threshold: float = field(
        default=0.0, metadata={"help": "Activation masks: weights below this become 0 (sparser masks)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"SparsePOConfig.mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}.")
        if self.mask_sharing not in ("shared", "independent"):
            raise ValueError(f"mask_sharing must be 'shared' or 'independent', got {self.mask_sharing!r}.")
        if self.mask_l1_reward < 0 or self.mask_l1_kl < 0:
            raise ValueError("mask_l1_reward and mask_l1_kl must be >= 0.")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {self.mask_threshold}.")
        if self.mask_threshold and self.mask_type != "activation":
            raise ValueError(f"mask_threshold applies to mask_type='activation' only, not {self.mask_type!r}.")
        if list(self.loss_type) != ["sigmoid"]:
            raise ValueError(
                f"SparsePO defines its own sigmoid loss; loss_type must be 'sigmoid', got {self.loss_type}."
            )
        unsupported = {
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "precompute_ref_log_probs": self.precompute_ref_log_probs,
            "f_divergence_type != 'reverse_kl'": self.f_divergence_type != "reverse_kl",
            "label_smoothing": bool(self.label_smoothing),
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"SparsePO does not support these DPO options: {', '.join(bad)}.")


def activation_mask(
    hidden_states: tuple[torch.Tensor, ...], completion: torch.Tensor, threshold: float = 0.0
) -> torch.Tensor:
    """Token weights in [0, 1] from reference activations (layer- and feature-mean, z-scored, min–max scaled).

    ``hidden_states`` are the model's outputs (embeddings first, then one per layer); ``completion`` is the shifted
    completion mask ``(batch, T-1)``. The weight of position ``t`` (the hidden state that predicts token ``t+1``)
    is 0 outside the completion, and 0 where it falls below ``threshold`` (min–max scaling alone leaves the mask
    dense: only one token per completion is 0).
    """
    act = torch.stack([h.float() for h in hidden_states[1:]]).mean(dim=(0, 3))[:, :-1]  # (batch, T-1)
    keep = completion.bool()
    count = completion.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (act * completion).sum(dim=1, keepdim=True) / count
    std = (((act - mean) ** 2) * completion).sum(dim=1, keepdim=True).div(count).sqrt().clamp_min(1e-6)
    z = (act - mean) / std
    low = z.masked_fill(~keep, float("inf")).amin(dim=1, keepdim=True)
    high = z.masked_fill(~keep, float("-inf")).amax(dim=1, keepdim=True)
    scaled = (z - low) / (high - low).clamp_min(1e-6)
    return scaled.masked_fill(~keep | (scaled < threshold), 0.0).detach()


class MaskNetwork(nn.Module):
    """Learned SparsePO mask: a shared ``LayerNorm``, per layer ``Linear(h, 1) → ReLU``, then a bias-free
    ``Linear(L, 1) → ReLU`` over the layers.

    Per-layer units are initialised as the authors' network ends up (transformers' init: weights N(0, 0.02),
    biases 0): zero-centred pre-activations, so each layer's ReLU zeroes a token-dependent share of tokens from the
    first step, and L1 can then silence tokens one by one (a mask initialised near 1 everywhere stayed at density
    1.0 for every L1 weight tried). One difference: the mixing weights start at ``|N(0, 0.02)|``, not signed, so a
    token's mask is 0 only when all its layers are; with signed weights a small model's mask can start at 0 on
    every token (no signal, no gradient, nothing trains: seen on a 2-layer model).
    """

    def __init__(self, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.layers = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mix = nn.Linear(num_layers, 1, bias=False)
        with torch.no_grad():
            for linear in [*self.layers, self.mix]:
                nn.init.normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    linear.bias.zero_()
            self.mix.weight.abs_()

    def forward(self, hidden_states: tuple[torch.Tensor, ...], completion: torch.Tensor) -> torch.Tensor:
        dtype = self.mix.weight.dtype
        per_layer = [
            F.relu(linear(self.norm(h.detach().to(dtype)))).squeeze(-1)
            for linear, h in zip(self.layers, hidden_states[1:], strict=True)
        ]
        mask = F.relu(self.mix(torch.stack(per_layer, dim=-1))).squeeze(-1)[:, :-1]
        return mask * completion


def completion_token_terms(
    rows: torch.Tensor,
    ref_rows: torch.Tensor,
    labels: torch.Tensor,
    to_logits: Callable[[torch.Tensor], torch.Tensor],
    with_kl: bool,
    rows_per_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion token: ``log π(y)``, ``log π_ref(y)`` and ``KL(π_ref ‖ π)`` over the vocabulary.

    ``rows`` / ``ref_rows`` are ``(n, h)`` last hidden states of the policy / reference at the ``n`` positions that
    predict ``labels``; ``to_logits`` is the LM head. Chunks of ``rows_per_chunk`` rows are projected, scored and
    dropped; backward recomputes one chunk at a time, so no ``(n, vocab)`` tensor outlives its chunk.
    """

    def policy_terms(h: torch.Tensor, ref_h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logp = to_logits(h).float().log_softmax(-1)
        token = logp.gather(-1, y[:, None]).squeeze(-1)
        if not with_kl:
            return (token,)
        with torch.no_grad():
            ref_logp = to_logits(ref_h).float().log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        return token, kl, ref_logp.gather(-1, y[:, None]).squeeze(-1)

    tokens, kls, ref_tokens = [], [], []
    for start in range(0, rows.size(0), rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        h, ref_h, y = rows[part], ref_rows[part], labels[part]
        if torch.is_grad_enabled() and h.requires_grad:
            out = checkpoint(policy_terms, h, ref_h, y, use_reentrant=False)
        else:
            out = policy_terms(h, ref_h, y)
        tokens.append(out[0])
        if with_kl:
            kls.append(out[1])
            ref_tokens.append(out[2])
        else:
            with torch.no_grad():
                ref_tokens.append(to_logits(ref_h).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1))
    token, ref_token = torch.cat(tokens), torch.cat(ref_tokens)
    return token, ref_token, torch.cat(kls) if with_kl else torch.zeros_like(ref_token)


@contextlib.contextmanager
def _last_hidden_states(backbone: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the backbone's ``last_hidden_state`` of every forward inside the block (the model is called through
    its wrappers, so DDP / FSDP / PEFT hooks all run)."""
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = backbone.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


class SparsePOTrainer(DPOTrainer):
    """TRL's :class:`~trl.DPOTrainer` with SparsePO's token-masked loss; accepts everything DPOTrainer does.

    Logs DPO's reward metrics (computed from the masked rewards) plus ``mask/density`` (fraction of completion
    tokens with a non-zero reward mask), ``mask/chosen_mean`` / ``mask/rejected_mean`` and, with the KL term,
    ``kl/chosen`` / ``kl/rejected`` (and ``mask/kl_density`` for independent learned masks).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SparsePOConfig):
            raise TypeError(
                f"SparsePOTrainer needs args=SparsePOConfig(...), got {type(self.args).__name__}."
            )
        self.mask_networks = nn.ModuleDict()
        self._warned_dead_mask = False
        if self.args.mask_type == "learned":
            text = self.accelerator.unwrap_model(self.model).config.get_text_config()
            names = ["reward"] if self.args.mask_sharing == "shared" else ["reward", "kl"]
            for name in names:
                self.mask_networks[name] = MaskNetwork(text.hidden_size, text.num_hidden_layers)
            self.mask_networks.to(self.accelerator.device)
        SparseUpdateCallback.attach(self)  # its own trainer: the adapter's sparse updates need no opt-in

    # ------------------------------------------------------------------------------------------ optimisation
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        params = list(self.mask_networks.parameters())
        if params and not any(p is params[0] for g in optimizer.param_groups for p in g["params"]):
            lr = self.args.mask_learning_rate or self.args.learning_rate
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
            # the Trainer zeroes only the model's gradients: without this the mask networks would step on the sum of
            # every gradient since the start (and a resumed run, starting that sum afresh, would diverge)
            optimizer.register_step_post_hook(lambda *_: self.mask_networks.zero_grad(set_to_none=True))
        return optimizer

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        if len(self.mask_networks) and self.accelerator.num_processes > 1:
            # the mask networks live outside the DDP-wrapped model: average their gradients across ranks by hand
            for p in self.mask_networks.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if len(self.mask_networks) and self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.mask_networks.state_dict(), folder / MASK_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / MASK_FILE
        if len(self.mask_networks):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was not written by a learned-mask run."
                )
            self.mask_networks.load_state_dict(torch.load(path, map_location=self.accelerator.device))

    # ------------------------------------------------------------------------------------------ loss
    def _reference(self, model_kwargs: dict[str, Any]) -> Any:
        """The reference forward (adapter disabled, or the ``ref`` adapter, or ``ref_model``) with hidden states."""
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        ref = self.ref_model
        if ref is None:
            ref = self.model
            if is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                context = use_adapter(
                    unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
                )
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
        ):
            return ref(**model_kwargs, output_hidden_states=self.args.mask_type != "ones")

    def _masks(self, hidden: Any, completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.mask_type == "ones":
            return completion, completion
        if self.args.mask_type == "activation":
            mask = activation_mask(hidden, completion, self.args.mask_threshold)
            return mask, mask
        reward = self.mask_networks["reward"](hidden, completion)
        kl = self.mask_networks["kl"](hidden, completion) if "kl" in self.mask_networks else reward
        if self.model.training and not self._warned_dead_mask and not bool(reward.detach().any()):
            self._warned_dead_mask = True
            warnings.warn(
                "SparsePO: the learned reward mask is 0 on every token of this batch (its ReLUs are all inactive), "
                "so the batch gives no preference signal and the mask network no gradient. If this persists, "
                "lower mask_l1_reward / mask_l1_kl or use mask_type='activation'.",
                stacklevel=2,
            )
        return reward, kl

    def _causal_lm(self) -> nn.Module:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def _hidden_state_path(self, causal_lm: nn.Module) -> bool:
        """Whether the LM head is a plain projection (optionally soft-capped) reachable from the backbone output."""
        text = causal_lm.config.get_text_config()
        return (
            "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
            and causal_lm.get_output_embeddings() is not None
            and all(getattr(text, name, None) in (None, 1, 1.0) for name in _UNHANDLED_LOGIT_SCALING)
        )

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
        model_kwargs["use_cache"] = False
        completion = inputs["completion_mask"][:, 1:].float()
        keep = completion.bool()
        labels = inputs["input_ids"][:, 1:][keep]
        seq = completion.size(1)

        causal_lm = self._causal_lm()
        if self._hidden_state_path(causal_lm):
            head = causal_lm.get_output_embeddings()
            cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)

            def to_logits(h: torch.Tensor) -> torch.Tensor:
                logits = head(h)
                return torch.tanh(logits / cap) * cap if cap else logits

            ref_lm = causal_lm if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
            with _last_hidden_states(causal_lm.base_model) as seen:
                outputs = model(**model_kwargs, logits_to_keep=1)
            with _last_hidden_states(ref_lm.base_model) as ref_seen:
                ref_outputs = self._reference({**model_kwargs, "logits_to_keep": 1})
            rows, ref_rows = (h[-1][:, -seq - 1 : -1][keep] for h in (seen, ref_seen))
        else:  # score the model's own full logits (rescaled heads): same terms, DPO-without-fused-head memory
            outputs = model(**model_kwargs)
            ref_outputs = self._reference(model_kwargs)
            rows, ref_rows = (o.logits[:, -seq - 1 : -1][keep] for o in (outputs, ref_outputs))

            def to_logits(h: torch.Tensor) -> torch.Tensor:
                return h

        vocab = causal_lm.config.get_text_config().vocab_size
        token, ref_token, kl = completion_token_terms(
            rows, ref_rows, labels, to_logits, self.args.use_kl, max(1, LOGIT_CHUNK_ELEMENTS // vocab)
        )
        logps, ref_logps, token_kl = (
            completion.new_zeros(completion.shape).masked_scatter(keep, x.float())
            for x in (token, ref_token, kl)
        )
        token_reward = (logps - ref_logps) * completion
        mask_u, mask_d = self._masks(ref_outputs.hidden_states, completion)
        reward_c, reward_r = (mask_u * token_reward).sum(dim=1).chunk(2)
        margin = reward_c - reward_r
        kl_c = kl_r = torch.zeros_like(reward_c)
        if self.args.use_kl:
            kl_c, kl_r = (mask_d * token_kl).sum(dim=1).chunk(2)
            margin = margin - (kl_r - kl_c)
        loss = -F.logsigmoid(self.beta * margin).mean()
        loss = loss + self._l1_penalty(mask_u, mask_d)

        self._log_metrics(mode, inputs, completion, mask_u, mask_d, reward_c, reward_r, kl_c, kl_r, logps)
        return (loss, outputs) if return_outputs else loss

    def _l1_penalty(self, mask_u: torch.Tensor, mask_d: torch.Tensor) -> torch.Tensor | float:
        """λ_u·Σ m_u + λ_d·Σ m_d per completion, averaged over the batch; one shared mask pays the mean weight."""
        l1_u, l1_d = self.args.mask_l1_reward, self.args.mask_l1_kl if self.args.use_kl else 0.0
        if mask_u is mask_d:
            weight = (l1_u + l1_d) / 2 if self.args.use_kl else l1_u
            return weight * mask_u.sum(dim=1).mean() if weight else 0.0
        penalty = l1_u * mask_u.sum(dim=1).mean() if l1_u else 0.0
        return penalty + l1_d * mask_d.sum(dim=1).mean() if l1_d else penalty

    @torch.no_grad()
    def _log_metrics(
        self,
        mode: str,
        inputs: dict[str, Any],
        completion: torch.Tensor,
        mask_u: torch.Tensor,
        mask_d: torch.Tensor,
        reward_c: torch.Tensor,
        reward_r: torch.Tensor,
        kl_c: torch.Tensor,
        kl_r: torch.Tensor,
        logps: torch.Tensor,
    ) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]

        def ratio(num: torch.Tensor, den: torch.Tensor) -> float:
            total = gather(den.reshape(1)).sum()
            return (gather(num.reshape(1)).sum() / total).item() if total > 0 else 0.0

        chosen_tok, rejected_tok = completion.chunk(2)
        u_c, u_r = mask_u.chunk(2)
        metrics["mask/density"].append(
            ratio(((mask_u > 0) & completion.bool()).sum().float(), completion.sum())
        )
        metrics["mask/chosen_mean"].append(ratio(u_c.sum(), chosen_tok.sum()))
        metrics["mask/rejected_mean"].append(ratio(u_r.sum(), rejected_tok.sum()))
        if "kl" in self.mask_networks:
            metrics["mask/kl_density"].append(
                ratio(((mask_d > 0) & completion.bool()).sum().float(), completion.sum())
            )
        rewards_c, rewards_r = gather(self.beta * reward_c.detach()), gather(self.beta * reward_r.detach())
        metrics["rewards/chosen"].append(rewards_c.mean().item())
        metrics["rewards/rejected"].append(rewards_r.mean().item())
        metrics["rewards/margins"].append((rewards_c - rewards_r).mean().item())
        metrics["rewards/accuracies"].append((rewards_c > rewards_r).float().mean().item())
        if self.args.use_kl:
            metrics["kl/chosen"].append(gather(kl_c.detach()).mean().item())
            metrics["kl/rejected"].append(gather(kl_r.detach()).mean().item())
        seq_logps_c, seq_logps_r = (logps.detach() * completion).sum(dim=1).chunk(2)
        metrics["logps/chosen"].append(gather(seq_logps_c).mean().item())
        metrics["logps/rejected"].append(gather(seq_logps_r).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
