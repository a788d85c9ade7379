"""Adapter merging: every combination against plain-torch references, every bad input, the CLI and the weight search.

The references never use PEFT: they read the saved adapter files (config JSON + safetensors), compute each module's
delta `s * B @ A` by hand and add it to the base weights.
"""

import hashlib
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from testing_utils import PAIRS, build_tokenizer, task_rows
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from trl_midalign.cli import main as cli_main
from trl_midalign.cli.merge import run_merge
from trl_midalign.merging import format_search_table, merge_adapters, search_merge_weights
from trl_midalign.merging import merge as merge_module
from trl_midalign.merging.arguments import MergeArguments
from trl_midalign.probing import probe_layers


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_IDS = torch.tensor([[1, 17, 45, 99, 23, 7, 250, 31], [1, 5, 6, 7, 8, 9, 10, 11]])


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny Llama (4 blocks, hidden 64) and adapters with random A and B, saved to disk
# ---------------------------------------------------------------------------------------------------------------------


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def save_adapter(base_dir: str, path: str, seed: int, shared_a_from: str | None = None, **lora_kwargs) -> str:
    """Saves a LoRA adapter with non-trivial A and B (B is not zero); `shared_a_from` copies another adapter's A."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    if shared_a_from is not None:
        shared = load_file(os.path.join(shared_a_from, "adapter_model.safetensors"))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_A" in name:
                    # "base_model.model.X.lora_A.default.weight" -> saved key "base_model.model.X.lora_A.weight"
                    parameter.copy_(shared[name.replace(".default", "")] + 0.01 * torch.randn_like(parameter))
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Base model + tokenizer, a task adapter (every block, 3 modules) and an alignment adapter (blocks 0-1, all)."""
    root = tmp_path_factory.mktemp("merging")
    tokenizer = build_tokenizer()
    base = str(root / "base")
    tiny_llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    task = save_adapter(
        base, str(root / "task"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    alignment = save_adapter(
        base,
        str(root / "alignment"),
        seed=2,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        layers_to_transform=[0, 1],
    )
    task_same_rank = save_adapter(base, str(root / "task_r2"), seed=3, r=2, lora_alpha=4, target_modules=ALL_LINEAR)
    shared_init = save_adapter(
        base,
        str(root / "shared_r2"),
        seed=4,
        shared_a_from=task_same_rank,
        r=2,
        lora_alpha=2,
        target_modules=ALL_LINEAR,
    )
    return {
        "root": root,
        "base": base,
        "task": task,
        "alignment": alignment,
        "task_r2": task_same_rank,
        "shared_r2": shared_init,
        "tokenizer": tokenizer,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Plain-torch references
# ---------------------------------------------------------------------------------------------------------------------


def read_factors(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A, B, scaling)} read from the files, without PEFT."""
    with open(os.path.join(path, "adapter_config.json")) as handle:
        config = json.load(handle)
    state = load_file(os.path.join(path, "adapter_model.safetensors"))
    factors = {}
    for key, tensor in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        rank = tensor.shape[0]
        alpha = (
            config["alpha_pattern"].get(module, config["lora_alpha"])
            if config["alpha_pattern"]
            else config["lora_alpha"]
        )
        scaling = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        factors[module] = (tensor.double(), state[key.replace(".lora_A.", ".lora_B.")].double(), scaling)
    return factors


def read_deltas(path: str) -> dict[str, torch.Tensor]:
    return {module: scaling * b @ a for module, (a, b, scaling) in read_factors(path).items()}


def weighted_sum(paths_and_weights: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, weight in paths_and_weights:
        for module, delta in read_deltas(path).items():
            total[module] = total.get(module, torch.zeros_like(delta)) + weight * delta
    return total


def model_with_deltas(base_dir: str, deltas: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base_dir)
    state = model.state_dict()
    for module, delta in deltas.items():
        state[f"{module}.weight"] = (state[f"{module}.weight"].double() + delta).float()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits


def tree_hash(path: str) -> dict[str, str]:
    digests = {}
    for folder, _, files in os.walk(path):
        for file in files:
            full = os.path.join(folder, file)
            with open(full, "rb") as handle:
                digests[os.path.relpath(full, path)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def max_abs_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(expected)
    return max((got[m] - expected[m]).abs().max().item() for m in expected)


# ---------------------------------------------------------------------------------------------------------------------
# Combinations
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alignment_first", [False, True])
def test_cat_delta_is_exact_weighted_sum(workspace, tmp_path, alignment_first):
    """Different ranks, target modules, layers_to_transform and rsLoRA: the union of modules, each w1*d1 + w2*d2."""
    ws = workspace
    adapters = {"task": ws["task"], "alignment": ws["alignment"]}
    if alignment_first:  # PEFT alone would give the merged adapter the alignment adapter's layers 0-1 only
        adapters = {"alignment": ws["alignment"], "task": ws["task"]}
    out = str(tmp_path / "merged")
    model = merge_adapters(ws["base"], adapters, weights={"task": 1.0, "alignment": 0.5}, output_dir=out)

    expected = weighted_sum([(ws["task"], 1.0), (ws["alignment"], 0.5)])
    got = read_deltas(out)
    # task: 4 blocks x 3 modules; alignment: 2 blocks x 7 modules, of which 2 x 3 shared with the task
    assert len(expected) == 4 * 3 + 2 * 7 - 2 * 3
    assert max_abs_diff(got, expected) < 1e-6
    assert max(delta.abs().max().item() for delta in expected.values()) > 0.1  # the check above is not vacuous

    with open(os.path.join(out, "adapter_config.json")) as handle:
        config = json.load(handle)
    assert config["r"] == config["lora_alpha"] == 4 + 2  # cat: rank = sum of the ranks, scaling 1
    assert config["use_rslora"] is False
    assert config["base_model_name_or_path"] == ws["base"]
    assert isinstance(model, PeftModel) and list(model.peft_config) == ["default"]
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))

    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    for text in (
        "| task |",
        "| alignment |",
        ws["task"],
        ws["alignment"],
        "| 0.5 |",
        "`cat`",
        f"base_model: {ws['base']}",
    ):
        assert text in card
    assert "| 0-1 |" in card and "| all |" in card  # layers of each part


def test_cat_logits_equal_base_plus_weighted_deltas(workspace, tmp_path):
    ws = workspace
    out = str(tmp_path / "merged")
    returned = merge_adapters(
        ws["base"], {"task": ws["task"], "alignment": ws["alignment"]}, [0.7, -1.3], output_dir=out
    )
    reference = logits_of(model_with_deltas(ws["base"], weighted_sum([(ws["task"], 0.7), (ws["alignment"], -1.3)])))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(ws["base"]), out)
    base_logits = logits_of(LlamaForCausalLM.from_pretrained(ws["base"]))

    assert (reference - base_logits).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(logits_of(reloaded), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(returned), reference, atol=1e-5, rtol=1e-5)


def test_merge_into_base_gives_same_logits(workspace, tmp_path):
    ws = workspace
    out = str(tmp_path / "full")
    returned = merge_adapters(
        ws["base"],
        {"task": ws["task"], "alignment": ws["alignment"]},
        {"task": 1.0, "alignment": 0.5},
        output_dir=out,
        merge_into_base=True,
    )
    assert isinstance(returned, PreTrainedModel) and not isinstance(returned, PeftModel)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    reference = logits_of(model_with_deltas(ws["base"], weighted_sum([(ws["task"], 1.0), (ws["alignment"], 0.5)])))
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(out)), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(returned), reference, atol=1e-5, rtol=1e-5)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "library_name: transformers" in card and "full model" in card


def test_base_model_instance_and_none(workspace, tmp_path):
    """A model instance is used as given; None loads the base the adapters record."""
    ws = workspace
    adapters = {"task": ws["task"], "alignment": ws["alignment"]}
    expected = logits_of(model_with_deltas(ws["base"], weighted_sum([(ws["task"], 1.0), (ws["alignment"], 1.0)])))
    from_instance = merge_adapters(LlamaForCausalLM.from_pretrained(ws["base"]), adapters)
    from_recorded = merge_adapters(None, adapters)
    torch.testing.assert_close(logits_of(from_instance), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(from_recorded), expected, atol=1e-5, rtol=1e-5)
    assert not os.listdir(tmp_path)  # output_dir=None writes nothing


def test_svd_with_enough_rank_is_exact(workspace, tmp_path):
    ws = workspace
    out = str(tmp_path / "svd")
    merge_adapters(
        ws["base"],
        {"task": ws["task"], "alignment": ws["alignment"]},
        [1.0, 0.5],
        combination="svd",
        svd_rank=6,
        output_dir=out,
    )
    expected = weighted_sum([(ws["task"], 1.0), (ws["alignment"], 0.5)])
    assert max_abs_diff(read_deltas(out), expected) < 1e-5
    reference = logits_of(model_with_deltas(ws["base"], expected))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(ws["base"]), out)
    torch.testing.assert_close(logits_of(reloaded), reference, atol=1e-4, rtol=1e-4)


def test_svd_low_rank_is_the_best_approximation(workspace, tmp_path):
    """Rank 2 < rank of the sum: each module's error is the norm of the discarded singular values (Eckart–Young)."""
    ws = workspace
    out = str(tmp_path / "svd2")
    merge_adapters(
        ws["base"],
        {"task": ws["task"], "alignment": ws["alignment"]},
        [1.0, 0.5],
        combination="svd",
        svd_rank=2,
        output_dir=out,
    )
    with open(os.path.join(out, "adapter_config.json")) as handle:
        assert json.load(handle)["r"] == 2
    expected = weighted_sum([(ws["task"], 1.0), (ws["alignment"], 0.5)])
    got = read_deltas(out)
    assert set(got) == set(expected)
    truncated = 0
    for module, exact in expected.items():
        singular_values = torch.linalg.svdvals(exact)
        optimal_error = singular_values[2:].norm().item()
        error = torch.linalg.norm(got[module] - exact).item()
        assert error == pytest.approx(optimal_error, rel=1e-3, abs=1e-5)
        truncated += optimal_error > 1e-3
    assert truncated > 0  # some modules really lost rank


def test_linear_matches_factor_average_and_warns_on_different_init(workspace, tmp_path):
    ws = workspace
    out = str(tmp_path / "linear")
    with pytest.warns(UserWarning, match="not meaningful"):
        merge_adapters(
            ws["base"], {"a": ws["task_r2"], "b": ws["alignment"]}, [0.6, -0.4], combination="linear", output_dir=out
        )
    # PEFT's linear combination: A = sum sign(w s) sqrt(|w s|) A_i, B = sum sqrt(|w s|) B_i, merged scaling 1
    parts = [(read_factors(ws["task_r2"]), 0.6), (read_factors(ws["alignment"]), -0.4)]
    expected = {}
    for module in set(parts[0][0]) | set(parts[1][0]):
        a_sum, b_sum = 0, 0
        for factors, weight in parts:
            if module in factors:
                a, b, scaling = factors[module]
                root = math.sqrt(abs(weight * scaling))
                a_sum = a_sum + math.copysign(root, weight * scaling) * a
                b_sum = b_sum + root * b
        expected[module] = b_sum @ a_sum
    assert max_abs_diff(read_deltas(out), expected) < 1e-6
    # and it is far from the weighted sum of the deltas where both adapters act
    exact = weighted_sum([(ws["task_r2"], 0.6), (ws["alignment"], -0.4)])
    module = "model.layers.0.self_attn.q_proj"
    assert (expected[module] - exact[module]).norm() > 0.1 * exact[module].norm()


def test_linear_with_shared_init_does_not_warn(workspace, tmp_path, recwarn):
    out = str(tmp_path / "linear")
    adapters = {"a": workspace["task_r2"], "b": workspace["shared_r2"]}
    merge_adapters(workspace["base"], adapters, [0.5, 0.5], combination="linear", output_dir=out)
    assert not [w for w in recwarn if "not meaningful" in str(w.message)]
    with open(os.path.join(out, "adapter_config.json")) as handle:
        config = json.load(handle)
    # same coverage: the merged adapter keeps the inputs' short target list instead of one name per module
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR) and config["r"] == 2
    assert len(read_deltas(out)) == 4 * 7


def test_inputs_are_never_modified(workspace, tmp_path):
    ws = workspace
    inputs = [ws["base"], ws["task"], ws["alignment"]]
    before = [tree_hash(path) for path in inputs]
    adapters = {"task": ws["task"], "alignment": ws["alignment"]}
    out = str(tmp_path / "out")
    merge_adapters(ws["base"], adapters, output_dir=out)
    merge_adapters(ws["base"], adapters, output_dir=out, overwrite=True, combination="svd", svd_rank=3)
    merge_adapters(ws["base"], adapters, output_dir=str(tmp_path / "full"), merge_into_base=True)
    assert [tree_hash(path) for path in inputs] == before


def test_overwrite_replaces_contents(workspace, tmp_path):
    ws = workspace
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    adapters = {"task": ws["task"], "alignment": ws["alignment"]}
    with pytest.raises(ValueError, match="already exists and is not empty.*overwrite=True"):
        merge_adapters(ws["base"], adapters, output_dir=str(out))
    assert (out / "stale.bin").exists()
    merge_adapters(ws["base"], adapters, output_dir=str(out), overwrite=True)
    assert not (out / "stale.bin").exists()
    assert max_abs_diff(read_deltas(str(out)), weighted_sum([(ws["task"], 1.0), (ws["alignment"], 1.0)])) < 1e-6
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_adapters(ws["base"], adapters, output_dir=str(empty))  # an existing empty directory is fine
    assert (empty / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: every error is raised before a model is loaded
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(merge_module, "_load_base_model", fail)


def copy_adapter(source: str, target, **config_changes) -> str:
    shutil.copytree(source, target)
    config_path = os.path.join(target, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config.update(config_changes)
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    return str(target)


def test_different_base_models_are_refused(workspace, tmp_path, no_loading):
    other = copy_adapter(workspace["alignment"], tmp_path / "other", base_model_name_or_path="Qwen/Qwen2.5-7B")
    with pytest.raises(ValueError, match="different base models.*'Qwen/Qwen2.5-7B'"):
        merge_adapters(workspace["base"], {"task": workspace["task"], "alignment": other})


def test_given_base_differing_from_recorded_warns(workspace, tmp_path):
    other_base = str(tmp_path / "other-base")
    shutil.copytree(workspace["base"], other_base)
    with pytest.warns(UserWarning, match="not the one the adapters record"):
        merge_adapters(other_base, {"task": workspace["task"]})


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"task": 1.0}, r"missing: \['alignment'\]"),
        ({"task": 1.0, "alignment": 1.0, "extra": 2.0}, r"unknown: \['extra'\]"),
        ([1.0], "has 1 value"),
        ([1.0, 2.0, 3.0], "has 3 value"),
        ([1.0, float("nan")], "finite number"),
        ("1.0", "must be a dict"),
    ],
)
def test_weights_must_match_adapters(workspace, weights, message, no_loading):
    with pytest.raises(ValueError, match=message):
        merge_adapters(workspace["base"], {"task": workspace["task"], "alignment": workspace["alignment"]}, weights)


def test_missing_files(workspace, tmp_path, no_loading):
    base = workspace["base"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_adapters(base, {"task": workspace["task"], "alignment": str(tmp_path / "missing")})
    no_config = tmp_path / "no_config"
    shutil.copytree(workspace["alignment"], no_config)
    os.remove(no_config / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_adapters(base, {"task": workspace["task"], "alignment": str(no_config)})
    no_weights = tmp_path / "no_weights"
    shutil.copytree(workspace["alignment"], no_weights)
    os.remove(no_weights / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        merge_adapters(base, {"task": workspace["task"], "alignment": str(no_weights)})
    with pytest.raises(FileNotFoundError, match="is a file"):
        merge_adapters(base, {"task": os.path.join(workspace["task"], "adapter_config.json")})


def test_bad_combination_and_svd_rank(workspace, no_loading):
    adapters = {"task": workspace["task"], "alignment": workspace["alignment"]}
    with pytest.raises(ValueError, match="combination='ties' is not supported"):
        merge_adapters(workspace["base"], adapters, combination="ties")
    with pytest.raises(ValueError, match="svd_rank=4 only applies to combination='svd'"):
        merge_adapters(workspace["base"], adapters, svd_rank=4)
    with pytest.raises(ValueError, match="positive int"):
        merge_adapters(workspace["base"], adapters, combination="svd", svd_rank=0)


def test_svd_rank_larger_than_module(workspace):
    # k_proj maps 64 -> 32 (2 KV heads of 16), so its delta has rank at most 32
    with pytest.raises(ValueError, match="svd_rank=40 exceeds.*k_proj.*svd_rank <= 32"):
        merge_adapters(
            workspace["base"],
            {"task": workspace["task"], "alignment": workspace["alignment"]},
            combination="svd",
            svd_rank=40,
        )


def test_linear_needs_equal_ranks(workspace, no_loading):
    with pytest.raises(ValueError, match="needs adapters of one rank.*'task': 4.*'alignment': 2"):
        merge_adapters(
            workspace["base"], {"task": workspace["task"], "alignment": workspace["alignment"]}, combination="linear"
        )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "trains biases"),
    ],
)
def test_settings_that_are_not_low_rank_deltas(workspace, tmp_path, changes, message, no_loading):
    odd = copy_adapter(workspace["alignment"], tmp_path / "odd", **changes)
    with pytest.raises(ValueError, match=message):
        merge_adapters(workspace["base"], {"task": workspace["task"], "alignment": odd})


def test_non_lora_adapter_is_refused(workspace, tmp_path, no_loading):
    model = AutoModelForCausalLM.from_pretrained(workspace["base"])
    get_peft_model(
        model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="IA3 adapter; merge_adapters combines LoRA adapters only"):
        merge_adapters(workspace["base"], {"task": workspace["task"], "ia3": str(tmp_path / "ia3")})


def test_output_dir_must_not_overlap_inputs(workspace, no_loading):
    adapters = {"task": workspace["task"], "alignment": workspace["alignment"]}
    for output_dir in (workspace["task"], workspace["base"], os.path.join(workspace["alignment"], "sub")):
        with pytest.raises(ValueError, match="overlaps an input"):
            merge_adapters(workspace["base"], adapters, output_dir=output_dir, overwrite=True)


def test_bad_adapter_names(workspace, no_loading):
    with pytest.raises(ValueError, match="non-empty dict"):
        merge_adapters(workspace["base"], {})
    with pytest.raises(ValueError, match="is not valid"):
        merge_adapters(workspace["base"], {"task.v1": workspace["task"]})


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_merge_end_to_end(workspace, tmp_path, capsys):
    ws = workspace
    out = str(tmp_path / "cli")
    argv = ["merge", "--base_model_name_or_path", ws["base"], "--adapters", f"task={ws['task']}"]
    argv += [f"alignment={ws['alignment']}", "--weights", "1.0", "0.5", "--combination", "cat", "--output_dir", out]
    cli_main(argv)
    assert "Saved the merged adapter" in capsys.readouterr().out
    expected = weighted_sum([(ws["task"], 1.0), (ws["alignment"], 0.5)])
    assert max_abs_diff(read_deltas(out), expected) < 1e-6

    with pytest.raises(ValueError, match="already exists"):
        cli_main(argv)
    full = str(tmp_path / "cli_full")
    cli_main([*argv[:-1], full, "--merge_into_base"])
    reference = logits_of(model_with_deltas(ws["base"], expected))
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(full)), reference, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="not name=path"):
        cli_main(["merge", "--adapters", ws["task"], "--output_dir", str(tmp_path / "x")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a usage error, as argparse reports a missing required option
        cli_main(["merge", "--adapters", f"task={ws['task']}"])
    assert exit_info.value.code == 2 and "arguments are required: --output_dir DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--output_dir is required"):
        run_merge(MergeArguments(adapters=[f"task={ws['task']}"]))


# ---------------------------------------------------------------------------------------------------------------------
# Weight search
# ---------------------------------------------------------------------------------------------------------------------


def plain_nll(model, examples: list[tuple[list[int], int]]) -> float:
    """Mean NLL per scored token over all examples `(token ids, index of the first scored token)`, one at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            targets = torch.tensor(ids[start:])
            total += F.cross_entropy(logits[start - 1 : -1].double(), targets, reduction="sum").item()
            count += len(targets)
    return total / count


def plain_task_loss(model, tokenizer, rows) -> float:
    """Mean NLL per completion token (EOS appended), one row at a time."""
    examples = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        examples.append((ids, len(prompt_ids)))
    return plain_nll(model, examples)


def test_search_scores_and_selection_rule(workspace, capsys):
    ws = workspace
    tokenizer = ws["tokenizer"]
    rows = task_rows("prompt_completion", n=8, with_pairs=False)
    pairs = [{"parallel_source": s, "parallel_target": t} for s, t in PAIRS]
    grid = [0.5, 1.0, 2.0]
    best, table = search_merge_weights(
        ws["base"],
        {"task": ws["task"], "alignment": ws["alignment"]},
        rows,
        pairs,
        tokenizer=tokenizer,
        grid=grid,
        weights={"task": 1.0},
        batch_size=8,  # all rows in one batch: SFTTrainer's eval_loss is then the mean over all completion tokens
        max_task_loss_increase=0.05,
    )
    assert capsys.readouterr().out == ""  # library code prints nothing; the CLI prints the table
    assert [row["weight"] for row in table] == [0.0, 0.5, 1.0, 2.0]  # 0 added as the reference
    assert all(row["layer"] == 2 for row in table)  # the alignment adapter changes blocks 0-1: aligned layer 2

    for row in table:  # every score against an independent computation on a plain model with the deltas added
        deltas = weighted_sum([(ws["task"], 1.0), (ws["alignment"], row["weight"])])
        model = model_with_deltas(ws["base"], deltas)
        assert row["task_loss"] == pytest.approx(plain_task_loss(model, tokenizer, rows), rel=1e-4)
        expected_accuracy = probe_layers(model, tokenizer, pairs).retrieval_accuracy["mean"][2]
        assert row["retrieval_accuracy"] == pytest.approx(expected_accuracy)
        assert row["task_loss_change"] == pytest.approx(row["task_loss"] / table[0]["task_loss"] - 1)
    assert len({round(row["task_loss"], 6) for row in table}) == len(table)  # the weights make a difference

    eligible = [row for row in table if row["task_loss"] <= table[0]["task_loss"] * 1.05]
    top = max(row["retrieval_accuracy"] for row in eligible)
    assert best == min((row["weight"] for row in eligible if row["retrieval_accuracy"] == top), key=abs)
    assert [row["weight"] for row in table if row["selected"]] == [best]
    printed = format_search_table(table, "alignment")
    assert "| alignment weight | task loss |" in printed and "retrieval acc @ layer 2" in printed
    assert printed.splitlines()[2 + [row["weight"] for row in table].index(best)].endswith("| * |")

    # with no loss increase allowed, only weights that do not raise the loss qualify
    best_strict, strict = search_merge_weights(
        ws["base"],
        {"task": ws["task"], "alignment": ws["alignment"]},
        rows,
        pairs,
        tokenizer=tokenizer,
        grid=grid,
        max_task_loss_increase=0.0,
    )
    chosen = next(row for row in strict if row["weight"] == best_strict)
    assert chosen["task_loss"] <= strict[0]["task_loss"]


def test_search_bad_input(workspace, no_loading):
    ws = workspace
    adapters = {"task": ws["task"], "alignment": ws["alignment"]}
    rows = task_rows("prompt_completion", n=4, with_pairs=False)
    with pytest.raises(ValueError, match="search_adapter='align' is not one of the adapters"):
        search_merge_weights(ws["base"], adapters, rows, [], search_adapter="align")
    with pytest.raises(ValueError, match="max_task_loss_increase must be >= 0"):
        search_merge_weights(ws["base"], adapters, rows, [], max_task_loss_increase=-0.1)
    with pytest.raises(ValueError, match="task row needs 'prompt' and 'completion'"):
        search_merge_weights(ws["base"], adapters, [{"question": "x"}], [], tokenizer=ws["tokenizer"])


def test_cli_search_then_merge(workspace, tmp_path, capsys):
    ws = workspace
    dev = tmp_path / "dev.jsonl"
    with open(dev, "w") as handle:
        for row in task_rows("prompt_completion", n=8, with_pairs=True):
            handle.write(json.dumps(row) + "\n")
    out = str(tmp_path / "searched")
    cli_main(
        [
            "merge",
            "--base_model_name_or_path",
            ws["base"],
            "--adapters",
            f"task={ws['task']}",
            f"alignment={ws['alignment']}",
            "--search",
            "--search_weights",
            "0.5",
            "1.0",
            "--dev_file",
            str(dev),
            "--batch_size",
            "4",
            "--max_task_loss_increase",
            "0.5",
            "--output_dir",
            out,
        ]
    )
    printed = capsys.readouterr().out
    assert "| alignment weight |" in printed
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "## Weight search" in card
    selected_line = next(line for line in card.splitlines() if line.endswith("| * |"))
    best = float(selected_line.split("|")[1])
    expected = weighted_sum([(ws["task"], 1.0), (ws["alignment"], best)])
    assert max_abs_diff(read_deltas(out), expected) < 1e-6
    with pytest.raises(SystemExit) as exit_info:  # a usage error, as argparse reports a missing required option
        cli_main(["merge", "--adapters", f"task={ws['task']}", f"alignment={ws['alignment']}", "--search"])
    assert exit_info.value.code == 2 and "arguments are required: --dev_file FILE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--search needs --dev_file"):
        run_merge(MergeArguments(adapters=[f"task={ws['task']}", f"alignment={ws['alignment']}"], search=True))


def chat_examples(tokenizer, rows) -> list[tuple[list[int], int]]:
    """Conversational rows as SFT scores them: the completion turns of prompt/completion rows, all of messages."""
    examples = []
    for row in rows:
        if "messages" in row:
            examples.append((tokenizer.apply_chat_template(row["messages"], tokenize=False), None))
            continue
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        assert full.startswith(prompt)
        examples.append((full, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    return [(tokenizer(text, add_special_tokens=False)["input_ids"], start or 1) for text, start in examples]


@pytest.mark.parametrize("fmt", ["text", "messages", "conversational"])
def test_search_task_loss_is_the_sft_loss_of_every_row_format(workspace, fmt):
    """Which tokens the task loss scores, per row format: completion only, or every token of text/messages."""
    ws = workspace
    tokenizer = ws["tokenizer"]
    eos = tokenizer.eos_token
    sentences = [("Play some jazz", "genre: jazz"), ("Turn off the light", "None"), ("Wake me up", "time: now")]
    if fmt == "text":
        rows = [{"text": f"{prompt} -> {completion}"} for prompt, completion in sentences]
        examples = [(tokenizer(row["text"] + eos)["input_ids"], 1) for row in rows]
    else:
        turns = [
            ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}])
            for prompt, completion in sentences
        ]
        if fmt == "messages":
            rows = [{"messages": prompt + completion} for prompt, completion in turns]
        else:
            rows = [{"prompt": prompt, "completion": completion} for prompt, completion in turns]
        examples = chat_examples(tokenizer, rows)
    pairs = [{"parallel_source": s, "parallel_target": t} for s, t in PAIRS[:4]]
    _, table = search_merge_weights(
        ws["base"], {"task": ws["task"], "alignment": ws["alignment"]}, rows, pairs, tokenizer=tokenizer, grid=[1.0]
    )
    assert [row["weight"] for row in table] == [0.0, 1.0]
    for row in table:
        model = model_with_deltas(ws["base"], weighted_sum([(ws["task"], 1.0), (ws["alignment"], row["weight"])]))
        assert row["task_loss"] == pytest.approx(plain_nll(model, examples), rel=1e-4)
    assert table[0]["task_loss"] != pytest.approx(table[1]["task_loss"], rel=1e-4)
