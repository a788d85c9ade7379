"""The tasks of the recipes, one module each: prompts, answer formats, parsing, metrics, task rows and alignment pairs.

- [`slot_filling`]: MASSIVE slots as `"slot: span; ..."`, span F1 and exact match; pairs by MASSIVE's ids.
- [`translation`]: ALMA-style prompts per direction, BLEU/chrF (COMET); pairs from the training directions.
- [`structured_generation`]: Universal NER entities as JSON, entity F1 and valid-JSON rate.
- [`classification`]: a text's label (MASSIVE intents by default), scored by label likelihood: accuracy, majority
  baseline, chance.

Shared pieces: [`loading`] (task rows and pairs from the Hub or local files), [`languages`] (codes, checks, groups),
[`metrics`] (span F1, exact match) and [`report`] (batched generation, per-language tables, plots, card section).
Adding a task means adding a module here (with `NAME`, `MAIN_METRIC`, `score`, `examples` and `train_dataset`) and
a thin recipe in `recipes/`.
"""

from . import classification, slot_filling, structured_generation, translation


TASKS = {module.NAME: module for module in (slot_filling, translation, structured_generation, classification)}

__all__ = ["TASKS", "classification", "slot_filling", "structured_generation", "translation"]
