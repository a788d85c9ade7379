# /// script
# dependencies = [
#     "trl-midalign",
#     "matplotlib",
# ]
# ///
"""
Text classification (MASSIVE intents by default) with middle-layer alignment (Liu & Niehues, 2025) or as the SFT
baseline, scored exactly by label likelihood.

The model reads a text and answers with its label's name. Evaluation generates nothing: each example's prediction is
the label whose completion has the least NLL over the whole label set, and the report gives accuracy per language next
to the majority-class baseline and chance (a model at the majority baseline in English has not learned the task).
The task itself is `trl_midalign.tasks.classification`.

# MASSIVE intents, aligned (best checkpoint by English dev loss)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/classification.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --alignment_languages de-DE,sw-KE \
    --eval_languages en-US,de-DE,sw-KE,ja-JP --dataset_dev_split validation --eval_strategy steps --eval_steps 200 \
    --save_steps 200 --load_best_model_at_end --metric_for_best_model eval_loss --output_dir out
```

# Local data
A JSON/JSONL/parquet file or a folder with `train`, `dev` and `test` files and columns text/label/language:
```bash
python recipes/classification.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/ \
    --text_column text --label_column label --language_column language --train_languages en \
    --alignment_dataset_name pairs.jsonl --alignment_languages de,ja --alignment_pivot_language en \
    --dataset_dev_split dev --output_dir out
```
"""

import functools

from transformers import AutoTokenizer
from trl import get_peft_config

from trl_midalign import AlignmentConfig, AlignmentTrainer, LabelsOnlySFTTrainer, scripts
from trl_midalign.parser import MidAlignParser
from trl_midalign.tasks import classification as task
from trl_midalign.tasks import loading, slot_filling
from trl_midalign.tasks.arguments import RecipeModelConfig
from trl_midalign.tasks.languages import language_groups


def main(script_args: task.ClassificationArguments, training_args: AlignmentConfig, model_args: RecipeModelConfig):
    scripts.check_launch(training_args, model_args, script_args)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # one push at the end, not per save
    training_args.model_init_kwargs = scripts.model_init_kwargs(training_args, model_args)
    column, pivot = script_args.language_column, script_args.alignment_pivot_language
    args = (script_args, training_args, model_args)

    def rows(name: str, split: str, languages: list[str] | None, config: str | None = script_args.dataset_config):
        return loading.load_language_rows(name, config, split, languages, column, script_args.dataset_revision)

    # Data: the label set, evaluation examples, task rows (train, dev), alignment pairs
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    conversational = tokenizer.chat_template is not None
    alignment_languages = loading.resolve_alignment_languages(script_args)
    eval_config = script_args.eval_dataset_config or script_args.dataset_config
    test = rows(
        script_args.eval_name,
        script_args.dataset_test_split,
        loading.default_eval_languages(script_args, alignment_languages),
        eval_config,
    )
    test = loading.cap_per_language(test, column, script_args.max_eval_samples)
    train = None
    if not script_args.eval_only:
        train = rows(script_args.dataset_name, script_args.dataset_train_split, script_args.train_languages)
        train = loading.cap_per_language(train, column, script_args.max_train_samples)
    labels = script_args.labels or task.label_set(
        [d for d in (train, test) if d is not None], script_args.label_column
    )
    examples = task.examples(test, script_args, labels, conversational)
    eval_languages = list(dict.fromkeys(example["language"] for example in examples))
    train_dataset = dev_dataset = pair_dataset = None
    if train is not None:
        train_dataset = task.train_dataset(train, script_args, labels, conversational)
        if script_args.dataset_dev_split:
            dev = rows(script_args.dataset_name, script_args.dataset_dev_split, script_args.train_languages)
            dev = loading.cap_per_language(dev, column, script_args.max_dev_samples)
            dev_dataset = task.train_dataset(dev, script_args, labels, conversational)
    if alignment_languages and script_args.alignment_dataset_name:
        pair_dataset = loading.load_pair_dataset(script_args, alignment_languages, seed=training_args.seed)
    elif alignment_languages:
        pair_rows = rows(script_args.dataset_name, script_args.dataset_train_split, [*alignment_languages, pivot])
        if all(c in pair_rows.column_names for c in loading.PAIR_COLUMNS):
            pair_dataset = loading.pairs_from_rows(
                pair_rows, alignment_languages, column, script_args.max_alignment_pairs
            )
        else:  # MASSIVE: the same id in another locale and in the pivot locale
            pair_dataset = slot_filling.massive_pairs(
                pair_rows, alignment_languages, pivot, column, script_args.max_alignment_pairs,
                text_column=script_args.text_column,
            )  # fmt: skip
        pair_dataset = pair_dataset.shuffle(seed=training_args.seed)

    # Train and save (AlignmentTrainer, or for the baseline SFTTrainer with the same task loss), or load an adapter
    trainer = None
    if script_args.eval_only:
        model, tokenizer, aligned = scripts.load_adapter_for_eval(script_args, training_args, model_args)
    else:
        trainer = (AlignmentTrainer if script_args.alignment else LabelsOnlySFTTrainer)(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=dev_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            **({"alignment_dataset": pair_dataset} if script_args.alignment else {}),
        )
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model(training_args.output_dir)
        trainer.hub_model_id = training_args.hub_model_id  # named in the quick start of TRL's model card
        trainer.create_model_card(**scripts.model_card_arguments(args, task.NAME))
        model, aligned = trainer.accelerator.unwrap_model(trainer.model), script_args.alignment

    # Evaluate by label likelihood, add the results to the model card, push exactly the run's files
    groups = language_groups(eval_languages, script_args.train_languages, alignment_languages)
    results = scripts.evaluate_run(
        model, tokenizer, examples, task, args, aligned=aligned, alignment_languages=alignment_languages,
        language_groups=groups, trainer=trainer, score=functools.partial(task.score, labels=labels), labels=labels,
    )  # fmt: skip
    scripts.publish_run(
        results, args, aligned=aligned, alignment_languages=alignment_languages, push_to_hub=push_to_hub
    )
    scripts.end_processes(trainer)
    return results


def make_parser() -> MidAlignParser:
    return MidAlignParser((task.ClassificationArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
