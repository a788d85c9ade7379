"""Bad input to `merge_adapters` / `trl-midalign merge` and the command line surface.

Every case asserts the exact outcome: which exception, that its message names the adapter / file / setting and the
fix, and that no input file changed (every file and folder under the inputs hashed before and after). Cases that need
no model are checked with model loading disabled, so the error comes before any model is loaded.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import fields

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from testing_utils import build_model, build_tokenizer, load_script, task_rows
from transformers import AutoModelForCausalLM

import trl_midalign
from trl_midalign.cli import main as cli_main
from trl_midalign.cli import make_parser
from trl_midalign.cli import merge as cli_merge
from trl_midalign.cli.merge import run_merge
from trl_midalign.demo import DemoArguments, cache_root
from trl_midalign.merging import merge as merge_module
from trl_midalign.merging import merge_adapters
from trl_midalign.merging.arguments import MergeArguments
from trl_midalign.parser import NEGATIVE_FLAG_HELP
from trl_midalign.probing.arguments import ProbeArguments
from trl_midalign.tasks.arguments import RecipeArguments, RecipeModelConfig


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESAVE = "corrupt or incomplete"  # every damaged-file error says this, then how to fix it
FIX = "save the adapter again"


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------------


def save_adapter(base_dir: str, path: str, seed: int, **lora_kwargs) -> str:
    """A LoRA adapter of the model in `base_dir` with random, non-zero A and B (a merge of it is not a no-op)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Llama + tokenizer (`base`), a task adapter (q/v, every block) and an alignment adapter (block 0)."""
    root = tmp_path_factory.mktemp("bad_merge")
    tokenizer = build_tokenizer()
    base = str(root / "base")
    build_model("llama", len(tokenizer), num_layers=2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    task = save_adapter(base, str(root / "task"), seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    alignment = save_adapter(
        base, str(root / "alignment"), seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"],
        layers_to_transform=[0],
    )  # fmt: skip
    return {"root": str(root), "base": base, "task": task, "alignment": alignment}


def adapters_of(ws: dict, **others) -> dict[str, str]:
    return {"task": ws["task"], "alignment": ws["alignment"], **others}


def snapshot(*paths) -> dict[str, str]:
    """Every file (content hash), folder and link under `paths`, keyed by path."""
    state = {}
    for path in map(str, paths):
        if os.path.isfile(path):
            state[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            continue
        for folder, folders, files in os.walk(path):
            state[folder] = "<dir>"
            for name in folders + files:
                full = os.path.join(folder, name)
                if os.path.islink(full):
                    state[full] = "-> " + os.readlink(full)
                elif os.path.isfile(full):
                    with open(full, "rb") as handle:
                        state[full] = hashlib.sha256(handle.read()).hexdigest()
    return state


@contextlib.contextmanager
def unchanged(*paths):
    """Asserts that nothing under `paths` was added, removed or changed inside the block."""
    before = snapshot(*paths)
    assert before, "nothing to watch"
    yield
    assert snapshot(*paths) == before


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were validated")

    monkeypatch.setattr(merge_module, "_load_base_model", fail)


def copy_adapter(source: str, target, **config_changes) -> str:
    shutil.copytree(source, target)
    if config_changes:
        edit_config(str(target), lambda config: config.update(config_changes))
    return str(target)


def edit_config(adapter_dir: str, change) -> None:
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as handle:
        config = json.load(handle)
    change(config)
    with open(path, "w") as handle:
        json.dump(config, handle)


def merge_cli(ws: dict, *extra: str) -> list[str]:
    return ["merge", "--adapters", f"task={ws['task']}", f"alignment={ws['alignment']}", *extra]


# ---------------------------------------------------------------------------------------------------------------------
# Data loss: the output directory must never be, be inside or contain anything the merge reads
# ---------------------------------------------------------------------------------------------------------------------


def output_named(ws: dict, tmp_path, how: str) -> tuple[str, str]:
    """(output_dir, the input it reaches) for one way of naming an input directory."""
    base = ws["base"]
    if how == "recorded base":
        return base, base
    if how == "recorded base, trailing slash":
        return base + os.sep, base
    if how == "recorded base via ..":
        return os.path.join(ws["task"], "..", "base"), base
    if how == "recorded base via symlink":
        link = tmp_path / "link-to-base"
        link.symlink_to(base, target_is_directory=True)
        return str(link), base
    if how == "folder inside recorded base":
        return os.path.join(base, "merged"), base
    if how == "parent of recorded base":
        return ws["root"], base
    if how == "symlink to parent of recorded base":
        link = tmp_path / "link-to-root"
        link.symlink_to(ws["root"], target_is_directory=True)
        return str(link), base
    if how == "adapter":
        return ws["alignment"], ws["alignment"]
    if how == "folder inside adapter":
        return os.path.join(ws["task"], "out"), ws["task"]
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "recorded base",
        "recorded base, trailing slash",
        "recorded base via ..",
        "recorded base via symlink",
        "folder inside recorded base",
        "parent of recorded base",
        "symlink to parent of recorded base",
        "adapter",
        "folder inside adapter",
    ],
)
def test_cli_merge_into_recorded_base_is_refused(ws, tmp_path, how, no_loading):
    """The reported data loss: no --base_model_name_or_path, --overwrite --merge_into_base onto the recorded base."""
    output_dir, reached = output_named(ws, tmp_path, how)
    with unchanged(ws["root"]):
        with pytest.raises(ValueError, match="overlaps an input") as error:
            cli_main(merge_cli(ws, "--output_dir", output_dir, "--overwrite", "--merge_into_base"))
    message = str(error.value)
    assert repr(output_dir) in message and os.path.realpath(reached) in message
    assert "outside every input" in message and "--output_dir" in message
    if reached == ws["base"]:
        assert "base_model_name_or_path in its adapter_config.json" in message
    assert not os.path.exists(os.path.join(ws["base"], "merged"))  # nothing created inside an input either


def test_python_merge_into_recorded_base_is_refused(ws, no_loading):
    with unchanged(ws["root"]):
        with pytest.raises(ValueError, match=r"overlaps an input: it is the base model directory that adapter 'task'"):
            merge_adapters(None, adapters_of(ws), output_dir=ws["base"], merge_into_base=True, overwrite=True)


def test_suggested_output_dir_works(ws, tmp_path):
    """The directory the error suggests is outside every input: the same merge succeeds there."""
    with pytest.raises(ValueError) as error:
        merge_adapters(None, adapters_of(ws), output_dir=ws["base"], overwrite=True)
    suggestion = re.search(r"for example '([^']+)'", str(error.value)).group(1)
    assert suggestion == os.path.realpath(ws["base"]) + "-merged"
    with unchanged(ws["base"], ws["task"], ws["alignment"]):
        merge_adapters(None, adapters_of(ws), output_dir=suggestion)
    assert os.path.isfile(os.path.join(suggestion, "adapter_model.safetensors"))
    shutil.rmtree(suggestion)


def test_recorded_base_protected_when_another_base_is_given(ws, tmp_path, no_loading):
    """An explicit base copy is loaded, but the base the adapters record is still an input the output may not hit."""
    copy = str(tmp_path / "base-copy")
    shutil.copytree(ws["base"], copy)
    with unchanged(ws["root"], copy):
        with pytest.raises(ValueError, match=r"it is the base model directory that adapter 'task' records"):
            merge_adapters(copy, adapters_of(ws), output_dir=ws["base"], overwrite=True)
        with pytest.raises(ValueError, match=r"it is the base model directory \(base_model"):
            merge_adapters(copy, adapters_of(ws), output_dir=copy, overwrite=True)


def test_source_of_a_base_model_instance_is_protected(ws, tmp_path, monkeypatch):
    """A model instance passed as the base: the directory it was loaded from is protected too."""
    copy = str(tmp_path / "base-copy")
    shutil.copytree(ws["base"], copy)
    model = AutoModelForCausalLM.from_pretrained(copy)
    with unchanged(ws["root"], copy):
        with pytest.raises(ValueError, match=r"it is the directory the given base model was loaded from"):
            merge_adapters(model, adapters_of(ws), output_dir=copy, overwrite=True, merge_into_base=True)


def test_relative_recorded_base_is_protected(ws, tmp_path, monkeypatch, no_loading):
    """Adapters that record the base as a relative path: resolved from the working directory, as PEFT loads it."""
    work = tmp_path / "work"
    shutil.copytree(ws["base"], work / "models" / "base")
    task = copy_adapter(ws["task"], work / "task", base_model_name_or_path="models/base")
    monkeypatch.chdir(work)
    with unchanged(work):
        with pytest.raises(ValueError, match=r"overlaps an input: it is the base model directory that adapter 'task'"):
            cli_main(["merge", "--adapters", f"task={task}", "--output_dir", "./models/base/", "--overwrite"])


@pytest.mark.parametrize("which", ["--dev_file", "--pairs_file"])
def test_search_files_inside_output_dir_are_protected(ws, tmp_path, which, no_loading):
    """With --search, the dev / pairs files are inputs: an output_dir that holds them is refused before the search."""
    out = tmp_path / "out"
    out.mkdir()
    rows = "".join(json.dumps(row) + "\n" for row in task_rows(n=4))
    (out / "dev.jsonl").write_text(rows)
    outside = tmp_path / "dev_outside.jsonl"
    outside.write_text(rows)
    dev = str(out / "dev.jsonl") if which == "--dev_file" else str(outside)
    pairs = ["--pairs_file", str(out / "dev.jsonl")] if which == "--pairs_file" else []
    with unchanged(ws["root"], out, outside):
        with pytest.raises(ValueError, match=f"it contains the {which}, '{re.escape(str(out / 'dev.jsonl'))}'"):
            cli_main(merge_cli(ws, "--search", "--dev_file", dev, *pairs, "--output_dir", str(out), "--overwrite"))


def test_hub_cache_is_protected_when_inputs_come_from_the_hub(ws, tmp_path, monkeypatch, no_loading):
    """A base recorded as a Hub id is read from the Hugging Face cache: an output_dir holding the cache is refused."""
    from huggingface_hub import constants

    home = tmp_path / "home"
    (home / "hub" / "models--org--model").mkdir(parents=True)
    (home / "hub" / "models--org--model" / "weights").write_text("cached")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    task = copy_adapter(ws["task"], tmp_path / "task", base_model_name_or_path="org/model")
    with unchanged(home, task):
        with pytest.raises(ValueError, match="it contains the Hugging Face cache"):
            merge_adapters(None, {"task": task}, output_dir=str(home), overwrite=True)


def test_symlinked_non_empty_output_dir_is_not_overwritten_through_the_link(ws, tmp_path, no_loading):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    with unchanged(ws["root"], target):
        with pytest.raises(ValueError, match=r"is a symbolic link to .*elsewhere.*Pass the directory itself"):
            merge_adapters(ws["base"], adapters_of(ws), output_dir=str(link), overwrite=True)


# ---------------------------------------------------------------------------------------------------------------------
# Damaged adapter files: name the adapter and the file, say it is corrupt or incomplete and how to fix it
# ---------------------------------------------------------------------------------------------------------------------


def truncate(path: str, keep) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: keep(len(data))])


@pytest.mark.parametrize(
    "keep", [lambda n: 0, lambda n: 7, lambda n: n // 2, lambda n: n - 1], ids=["empty", "7 bytes", "half", "n-1"]
)
def test_truncated_weights(ws, tmp_path, keep, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "cut")
    weights = os.path.join(bad, "adapter_model.safetensors")
    truncate(weights, keep)
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'alignment': the weights file .* cannot be read") as error:
            merge_adapters(None, adapters_of(ws, alignment=bad), output_dir=str(tmp_path / "out"))
    assert weights in str(error.value) and RESAVE in str(error.value) and FIX in str(error.value)
    assert not (tmp_path / "out").exists()


def test_truncated_weights_from_the_cli(ws, tmp_path, no_loading):
    bad = copy_adapter(ws["task"], tmp_path / "cut")
    truncate(os.path.join(bad, "adapter_model.safetensors"), lambda n: n // 2)
    argv = ["merge", "--adapters", f"task={bad}", f"alignment={ws['alignment']}", "--output_dir", str(tmp_path / "o")]
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'task': the weights file .*cut.* corrupt or incomplete"):
            cli_main(argv)


def test_corrupt_bin_weights(ws, tmp_path, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "bin")
    os.remove(os.path.join(bad, "adapter_model.safetensors"))
    with open(os.path.join(bad, "adapter_model.bin"), "wb") as handle:
        handle.write(b"PK\x03\x04 not a complete archive")
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'alignment': the weights file .*adapter_model\.bin.*cannot be"):
            merge_adapters(None, adapters_of(ws, alignment=bad))


def rewrite_weights(adapter_dir: str, change) -> None:
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    state = load_file(path)
    save_file(change(state), path)


def test_weights_without_lora_tensors(ws, tmp_path, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "nolora")
    rewrite_weights(bad, lambda state: {"model.norm.weight": torch.ones(4)})
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'alignment': the weights file .* holds no LoRA weights"):
            merge_adapters(None, adapters_of(ws, alignment=bad))


def test_weights_with_half_a_module(ws, tmp_path, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "half_module")
    rewrite_weights(bad, lambda state: {k: v for k, v in state.items() if "layers.0.mlp.up_proj.lora_B" not in k})
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'alignment'.*only one of lora_A / lora_B.*up_proj"):
            merge_adapters(None, adapters_of(ws, alignment=bad))


@pytest.mark.parametrize(
    "extra",
    ["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", "base_model.model.lm_head.weight"],
    ids=["dora_magnitude", "saved_module"],
)
def test_weights_with_state_besides_the_lora_factors(ws, tmp_path, extra, no_loading):
    """State a weighted sum of deltas would drop, whatever setting made it: refused from the file, not the config."""
    bad = copy_adapter(ws["alignment"], tmp_path / "extra")
    rewrite_weights(bad, lambda state: {**state, extra: torch.ones(4)})
    with unchanged(ws["root"], bad):
        with pytest.raises(
            ValueError,
            match=rf"Adapter 'alignment'.*holds 1 tensor\(s\) besides the LoRA factors \(e\.g\. {re.escape(extra)}\)",
        ) as error:
            merge_adapters(None, adapters_of(ws, alignment=bad))
    assert "merge_and_unload" in str(error.value)


def test_weights_missing_a_targeted_module(ws, tmp_path):
    """A module the config targets has no weights in the file: it would merge as untrained initial values."""
    bad = copy_adapter(ws["alignment"], tmp_path / "missing_module")
    rewrite_weights(bad, lambda state: {k: v for k, v in state.items() if "layers.0.mlp.up_proj" not in k})
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'alignment': its weights file lacks the LoRA weights of 1 of"):
            merge_adapters(None, adapters_of(ws, alignment=bad), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_weights_for_modules_the_config_does_not_target(ws, tmp_path):
    bad = copy_adapter(ws["alignment"], tmp_path / "untargeted", target_modules=["q_proj"])
    with unchanged(ws["root"], bad):
        with pytest.raises(
            ValueError, match=r"Adapter 'alignment'.*module\(s\) that its adapter_config.json does not"
        ):
            merge_adapters(None, adapters_of(ws, alignment=bad))


def test_config_rank_that_does_not_fit_the_weights(ws, tmp_path):
    bad = copy_adapter(ws["alignment"], tmp_path / "rank", r=4)
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=r"Adapter 'alignment' \(.*rank.*\) does not fit the base model") as error:
            merge_adapters(None, adapters_of(ws, alignment=bad))
    assert "size mismatch" in str(error.value) and "save it again" in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is not valid JSON"),
        ('{"peft_type": "LORA", "r": 2,', "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
    ],
    ids=["empty", "cut", "binary", "list"],
)
def test_broken_adapter_config(ws, tmp_path, content, message, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "json")
    config = os.path.join(bad, "adapter_config.json")
    with open(config, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=f"Adapter 'alignment': {re.escape(config)} {message}") as error:
            merge_adapters(None, adapters_of(ws, alignment=bad))
    assert RESAVE in str(error.value) and FIX in str(error.value)


@pytest.mark.parametrize("key", ["peft_type", "r", "lora_alpha", "target_modules"])
@pytest.mark.parametrize("how", ["absent", "null"])
def test_adapter_config_missing_key(ws, tmp_path, key, how, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "keys")
    edit_config(bad, lambda config: config.pop(key) if how == "absent" else config.update({key: None}))
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=f"Adapter 'alignment': .*adapter_config.json lacks {key} ") as error:
            merge_adapters(None, adapters_of(ws, alignment=bad))
    assert RESAVE in str(error.value)


@pytest.mark.parametrize(
    "changes, message",
    [({"r": "2"}, "r='2', not a positive int"), ({"r": 0}, "r=0, not a positive int"), ({"lora_alpha": "4"}, "lora")],
)
def test_adapter_config_bad_values(ws, tmp_path, changes, message, no_loading):
    bad = copy_adapter(ws["alignment"], tmp_path / "values", **changes)
    with unchanged(ws["root"], bad):
        with pytest.raises(ValueError, match=f"Adapter 'alignment': .*adapter_config.json has {message}"):
            merge_adapters(None, adapters_of(ws, alignment=bad))


# ---------------------------------------------------------------------------------------------------------------------
# Paths that do not exist: "does not exist", naming the adapter or setting (not "Repo id must be in the form ...")
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./does/not/exist", "ABSOLUTE", "../missing-adapter", "missing-adapter"])
def test_missing_adapter_path(ws, tmp_path, path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "x" / "y") if path == "ABSOLUTE" else path
    with unchanged(ws["root"]):
        with pytest.raises(FileNotFoundError, match=f"Adapter 'alignment': '{re.escape(path)}' does not exist"):
            merge_adapters(None, adapters_of(ws, alignment=path))


def test_missing_adapter_path_that_looks_like_a_repo_id(ws, no_loading):
    with unchanged(ws["root"]):
        with pytest.raises(
            FileNotFoundError, match=r"Adapter 'alignment': 'out/align-lora' does not exist as a local"
        ):
            merge_adapters(None, adapters_of(ws, alignment="out/align-lora"))


@pytest.mark.parametrize("path", ["./does/not/exist", "ABSOLUTE"])
def test_missing_base_path(ws, tmp_path, path, no_loading):
    path = str(tmp_path / "x" / "y") if path == "ABSOLUTE" else path
    with unchanged(ws["root"]):
        with pytest.raises(
            FileNotFoundError, match=rf"base model '{re.escape(path)}' .*--base_model_name_or_path.* does"
        ):
            cli_main(merge_cli(ws, "--base_model_name_or_path", path, "--output_dir", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_missing_recorded_base(ws, tmp_path, no_loading):
    missing = str(tmp_path / "gone" / "base")
    task = copy_adapter(ws["task"], tmp_path / "task", base_model_name_or_path=missing)
    with unchanged(ws["root"], task):
        with pytest.raises(
            FileNotFoundError, match=rf"Adapter 'task' records base_model_name_or_path='{re.escape(missing)}'"
        ) as error:
            merge_adapters(None, {"task": task})
    assert "does not exist" in str(error.value) and "--base_model_name_or_path" in str(error.value)


def test_recorded_hub_base_that_cannot_be_loaded(ws, tmp_path):
    """Offline (conftest), a recorded Hub id that is not cached: the error names it and where it came from."""
    task = copy_adapter(ws["task"], tmp_path / "task", base_model_name_or_path="no-such-org/no-such-model")
    with unchanged(ws["root"], task):
        with pytest.raises(OSError, match=r"'no-such-org/no-such-model' \(recorded as base_model_name_or_path in the"):
            merge_adapters(None, {"task": task})


# ---------------------------------------------------------------------------------------------------------------------
# Cases that already gave clear errors: still clear, still before any model is loaded, inputs intact
# ---------------------------------------------------------------------------------------------------------------------


def test_different_base_models(ws, tmp_path, no_loading):
    other = copy_adapter(ws["alignment"], tmp_path / "other", base_model_name_or_path="Qwen/Qwen2.5-7B")
    with unchanged(ws["root"], other):
        with pytest.raises(ValueError, match=r"different base models: 'task' on .*base' and 'alignment' on 'Qwen/Qw"):
            merge_adapters(None, adapters_of(ws, alignment=other))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"combination": "ties"}, r"combination='ties' is not supported"),
        ({"svd_rank": 4}, r"svd_rank=4 only applies to combination='svd'"),
        ({"combination": "svd", "svd_rank": 0}, r"svd_rank must be a positive int, got 0"),
        ({"combination": "linear"}, None),  # replaced below: needs equal ranks
        ({"weights": [1.0, float("nan")]}, r"weight of adapter 'alignment' must be a finite number, got nan"),
        ({"weights": [1.0, True]}, r"weight of adapter 'alignment' must be a finite number, got True"),
        ({"weights": [1.0]}, r"weights has 1 value\(s\) but there are 2 adapters"),
        ({"weights": {"task": 1.0, "align": 1.0}}, r"missing: \['alignment'\], unknown: \['align'\]"),
        ({"weights": "1.0"}, r"weights must be a dict"),
    ],
)
def test_bad_settings(ws, tmp_path, kwargs, message, no_loading):
    adapters = adapters_of(ws)
    if kwargs == {"combination": "linear"}:
        adapters["alignment"] = copy_adapter(ws["alignment"], tmp_path / "r4", r=4)
        message = r"combination='linear' needs adapters of one rank, got ranks \{'task': 2, 'alignment': 4\}"
    with unchanged(ws["root"]):
        with pytest.raises(ValueError, match=message):
            merge_adapters(None, adapters, output_dir=str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, r"Adapter 'alignment' uses use_dora=True"),
        ({"modules_to_save": ["lm_head"]}, r"Adapter 'alignment' uses modules_to_save"),
        ({"bias": "all"}, r"Adapter 'alignment' trains biases \(bias='all'\)"),
    ],
)
def test_settings_that_are_not_low_rank_deltas(ws, tmp_path, changes, message, no_loading):
    odd = copy_adapter(ws["alignment"], tmp_path / "odd", **changes)
    with unchanged(ws["root"], odd):
        with pytest.raises(ValueError, match=message):
            merge_adapters(None, adapters_of(ws, alignment=odd))


def test_non_lora_adapter(ws, tmp_path, no_loading):
    model = AutoModelForCausalLM.from_pretrained(ws["base"])
    ia3 = str(tmp_path / "ia3")
    config = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(model, config).save_pretrained(ia3)
    with unchanged(ws["root"], ia3):
        with pytest.raises(ValueError, match=r"Adapter 'ia3' is a IA3 adapter; merge_adapters combines LoRA adapters"):
            merge_adapters(None, {"task": ws["task"], "ia3": ia3})


def test_adapter_folder_problems(ws, tmp_path, no_loading):
    no_config = copy_adapter(ws["alignment"], tmp_path / "no_config")
    os.remove(os.path.join(no_config, "adapter_config.json"))
    no_weights = copy_adapter(ws["alignment"], tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    file = os.path.join(ws["alignment"], "adapter_config.json")
    with unchanged(ws["root"], no_config, no_weights):
        with pytest.raises(FileNotFoundError, match=r"Adapter 'alignment': .*no_config' has no adapter_config.json"):
            merge_adapters(None, adapters_of(ws, alignment=no_config))
        with pytest.raises(FileNotFoundError, match=r"Adapter 'alignment': .*no_weights' has adapter_config.json but"):
            merge_adapters(None, adapters_of(ws, alignment=no_weights))
        with pytest.raises(FileNotFoundError, match=rf"Adapter 'alignment': '{re.escape(file)}' is a file"):
            merge_adapters(None, adapters_of(ws, alignment=file))


def test_bad_adapter_names(ws, no_loading):
    with unchanged(ws["root"]):
        with pytest.raises(ValueError, match=r"Adapter name 'task.v1' is not valid"):
            merge_adapters(None, {"task.v1": ws["task"]})
        with pytest.raises(ValueError, match=r"adapters must be a non-empty dict"):
            merge_adapters(None, {})
        with pytest.raises(ValueError, match=r"--adapters names 'task' twice"):
            cli_main(["merge", "--adapters", f"task={ws['task']}", f"task={ws['alignment']}", "--output_dir", "x"])
        with pytest.raises(ValueError, match=r"--adapters entry '.*task' is not name=path"):
            cli_main(["merge", "--adapters", ws["task"], "--output_dir", "x"])


def test_output_dir_exists_without_overwrite(ws, tmp_path, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.bin").write_text("an older merge")
    with unchanged(ws["root"], out):
        with pytest.raises(ValueError, match=r"output_dir='.*out' already exists and is not empty.*--overwrite"):
            cli_main(merge_cli(ws, "--output_dir", str(out)))


def test_output_dir_is_a_file(ws, tmp_path, no_loading):
    file = tmp_path / "out.txt"
    file.write_text("x")
    with unchanged(ws["root"], file):
        with pytest.raises(ValueError, match=r"output_dir='.*out.txt' is a file; pass a directory path"):
            merge_adapters(None, adapters_of(ws), output_dir=str(file), overwrite=True)


def test_output_dir_empty_string(ws, no_loading):
    with unchanged(ws["root"]):
        with pytest.raises(ValueError, match=r"output_dir is an empty string; pass the directory .*--output_dir"):
            merge_adapters(None, adapters_of(ws), output_dir="")


def test_search_adapter_not_among_the_adapters(ws, tmp_path, no_loading):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(row) + "\n" for row in task_rows(n=4)))
    with unchanged(ws["root"], dev):
        with pytest.raises(ValueError, match=r"search_adapter='align' is not one of the adapters \['task', 'alignm"):
            cli_main(merge_cli(ws, "--search", "--search_adapter", "align", "--dev_file", str(dev)))


def test_peft_model_as_base(ws, tmp_path):
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws["base"]), ws["task"])
    with unchanged(ws["root"]):
        with pytest.raises(ValueError, match=r"base_model is already a PeftModel"):
            merge_adapters(peft_model, adapters_of(ws), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Command line surface
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["merge"], ["--adapters NAME=PATH", "--output_dir DIR"]),
        (["merge", "--adapters", "task=t"], ["--output_dir DIR"]),
        (["merge", "--adapters", "task=t", "--search"], ["--dev_file FILE"]),
        (["merge", "--output_dir", "o"], ["--adapters NAME=PATH"]),
    ],
)
def test_missing_required_options_are_a_usage_error(argv, missing, capsys, monkeypatch):
    monkeypatch.setattr(cli_merge, "run_merge", lambda args: pytest.fail("ran despite missing options"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: trl-midalign merge --adapters NAME=PATH")
    assert "trl-midalign merge: error: the following arguments are required: " in err
    assert all(option in err for option in missing)
    assert "Traceback" not in err


def test_run_merge_still_checks_its_arguments_from_python(ws):
    with pytest.raises(ValueError, match=r"--output_dir is required"):
        run_merge(MergeArguments(adapters=[f"task={ws['task']}"]))
    with pytest.raises(ValueError, match=r"--search needs --dev_file"):
        run_merge(MergeArguments(adapters=[f"task={ws['task']}"], search=True))
    with pytest.raises(ValueError, match=r"--adapters is required"):
        run_merge(MergeArguments(output_dir="o"))


def test_required_options_are_marked_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["merge", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trl-midalign merge --adapters NAME=PATH [NAME=PATH ...] --output_dir DIR")
    helps = {action.dest: action.help for action in make_parser("merge")._actions}
    assert helps["adapters"].startswith("Required.")
    assert helps["output_dir"].startswith("Required (unless --search")
    assert helps["dev_file"].startswith("Required with --search.")


def test_version(capsys):
    cli_main(["--version"])
    assert capsys.readouterr().out == f"trl-midalign {trl_midalign.__version__}\n"
    from importlib.metadata import version

    assert version("trl-midalign") == trl_midalign.__version__


@pytest.mark.parametrize("argv, message", [([], "a command is required"), (["merj"], "unknown command 'merj'")])
def test_no_or_unknown_command(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: trl-midalign <command>" in err and f"trl-midalign: error: {message}" in err


RECIPES = ("slot_filling", "translation", "structured_generation")


def recipe(name: str):
    """The recipe script `recipes/{name}.py` as a module (its `main` does not run)."""
    return load_script(os.path.join(ROOT, "recipes", f"{name}.py"))


def recipe_parsers():
    for name in RECIPES:
        yield name, recipe(name).make_parser()


def negative_flags(parser) -> dict[str, tuple[str, str]]:
    """{dest: (help of --X, help of --no_X)} for every --no_X flag of the parser."""
    positive = {a.dest: a.help for a in parser._actions if f"--{a.dest}" in a.option_strings}
    return {a.dest: (positive[a.dest], a.help) for a in parser._actions if f"--no_{a.dest}" in a.option_strings}


def test_negative_flags_say_what_disabling_does():
    parsers = [(command, make_parser(command)) for command in ("probe", "merge", "demo")] + list(recipe_parsers())
    seen = {}
    for name, parser in parsers:
        for dest, (positive, negative) in negative_flags(parser).items():
            assert negative and negative != positive, f"{name}: --no_{dest} repeats the help of --{dest}"
            seen[dest] = negative
    assert seen["plot"] == NEGATIVE_FLAG_HELP["plot"] and seen["plot"].startswith("Do not write")
    assert seen["alignment"] == NEGATIVE_FLAG_HELP["alignment"] and "without the alignment loss" in seen["alignment"]
    assert seen["remove_unused_columns"].startswith("Turn --remove_unused_columns off (--remove_unused_columns: ")


def test_every_project_negative_flag_has_its_own_text():
    """Guard against rot: each boolean option of ours that defaults to True has an entry in NEGATIVE_FLAG_HELP."""
    task_arguments = [
        cls for _, parser in recipe_parsers() for cls in parser.dataclass_types if issubclass(cls, RecipeArguments)
    ]
    assert len(task_arguments) == len(RECIPES)
    ours = {
        f.name
        for cls in (ProbeArguments, MergeArguments, DemoArguments, *task_arguments, RecipeModelConfig)
        for f in fields(cls)
        if f.type in (bool, "bool") and f.default is True and (cls is not RecipeModelConfig or f.name == "use_peft")
    }
    assert ours == set(NEGATIVE_FLAG_HELP)


def test_recipe_help_uses_the_negative_texts(capsys):
    with pytest.raises(SystemExit):
        recipe("slot_filling").make_parser().parse_args_and_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no_use_peft, --no-use-peft Train the full model instead of a LoRA adapter" in out
    assert "--no_alignment, --no-alignment Train without the alignment loss" in out


def test_demo_cache_dir_help_names_the_real_default(tmp_path, monkeypatch):
    help_text = next(a.help for a in make_parser("demo")._actions if a.dest == "cache_dir")
    assert "$TRL_MIDALIGN_CACHE" in help_text and "~/.cache/trl_midalign" in help_text
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TRL_MIDALIGN_CACHE", raising=False)
    assert cache_root() == tmp_path / ".cache" / "trl_midalign"  # the default the help names
    monkeypatch.setenv("TRL_MIDALIGN_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
