"""Side-by-side benchmarks of sparse-peft against PEFT's LoRA / SHiRA and full fine-tuning.

Entry point: ``python -m benchmarks [--quick] [--out docs/benchmarks.md]`` (or ``sparse-peft bench``). Every
method runs in its own subprocess (:mod:`benchmarks.train_step`); :mod:`benchmarks.report` turns the JSON
results into ``docs/benchmarks.md``.
"""
