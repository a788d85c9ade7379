# /// script
# dependencies = [
#     "trl-midalign",
#     "matplotlib",
# ]
# ///
"""
Named entities as JSON (Universal NER style), with middle-layer alignment (Liu & Niehues, 2025) or as the SFT
baseline, evaluated per language with entity F1 and the rate of valid JSON.

The model reads a sentence and answers with `{"person": [...], "organization": [...], "location": [...]}`. Data:
Universal NER rows (`tokens` and BIO `ner_tags`, as class labels or strings), one Hub configuration per treebank
(`en_ewt`, `de_pud`, ...), or a local file with a language column. Alignment pairs come from
`--alignment_dataset_name`, or from `parallel_source`/`parallel_target` columns of the training rows. The task
itself (prompt, JSON format, metrics) is `trl_midalign.tasks.structured_generation`.

# Aligned run (8 GPUs, DeepSpeed ZeRO-2)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/structured_generation.py \
    --config recipes/configs/structured_generation_qwen2.5_7b.yaml
```

# Baseline with the same settings
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/structured_generation.py \
    --config recipes/configs/structured_generation_qwen2.5_7b.yaml --alignment false --output_dir Qwen2.5-7B-UNER-baseline
```
"""

from transformers import AutoTokenizer
from trl import get_peft_config

from trl_midalign import AlignmentConfig, AlignmentTrainer, LabelsOnlySFTTrainer, scripts
from trl_midalign.parser import MidAlignParser
from trl_midalign.tasks import loading
from trl_midalign.tasks import structured_generation as task
from trl_midalign.tasks.arguments import RecipeModelConfig
from trl_midalign.tasks.languages import LANGUAGE_NAMES, check_languages, iso_code


def main(
    script_args: task.StructuredGenerationArguments, training_args: AlignmentConfig, model_args: RecipeModelConfig
):
    scripts.check_launch(training_args, model_args, script_args)
    column, pivot = script_args.language_column, script_args.alignment_pivot_language

    def rows(name: str, split: str, languages: list[str] | None, config: str | None = script_args.dataset_config):
        return loading.load_language_rows(name, config, split, languages, column, script_args.dataset_revision)

    if script_args.train_languages is None:  # en_ewt on the Hub, the English treebanks of local data
        local = loading.is_local(script_args.dataset_name)
        english = rows(script_args.dataset_name, script_args.dataset_train_split, None, None) if local else None
        script_args.train_languages = task.english_languages(english, column, pivot) if local else ["en_ewt"]
    for option in ("train_languages", "eval_languages", "alignment_languages"):
        for code in getattr(script_args, option) or []:
            check_languages([iso_code(code)], LANGUAGE_NAMES, f"--{option} ({code})")
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # one push at the end, not per save
    training_args.model_init_kwargs = scripts.model_init_kwargs(training_args, model_args)
    args, tag_names = (script_args, training_args, model_args), script_args.tag_names

    # Data: evaluation examples, task rows, alignment pairs (another dataset's, or the task rows' own columns)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    conversational = tokenizer.chat_template is not None
    alignment_languages = loading.resolve_alignment_languages(script_args)
    eval_languages = loading.default_eval_languages(script_args, alignment_languages)
    eval_config = script_args.eval_dataset_config or script_args.dataset_config
    test = rows(script_args.eval_name, script_args.dataset_test_split, eval_languages, eval_config)
    test = loading.cap_per_language(test, column, script_args.max_eval_samples)
    examples = task.examples(test, column, conversational, tag_names)
    eval_languages = list(dict.fromkeys(example["language"] for example in examples))
    train_dataset = dev_dataset = pair_dataset = None
    if not script_args.eval_only:
        train = rows(script_args.dataset_name, script_args.dataset_train_split, script_args.train_languages)
        train = loading.cap_per_language(train, column, script_args.max_train_samples)
        train_dataset = task.train_dataset(train, column, conversational, tag_names)
        if script_args.dataset_dev_split:  # dev rows of the training languages, for the best checkpoint
            dev = rows(script_args.dataset_name, script_args.dataset_dev_split, script_args.train_languages)
            dev = loading.cap_per_language(dev, column, script_args.max_dev_samples)
            dev_dataset = task.train_dataset(dev, column, conversational, tag_names)
    if alignment_languages and script_args.alignment_dataset_name:
        pair_dataset = loading.load_pair_dataset(script_args, alignment_languages, seed=training_args.seed)
    elif alignment_languages:
        pair_rows = rows(script_args.dataset_name, script_args.dataset_train_split, alignment_languages)
        pair_dataset = task.pairs_from_task_rows(
            pair_rows, alignment_languages, column, script_args.max_alignment_pairs
        )
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
    groups = task.language_groups(eval_languages, script_args.train_languages, alignment_languages)
    results = scripts.evaluate_run(
        model, tokenizer, examples, task, args, aligned=aligned, alignment_languages=alignment_languages,
        language_groups=groups, trainer=trainer,
    )  # fmt: skip
    scripts.publish_run(
        results, args, aligned=aligned, alignment_languages=alignment_languages, push_to_hub=push_to_hub
    )
    scripts.end_processes(trainer)
    return results


def make_parser() -> MidAlignParser:
    return MidAlignParser((task.StructuredGenerationArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
