"""The embedded default: a tiny pretrained base model and skills datasets, built here with nothing downloaded.

- :func:`tiny_model_path` / :func:`load_tiny_model`: a few-million-parameter Llama pretrained on Python's
  docstrings (built on first use, cached);
- :data:`SKILLS`, :func:`skill_dataset`, :func:`skill_examples`: tasks with held-out splits in TRL's formats;
- :func:`exact_match`: the evaluator; :func:`finetune`: one way to train on a skill with TRL.

Every code path that uses them also takes any Hugging Face model id or local path instead.
"""

from .base_model import DEFAULT_RECIPE, BaseModelRecipe, load_tiny_model, tiny_model_path
from .finetune import FinetuneRun, finetune, needs_calibration
from .skills import SKILLS, Skill, completion_batch, exact_match, skill_dataset, skill_examples

__all__ = [
    "DEFAULT_RECIPE",
    "SKILLS",
    "BaseModelRecipe",
    "FinetuneRun",
    "Skill",
    "completion_batch",
    "exact_match",
    "finetune",
    "load_tiny_model",
    "needs_calibration",
    "skill_dataset",
    "skill_examples",
    "tiny_model_path",
]
