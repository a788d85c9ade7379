"""The merge workflow end to end on a tiny model: a task LoRA trained with plain `SFTTrainer`, an alignment LoRA trained
on its own with `AlignmentTrainer(align_schedule="alignment_only")`, both saved, then merged (Python API and CLI).

The checks never trust PEFT for the maths: the deltas `s * B @ A` are read from the saved files and summed with plain
torch, and the reference model gets them added to its weights by hand.
"""

import hashlib
import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from testing_utils import PAIRS, block_of, build_model, build_tokenizer, task_rows
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from trl_midalign import AlignmentConfig, AlignmentTrainer
from trl_midalign.cli import main as cli_main
from trl_midalign.merging import merge_adapters


ALIGN_LAYER = 2  # of 4 blocks: the alignment adapter may only touch blocks 0 and 1
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_IDS = torch.tensor([[1, 17, 45, 99, 23, 7, 250, 31], [1, 5, 6, 7, 8, 9, 10, 11]])


def common_args(output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=5e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        dataloader_drop_last=True,
    )


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """Base model directory, a trained task adapter and a trained alignment-only adapter, all saved to disk."""
    root = tmp_path_factory.mktemp("merge_workflow")
    tokenizer = build_tokenizer()
    base = str(root / "base")
    build_model("llama", len(tokenizer), num_layers=4).save_pretrained(base)
    tokenizer.save_pretrained(base)

    task_dir = str(root / "task_adapter")
    task_trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=SFTConfig(**common_args(task_dir)),
        train_dataset=Dataset.from_list(task_rows(n=16, with_pairs=False)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
    )
    task_trainer.train()
    task_trainer.save_model()

    align_dir = str(root / "alignment_adapter")
    align_trainer = AlignmentTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=AlignmentConfig(**common_args(align_dir), align_schedule="alignment_only", align_layer=ALIGN_LAYER),
        train_dataset=None,
        alignment_dataset=Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in PAIRS]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=ALL_LINEAR),
    )
    align_trainer.train()
    align_trainer.save_model()
    return {
        "root": root,
        "base": base,
        "task": task_dir,
        "alignment": align_dir,
        "task_log": task_trainer.state.log_history,
        "align_log": align_trainer.state.log_history,
    }


def read_deltas(path: str) -> dict[str, torch.Tensor]:
    """{module name: scaling * B @ A} from an adapter directory, with plain torch (float64)."""
    with open(os.path.join(path, "adapter_config.json")) as handle:
        config = json.load(handle)
    assert not config["use_rslora"]
    state = load_file(os.path.join(path, "adapter_model.safetensors"))
    deltas = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            # A merged adapter has per-module ranks; its alpha_pattern (if any) names modules exactly
            alpha = (config["alpha_pattern"] or {}).get(module, config["lora_alpha"])
            deltas[module] = alpha / a.shape[0] * b.double() @ a.double()
    return deltas


def tree_hash(path: str) -> dict[str, str]:
    digests = {}
    for folder, _, files in os.walk(path):
        for file in files:
            with open(os.path.join(folder, file), "rb") as handle:
                digests[os.path.relpath(os.path.join(folder, file), path)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits


def base_with_deltas(base_dir: str, deltas: dict[str, torch.Tensor]):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    state = model.state_dict()
    for module, delta in deltas.items():
        state[f"{module}.weight"] = (state[f"{module}.weight"].double() + delta).float()
    model.load_state_dict(state)
    return model


def test_both_adapters_trained_and_alignment_adapter_covers_blocks_below_layer(workflow):
    assert any("loss" in log for log in workflow["task_log"])
    align_logs = [log for log in workflow["align_log"] if "loss" in log]
    assert align_logs and all("align_loss" in log and "task_loss" not in log for log in align_logs)

    task, alignment = read_deltas(workflow["task"]), read_deltas(workflow["alignment"])
    # LoRA starts with B = 0: a non-zero delta on every module means the trainer really moved it
    assert len(task) == 4 * len(ALL_LINEAR) and all(delta.abs().max() > 0 for delta in task.values())
    assert all(delta.abs().max() > 0 for delta in alignment.values())

    with open(os.path.join(workflow["alignment"], "adapter_config.json")) as handle:
        config = json.load(handle)
    assert config["layers_to_transform"] == list(range(ALIGN_LAYER))
    assert sorted({block_of(module) for module in alignment}) == list(range(ALIGN_LAYER))
    assert len(alignment) == ALIGN_LAYER * len(ALL_LINEAR)
    with open(os.path.join(workflow["task"], "adapter_config.json")) as handle:
        task_config = json.load(handle)
    # Both record the same base model, which merge_adapters checks
    assert task_config["base_model_name_or_path"] == config["base_model_name_or_path"] == workflow["base"]


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_cat_merge_is_task_plus_weighted_alignment_and_reloads(workflow, tmp_path, weight):
    before = {name: tree_hash(workflow[name]) for name in ("task", "alignment", "base")}
    out = str(tmp_path / "merged")
    merged = merge_adapters(
        workflow["base"],
        {"task": workflow["task"], "alignment": workflow["alignment"]},
        weights={"task": 1.0, "alignment": weight},
        combination="cat",
        output_dir=out,
    )

    task, alignment = read_deltas(workflow["task"]), read_deltas(workflow["alignment"])
    expected = {module: delta.clone() for module, delta in task.items()}
    for module, delta in alignment.items():
        expected[module] = expected[module] + weight * delta
    got = read_deltas(out)
    assert set(got) == set(expected)
    for module in expected:
        torch.testing.assert_close(got[module], expected[module], atol=1e-6, rtol=0)
        if block_of(module) >= ALIGN_LAYER:  # above the aligned layer the merge is the task adapter alone
            torch.testing.assert_close(got[module], task[module], atol=1e-6, rtol=0)

    # The saved files reload with plain PEFT and give the logits of the base model with the summed deltas added
    reference = logits_of(base_with_deltas(workflow["base"], expected))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workflow["base"]), out)
    torch.testing.assert_close(logits_of(reloaded), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(merged), reference, atol=1e-5, rtol=1e-5)
    # ... and differ from the task adapter alone (the alignment part is really in)
    assert (logits_of(base_with_deltas(workflow["base"], task)) - reference).abs().max() > 1e-4

    with open(os.path.join(out, "README.md")) as handle:
        card = handle.read()
    assert f"| task | `{workflow['task']}` | 1 |" in card
    assert f"| alignment | `{workflow['alignment']}` | {weight:g} |" in card
    assert {name: tree_hash(workflow[name]) for name in ("task", "alignment", "base")} == before


def test_cli_merge_into_base_matches_the_python_merge(workflow, tmp_path):
    before = {name: tree_hash(workflow[name]) for name in ("task", "alignment")}
    adapter_out, model_out = str(tmp_path / "adapter"), str(tmp_path / "model")
    adapters = [f"task={workflow['task']}", f"alignment={workflow['alignment']}"]
    cli_main(["merge", "--adapters", *adapters, "--weights", "1.0", "0.5", "--output_dir", adapter_out])
    cli_main(["merge", "--adapters", *adapters, "--weights", "1.0", "0.5", "--output_dir", model_out,
              "--merge_into_base"])  # fmt: skip

    expected = read_deltas(workflow["task"])
    for module, delta in read_deltas(workflow["alignment"]).items():
        expected[module] = expected[module] + 0.5 * delta
    reference = logits_of(base_with_deltas(workflow["base"], expected))
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workflow["base"]), adapter_out)
    torch.testing.assert_close(logits_of(adapter), reference, atol=1e-5, rtol=1e-5)
    full = AutoModelForCausalLM.from_pretrained(model_out)  # a plain model: no adapter files needed
    assert not os.path.exists(os.path.join(model_out, "adapter_config.json"))
    torch.testing.assert_close(logits_of(full), reference, atol=1e-5, rtol=1e-5)
    assert {name: tree_hash(workflow[name]) for name in ("task", "alignment")} == before

    # A second merge into the same directory is refused unless told to overwrite, and the first result is kept
    saved = tree_hash(adapter_out)
    with pytest.raises(ValueError, match="already exists"):
        cli_main(["merge", "--adapters", *adapters, "--output_dir", adapter_out])
    assert tree_hash(adapter_out) == saved
