# /// script
# dependencies = [
#     "trl-midalign",
#     "matplotlib",
# ]
# ///
"""
Slot filling on MASSIVE as generation, with middle-layer alignment (Liu & Niehues, 2025) or as the SFT baseline.

The model reads a voice-assistant request and answers with its slots, `"slot: span; slot: span"`, or `"None"`. It is
trained on a few languages and evaluated on many with span-level slot F1 and exact match. Alignment pairs are
MASSIVE's own parallel utterances (the same `id` in another locale and in en-US) unless `--alignment_dataset_name`
gives others. The task itself (prompt, format, metrics, pairs) is `trl_midalign.tasks.slot_filling`.

# Aligned run (8 GPUs, DeepSpeed ZeRO-2)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/slot_filling.py \
    --config recipes/configs/slot_filling_llama3_8b.yaml
```

# Baseline with the same settings
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/slot_filling.py \
    --config recipes/configs/slot_filling_llama3_8b.yaml --alignment false --output_dir Llama-3-8B-MASSIVE-baseline
```

# Local data
Any JSON lines file with MASSIVE's fields works, e.g. the official release's `data/*.jsonl` (a `partition` column
tells the splits apart) or a folder with `train.jsonl` and `test.jsonl`:
```bash
python recipes/slot_filling.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name massive/1.1/data \
    --train_languages en-US --use_peft --output_dir out
```
"""

from transformers import AutoTokenizer
from trl import get_peft_config

from trl_midalign import AlignmentConfig, AlignmentTrainer, LabelsOnlySFTTrainer, scripts
from trl_midalign.parser import MidAlignParser
from trl_midalign.tasks import loading
from trl_midalign.tasks import slot_filling as task
from trl_midalign.tasks.arguments import RecipeModelConfig
from trl_midalign.tasks.languages import check_languages, language_groups


def main(script_args: task.SlotFillingArguments, training_args: AlignmentConfig, model_args: RecipeModelConfig):
    scripts.check_launch(training_args, model_args, script_args)
    for option in ("train_languages", "eval_languages", "alignment_languages"):
        check_languages(getattr(script_args, option) or [], task.MASSIVE_LOCALES, f"--{option}", "MASSIVE locale")
    check_languages([script_args.alignment_pivot_language], task.MASSIVE_LOCALES, "--alignment_pivot_language")
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # one push at the end, not per save
    training_args.model_init_kwargs = scripts.model_init_kwargs(training_args, model_args)
    column, pivot = script_args.language_column, script_args.alignment_pivot_language
    args = (script_args, training_args, model_args)

    def rows(name: str, split: str, languages: list[str] | None, config: str | None = script_args.dataset_config):
        return loading.load_language_rows(name, config, split, languages, column, script_args.dataset_revision)

    # Data: evaluation examples, task rows, alignment pairs (MASSIVE's own parallel utterances by default)
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
    examples = task.examples(
        loading.cap_per_language(test, column, script_args.max_eval_samples), column, conversational
    )
    eval_languages = list(dict.fromkeys(example["language"] for example in examples))
    train_dataset = dev_dataset = pair_dataset = None
    if not script_args.eval_only:
        train = rows(script_args.dataset_name, script_args.dataset_train_split, script_args.train_languages)
        train = loading.cap_per_language(train, column, script_args.max_train_samples)
        train_dataset = task.train_dataset(train, column, conversational)
        if script_args.dataset_dev_split:  # dev rows of the training languages, for the best checkpoint
            dev = rows(script_args.dataset_name, script_args.dataset_dev_split, script_args.train_languages)
            dev = loading.cap_per_language(dev, column, script_args.max_dev_samples)
            dev_dataset = task.train_dataset(dev, column, conversational)
    if alignment_languages and script_args.alignment_dataset_name:
        pair_dataset = loading.load_pair_dataset(script_args, alignment_languages, seed=training_args.seed)
    elif alignment_languages:
        massive = rows(script_args.dataset_name, script_args.dataset_train_split, [*alignment_languages, pivot])
        pair_dataset = task.massive_pairs(massive, alignment_languages, pivot, column, script_args.max_alignment_pairs)
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
    groups = language_groups(eval_languages, script_args.train_languages, alignment_languages)
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
    return MidAlignParser((task.SlotFillingArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
