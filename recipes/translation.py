# /// script
# dependencies = [
#     "trl-midalign",
#     "sacrebleu",
#     "matplotlib",
# ]
# ///
"""
LLM translation fine-tuning with ALMA-style prompts, with middle-layer alignment (Liu & Niehues, 2025) or as the SFT
baseline, evaluated per direction with BLEU and chrF (and COMET with `--comet_model` when `unbabel-comet` is
installed).

Data: rows with a `translation` column of `{language code: sentence}` dicts, the layout of ALMA's training data
(`haoranxu/ALMA-Human-Parallel`, one configuration per pair such as `de-en`) and of the WMT test sets. A direction
`de-en` uses every row that has both a `de` and an `en` sentence. The alignment pairs are the training pairs
themselves (each non-English sentence with its English side) unless `--alignment_dataset_name` gives others. The
task itself (prompt, directions, metrics, pairs) is `trl_midalign.tasks.translation`.

# Aligned run (8 GPUs, DeepSpeed ZeRO-2)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/translation.py \
    --config recipes/configs/translation_llama3_8b.yaml
```

# Baseline with the same settings
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/translation.py \
    --config recipes/configs/translation_llama3_8b.yaml --alignment false --output_dir Llama-3-8B-ALMA-baseline
```
"""

from datasets import concatenate_datasets
from transformers import AutoTokenizer
from trl import get_peft_config

from trl_midalign import AlignmentConfig, AlignmentTrainer, LabelsOnlySFTTrainer, scripts
from trl_midalign.parser import MidAlignParser
from trl_midalign.tasks import loading
from trl_midalign.tasks import translation as task
from trl_midalign.tasks.arguments import RecipeModelConfig
from trl_midalign.tasks.languages import LANGUAGE_NAMES, check_languages, language_groups


def main(script_args: task.TranslationArguments, training_args: AlignmentConfig, model_args: RecipeModelConfig):
    scripts.check_launch(training_args, model_args, script_args)
    pivot, train_directions = script_args.alignment_pivot_language, script_args.train_languages
    eval_directions = script_args.eval_languages or train_directions
    for option, directions in (("--train_languages", train_directions), ("--eval_languages", eval_directions)):
        for direction in directions:
            task.split_direction(direction, option)
    check_languages(script_args.alignment_languages or [], LANGUAGE_NAMES, "--alignment_languages")
    alignment_languages = []
    if script_args.alignment and not script_args.eval_only:
        alignment_languages = script_args.alignment_languages or task.default_alignment_languages(
            train_directions, pivot
        )
        if not alignment_languages:
            raise ValueError(
                "No alignment language: pass --alignment_languages, or --alignment false for the baseline."
            )
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # one push at the end, not per save
    training_args.model_init_kwargs = scripts.model_init_kwargs(training_args, model_args)
    args = (script_args, training_args, model_args)

    def rows(name: str, config: str | None, split: str, directions: list[str], limit: int | None):
        column, revision = script_args.translation_column, script_args.dataset_revision
        return concatenate_datasets(
            [task.direction_rows(name, config, split, d, pivot, column, revision, limit) for d in directions]
        )

    # Data: evaluation examples per direction, task rows, alignment pairs (the training pairs by default)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    conversational = tokenizer.chat_template is not None
    local = loading.is_local(script_args.dataset_name)
    eval_name = script_args.eval_dataset_name or (script_args.dataset_name if local else task.DEFAULT_TEST_SET)
    default_config = "{src}-{tgt}" if eval_name == task.DEFAULT_TEST_SET else script_args.dataset_config
    test_split, limit = script_args.dataset_test_split, script_args.max_eval_samples
    test = rows(eval_name, script_args.eval_dataset_config or default_config, test_split, eval_directions, limit)
    examples = task.examples(test, conversational)
    train_dataset = dev_dataset = pair_dataset = None
    if not script_args.eval_only:
        train_split, limit = script_args.dataset_train_split, script_args.max_train_samples
        train = rows(script_args.dataset_name, script_args.dataset_config, train_split, train_directions, limit)
        train_dataset = task.train_dataset(train, conversational)
        if script_args.dataset_dev_split:  # dev rows of the training directions, for the best checkpoint
            dev_split, limit = script_args.dataset_dev_split, script_args.max_dev_samples
            dev = rows(script_args.dataset_name, script_args.dataset_config, dev_split, train_directions, limit)
            dev_dataset = task.train_dataset(dev, conversational)
    if alignment_languages and script_args.alignment_dataset_name:
        pair_dataset = loading.load_pair_dataset(script_args, alignment_languages, seed=training_args.seed)
    elif alignment_languages:
        pair_dataset = task.pairs_from_directions(train, alignment_languages, pivot, script_args.max_alignment_pairs)
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

    # Evaluate, add the results to the model card, push exactly the run's files
    aligned_directions = [d for d in eval_directions if set(d.split("-")) & set(alignment_languages)]
    groups = language_groups(eval_directions, train_directions, aligned_directions)
    results = scripts.evaluate_run(
        model, tokenizer, examples, task, args, aligned=aligned, alignment_languages=alignment_languages,
        language_groups=groups, trainer=trainer, score=task.scorer(examples, script_args.comet_model),
    )  # fmt: skip
    scripts.publish_run(
        results, args, aligned=aligned, alignment_languages=alignment_languages, push_to_hub=push_to_hub
    )
    scripts.end_processes(trainer)
    return results


def make_parser() -> MidAlignParser:
    return MidAlignParser((task.TranslationArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
