"""One training step (forward + backward + AdamW step) per method, each method in its own process.

The parent calls :func:`run_isolated`, which forks a fresh process for the method from a forkserver that
has torch/transformers/peft imported already. The child builds a Llama-architecture decoder from a config
(random weights, nothing is downloaded), wraps it with the method, runs ``warmup + steps`` training steps and
writes one JSON record. ``python -m benchmarks.train_step --method M`` measures one method in-process.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the kernel's exact resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the first step), falling back to psutil
sampling where that is unavailable. ``baseline`` is the memory after the model, adapter, optimizer and batch
exist; ``extra = peak - baseline`` is what the training step itself adds (gradients, optimizer state,
activations, any weight copies). ``start`` is the memory before the model is built (on CPU: the interpreter and
its libraries), so ``peak - start`` is the model plus the step, the CPU counterpart of the CUDA figure.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import multiprocessing.context
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama block: the target of every adapter method."""


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-architecture decoder built from a config, and the batch it trains on."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    seq_len: int
    batch_size: int

    def build(self, seed: int) -> nn.Module:
        """A ``LlamaForCausalLM`` with seeded random weights (fp32)."""
        from sparse_peft.embedded.toy import tiny_llama

        return tiny_llama(
            seed,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=max(self.seq_len, 128),
            tie_word_embeddings=False,
            use_cache=False,
        )

    def describe(self) -> str:
        heads = f"{self.num_heads} heads" + (
            f" ({self.num_kv_heads} kv)" if self.num_kv_heads != self.num_heads else ""
        )
        return (
            f"LlamaForCausalLM, hidden {self.hidden_size}, {self.num_layers} layers, intermediate "
            f"{self.intermediate_size}, {heads}, vocab {self.vocab_size}, untied embeddings, fp32; "
            f"batch {self.batch_size} x seq {self.seq_len}"
        )


SIZES: dict[str, ModelSpec] = {
    # CI smoke size: the smallest at which a dense weight copy clearly stands out from RSS noise
    "quick": ModelSpec("quick", 384, 4, 1024, 6, 6, 1024, 32, 2),
    # three sizes for the scaling figures; sequence/batch shrink with size so the full run fits in ~30 min on 2 cores
    "20m": ModelSpec("20m", 512, 4, 1408, 8, 4, 8000, 128, 2),
    "100m": ModelSpec("100m", 768, 12, 2048, 12, 12, 32000, 128, 2),
    "400m": ModelSpec("400m", 1024, 24, 2816, 16, 8, 32000, 64, 1),
    # GPU only: a TinyLlama-width model (0.84B parameters) at a realistic batch, 4 x 512 tokens
    "800m": ModelSpec("800m", 2048, 16, 5632, 32, 4, 32000, 512, 4),
}


@dataclass(frozen=True)
class StepSettings:
    """How the training step is run and timed."""

    r: int = 16
    warmup: int = 2
    steps: int = 5
    seed: int = 0
    lr: float = 1e-4
    device: str = "auto"
    threads: int | None = 1  # torch intra-op threads (None: torch's default); 1 keeps shared machines stable


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: how to turn the base model into the model that trains."""

    name: str
    label: str
    ours: bool
    build: Callable[[nn.Module, StepSettings], nn.Module]
    # what the method runs after every optimizer step (prune/regrow, proximal step), timed with the step
    driver: Callable[[nn.Module, torch.optim.Optimizer], Callable[[int], None]] | None = None
    # steps of one reselection period: at least this many steps are timed and the step time is their mean, so a
    # reselection and its scoring window are paid in proportion (a median would hide them)
    period: int | None = None


def _full_ft(model: nn.Module, settings: StepSettings) -> nn.Module:
    model.requires_grad_(True)
    return model


def _lora(model: nn.Module, settings: StepSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.r, lora_dropout=0.0, target_modules=BLOCK_LINEARS)
    return get_peft_model(model, config)


def _shira(model: nn.Module, settings: StepSettings) -> nn.Module:
    from peft import ShiraConfig, get_peft_model

    config = ShiraConfig(r=settings.r, target_modules=BLOCK_LINEARS, random_seed=settings.seed)
    return get_peft_model(model, config)


def _sparse_delta(fused: bool, block_size: int = 1) -> Callable[[nn.Module, StepSettings], nn.Module]:
    def build(model: nn.Module, settings: StepSettings) -> nn.Module:
        from peft import get_peft_model

        from sparse_peft import SparseDeltaConfig

        config = SparseDeltaConfig(
            r=settings.r, target_modules=BLOCK_LINEARS, fused=fused, seed=settings.seed, block_size=block_size
        )
        return get_peft_model(model, config)

    return build


def _supertuning(model: nn.Module, settings: StepSettings) -> nn.Module:
    """PEFT ``supertuning`` (magnitude top-k) with its uniform sparsity set to LoRA's total parameter count."""
    from peft import SupertuningConfig, get_peft_model

    targets = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS]
    lora = sum(settings.r * (m.in_features + m.out_features) for m in targets)
    sparsity = 1.0 - lora / sum(m.weight.numel() for m in targets)
    return get_peft_model(model, SupertuningConfig(sparsity=sparsity, target_modules=BLOCK_LINEARS))


def _dynamic(reselect_every: int) -> Callable[[nn.Module, StepSettings], nn.Module]:
    def build(model: nn.Module, settings: StepSettings) -> nn.Module:
        from peft import get_peft_model

        from sparse_peft import SparseDeltaConfig

        config = SparseDeltaConfig(
            r=settings.r,
            target_modules=BLOCK_LINEARS,
            seed=settings.seed,
            reselect_every=reselect_every,
            regrow="momentum",
        )
        return get_peft_model(model, config)

    return build


def _dynamic_driver(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[int], None]:
    from sparse_peft.dynamic import DynamicMasks

    masks = DynamicMasks(model, optimizer, total_steps=100)
    return lambda step: masks.step()


def _s2ft(model: nn.Module, settings: StepSettings) -> nn.Module:
    from peft import get_peft_model

    from sparse_peft import S2FTConfig

    return get_peft_model(model, S2FTConfig(r=settings.r, seed=settings.seed))


def _lowrank(kind: str) -> Callable[[nn.Module, StepSettings], nn.Module]:
    def build(model: nn.Module, settings: StepSettings) -> nn.Module:
        from peft import get_peft_model

        from sparse_peft import GroupSparseLoraConfig, SoraConfig

        config_cls = SoraConfig if kind == "sora" else GroupSparseLoraConfig
        return get_peft_model(model, config_cls(r=settings.r, target_modules=BLOCK_LINEARS))

    return build


def _proximal_driver(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[int], None]:
    from sparse_peft import apply_proximal_step

    lr = optimizer.param_groups[0]["lr"]
    return lambda step: apply_proximal_step(model, lr, step=step)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full_ft", "full fine-tuning", False, _full_ft),
        Method("lora", "PEFT LoRA", False, _lora),
        Method("shira", "PEFT shira", False, _shira),
        Method("supertuning", "PEFT supertuning", False, _supertuning),
        Method("sparse_delta_fused", "sparse_delta fused=True", True, _sparse_delta(True)),
        Method("sparse_delta_separate", "sparse_delta fused=False", True, _sparse_delta(False)),
        Method("sparse_delta_blocks", "sparse_delta fused=True, blocks of 16", True, _sparse_delta(True, 16)),
        Method("sparse_delta_dynamic", "sparse_delta dynamic, reselect every 2", True, _dynamic(2), _dynamic_driver),
        Method(
            "sparse_delta_dynamic20",
            "sparse_delta dynamic, SpIEL's every 20 (mean of 20 steps)",
            True,
            _dynamic(20),
            _dynamic_driver,
            period=20,
        ),
        Method("s2ft", "S2FT", True, _s2ft),
        Method("sora", "SoRA", True, _lowrank("sora"), _proximal_driver),
        Method(
            "group_sparse_lora", "group-sparse LoRA", True, _lowrank("group_sparse_lora"), _proximal_driver
        ),
    )
}


# --------------------------------------------------------------------------------------------- memory probes
def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    kib = _read_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


# glibc mallopt parameters. A fixed mmap threshold also turns off glibc's dynamic one, which otherwise climbs to
# 32 MiB and keeps freed activations resident in the heap, so RSS would show the heap's high-water mark.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MEASURE_MMAP_THRESHOLD = 128 * 1024  # every tensor above it is mmapped and goes back to the OS when freed
TIMING_MMAP_THRESHOLD = 32 * 2**20  # glibc's own ceiling for the dynamic threshold: its steady state


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap (and trim) threshold; False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * nbytes)
        )
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc only), so the baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory since :meth:`start`: CUDA allocator stats, or the CPU resident-set high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            self.source = "torch.cuda.max_memory_allocated"
        elif self._reset_hwm():
            self.source = "VmHWM, the kernel's RSS high-water mark, reset before the first step"
        else:
            self.source = "psutil RSS sampling every 1 ms"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return _read_status_kib("VmHWM") is not None

    def current(self) -> int:
        """Memory in use now (allocated bytes on CUDA, RSS on CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return current_rss()

    def start(self) -> int:
        """Reset the peak and return the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source.startswith("VmHWM"):
            self._reset_hwm()
        else:
            self._samples = [current_rss()]
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self.current()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._samples.append(current_rss())

    def peak(self) -> int:
        """Peak since :meth:`start` (stops sampling)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source.startswith("VmHWM"):
            return int(_read_status_kib("VmHWM")) * 1024
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max([*self._samples, current_rss()])


def _ru_maxrss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------------------------- the child
def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    after: Callable[[int], None] | None = None,
    step: int = 0,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    if after is not None:
        after(step)
    return float(loss.detach())


def measure(
    method_name: str, spec: ModelSpec, settings: StepSettings, profile_rows: int = 0
) -> dict[str, Any]:
    """Build, wrap and train one method in this process; return its figures (bytes, seconds).

    Memory is the peak over the warm-up steps (at least two: the first one creates the optimizer state), taken
    with a fixed small mmap threshold so that RSS follows live memory; the timed steps then run with glibc's
    usual large-tensor threshold, as a long training run would. ``profile_rows``: after the timed steps, run
    one more under ``torch.profiler`` and print its top operators to stderr (where does a step's time go).
    """
    method = METHODS[method_name]
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    set_mmap_threshold(MEASURE_MMAP_THRESHOLD)
    release_free_memory()
    meter = MemoryMeter(device)
    start = meter.current()
    t0 = time.perf_counter()
    model = spec.build(settings.seed)
    total_params = sum(p.numel() for p in model.parameters())
    model = method.build(model, settings).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=gen).to(device)
    setup_s = time.perf_counter() - t0

    release_free_memory()
    rss_after_model = current_rss()
    baseline = meter.start()
    after = method.driver(model, optimizer) if method.driver else None
    n_warmup = max(2, settings.warmup)
    losses = [_train_step(model, optimizer, ids, after, i) for i in range(n_warmup)]
    peak = meter.peak()

    set_mmap_threshold(TIMING_MMAP_THRESHOLD)
    times: list[float] = []
    for i in range(max(settings.steps, method.period or 0)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        losses.append(_train_step(model, optimizer, ids, after, n_warmup + i))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
    if profile_rows:
        _print_profile(lambda: _train_step(model, optimizer, ids, after, n_warmup + len(times)), profile_rows)
    return {
        "method": method.name,
        "label": method.label,
        "ours": method.ours,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "total_params": total_params,
        "trainable_params": trainable,
        "memory_source": meter.source,
        "start_bytes": start,
        "rss_after_model_bytes": rss_after_model,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "extra_bytes": peak - baseline,
        "model_and_step_bytes": peak - start,
        "ru_maxrss_bytes": _ru_maxrss(),
        "step_times_s": times,
        "median_step_s": statistics.fmean(times) if method.period else statistics.median(times),
        "period": method.period,
        "losses": losses,
        "setup_s": setup_s,
    }


def _print_profile(step: Callable[[], Any], rows: int) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    for key in dict.fromkeys([sort, "cpu_time_total"]):
        print(
            prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), file=sys.stderr
        )


def _child(method: str, spec: dict[str, Any], settings: dict[str, Any], result: str) -> None:
    """Forkserver target: measure and write the record (or the traceback) to ``result``."""
    try:
        record = measure(method, ModelSpec(**spec), StepSettings(**settings))
    except BaseException:  # noqa: B036 - the parent must learn about any failure
        record = {"error": traceback.format_exc(limit=8)}
    Path(result).write_text(json.dumps(record))


_PRELOAD = [
    "torch",
    "transformers.models.llama.modeling_llama",
    "peft",
    "sparse_peft",
    "benchmarks.train_step",
]


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver that imports torch/transformers/peft once: each method still gets a fresh process, but
    does not pay the ~5-10 s of imports again. Plain ``spawn`` where forkserver does not exist."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_isolated(
    method: str, spec: ModelSpec, settings: StepSettings, timeout_s: float = 3600
) -> dict[str, Any]:
    """Run :func:`measure` in a fresh process; a failure comes back as a record with ``error``."""
    base = {"method": method, "label": METHODS[method].label, "ours": METHODS[method].ours}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = _context().Process(target=_child, args=(method, asdict(spec), asdict(settings), str(result)))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return {**base, "error": f"timed out after {timeout_s:.0f} s"}
        if not result.exists():
            return {**base, "error": f"the measuring process died (exit code {proc.exitcode})"}
        record = json.loads(result.read_text())
    return {**base, **record}


def combine_rounds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from several rounds of the same method: all timed steps pooled, memory as the median round."""
    failed = [r for r in records if "error" in r]
    if failed:
        return failed[0]
    out = dict(records[0])
    for key in ("start_bytes", "rss_after_model_bytes", "baseline_bytes", "peak_bytes", "extra_bytes"):
        out[key] = int(statistics.median(r[key] for r in records))
    out["model_and_step_bytes"] = out["peak_bytes"] - out["start_bytes"]
    out["step_times_s"] = [t for r in records for t in r["step_times_s"]]
    if out.get("period"):  # each round's figure is a whole period's mean
        out["median_step_s"] = statistics.median(r["median_step_s"] for r in records)
    else:
        out["median_step_s"] = statistics.median(out["step_times_s"])
    out["rounds"] = [
        {k: r[k] for k in ("peak_bytes", "extra_bytes", "median_step_s", "setup_s")} for r in records
    ]
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure one method in this process and print its JSON record."
    )
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--r", type=int, default=StepSettings.r)
    parser.add_argument("--warmup", type=int, default=StepSettings.warmup)
    parser.add_argument("--steps", type=int, default=StepSettings.steps)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="profile one more step")
    args = parser.parse_args(argv)
    settings = StepSettings(
        r=args.r, warmup=args.warmup, steps=args.steps, device=args.device, threads=args.threads
    )
    print(json.dumps(measure(args.method, SIZES[args.size], settings, args.profile), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
