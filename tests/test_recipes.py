"""End-to-end tests of the recipes: config parsing, in-process runs, bad input, the Hub push (against a local stand-in
for the Hub's HTTP API) and 2-process `accelerate launch` runs under DDP, DeepSpeed ZeRO-2 and ZeRO-3 on CPU.

The launches also check what no user run checks any more: that every process ends training with the same trainable
weights (those of the saved adapter), and that ZeRO-3 really partitions the model. A small wrapper script runs the
recipe with a callback that records both (see `RANK_RECORDING_SCRIPT`).

Everything runs offline on a tiny Llama saved to a temporary folder with the offline tokenizer of testing_utils.py,
and a few local rows per recipe.
"""

import base64
import functools
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
from safetensors.torch import load_file
from testing_utils import build_model, build_tokenizer, load_script, write_jsonl

from trl_midalign.tasks.arguments import PAPER_LORA_MODULES


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")


RECIPE_NAMES = ("slot_filling", "translation", "structured_generation")
# On a machine without GPU, TRL's default bf16 needs --use_cpu (as documented in recipes/README.md)
FAST = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--max_new_tokens",
    "6",
    "--report_to",
    "none",
    "--use_cpu",
]


@functools.cache
def recipe(name: str):
    """The module of `recipes/<name>.py`, loaded from its file (the recipes are scripts, not a package)."""
    return load_script(os.path.join(RECIPES, f"{name}.py"))


# ----------------------------------------------------------------------------------------------------------------------
# Data and model, made once per module
MASSIVE = [  # (id, locale, annotated utterance)
    ("0", "en-US", "wake me up at [time : seven]"),
    ("0", "de-DE", "weck mich um [time : sieben] auf"),
    ("0", "fr-FR", "réveille-moi à [time : sept heures]"),
    ("1", "en-US", "what is the weather [date : tomorrow]"),
    ("1", "de-DE", "wie wird das wetter [date : morgen]"),
    ("1", "fr-FR", "quel temps fera-t-il [date : demain]"),
    ("2", "en-US", "play some [music_genre : jazz]"),
    ("2", "de-DE", "spiele etwas [music_genre : jazz]"),
    ("2", "fr-FR", "joue du [music_genre : jazz]"),
    ("3", "en-US", "turn off the light"),
    ("3", "de-DE", "schalte das licht aus"),
    ("3", "fr-FR", "éteins la lumière"),
]
TRANSLATIONS = [
    ("de", "Weck mich um sieben Uhr", "Wake me up at seven"),
    ("de", "Spiele etwas Jazz", "Play some jazz"),
    ("de", "Schalte das Licht aus", "Turn off the light"),
    ("de", "Wer hat dieses Lied gesungen", "Who sang this song"),
    ("fr", "Joue du jazz", "Play jazz music"),
    ("fr", "Éteins la lumière", "Switch the light off"),
]
NER = [  # (language, tokens, tags, parallel pair or None)
    ("en", ["Ada", "Lovelace", "visited", "London"], ["B-PER", "I-PER", "O", "B-LOC"], None),
    ("en", ["Play", "music", "by", "Miles", "Davis"], ["O", "O", "O", "B-PER", "I-PER"], None),
    ("en", ["Turn", "off", "the", "light"], ["O", "O", "O", "O"], None),
    ("en", ["Google", "opened", "in", "Paris"], ["B-ORG", "O", "O", "B-LOC"], None),
    ("de", ["Ada", "besuchte", "London"], ["B-PER", "O", "B-LOC"], ("Ada besuchte London", "Ada visited London")),
    ("de", ["Schalte", "das", "Licht", "aus"], ["O"] * 4, ("Schalte das Licht aus", "Turn off the light")),
    ("fr", ["Google", "à", "Paris"], ["B-ORG", "O", "B-LOC"], ("Google à Paris", "Google in Paris")),
    ("fr", ["Joue", "du", "jazz"], ["O"] * 3, ("Joue du jazz", "Play jazz music")),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama with the offline tokenizer, and local train/test files for the three recipes."""
    root = tmp_path_factory.mktemp("recipes")
    tokenizer = build_tokenizer()
    model_dir = str(root / "tiny-llama")
    build_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    massive = [
        {"id": i, "locale": loc, "utt": re.sub(r"\[\s*[^:\]]+?\s*:\s*([^\]]*?)\s*\]", r"\1", a), "annot_utt": a}
        for i, loc, a in MASSIVE
    ]
    mt = [{"translation": {lang: x, "en": e}} for lang, x, e in TRANSLATIONS]
    ner = [
        {"language": lang, "tokens": t, "ner_tags": g, "parallel_source": p and p[0], "parallel_target": p and p[1]}
        for lang, t, g, p in NER
    ]
    data = {}
    for name, rows in (("slot_filling", massive), ("translation", mt), ("structured_generation", ner)):
        for split in ("train", "test"):
            write_jsonl(str(root / name / f"{split}.jsonl"), rows)
        data[name] = str(root / name)
    return {"root": root, "model": model_dir, "data": data, "tokenizer": tokenizer}


def fast_run(work: dict, name: str, output_dir) -> list[str]:
    """The arguments of a short run of recipe `name` on the tiny model and the local rows of `work`."""
    return [
        "--model_name_or_path", work["model"], "--dataset_name", work["data"][name], "--output_dir", str(output_dir),
        *FAST,
    ]  # fmt: skip


def run_main(name: str, argv: list[str]):
    module = recipe(name)
    return module.main(*module.make_parser().parse_args_and_config(argv))


def reload_predictions(model_dir: str, adapter_dir: str, max_new_tokens: int = 6) -> tuple[list[str], list[str]]:
    """Generate the evaluation prompts of a run again with its saved adapter; return (recorded, regenerated)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign.tasks.report import generate_completions

    with open(os.path.join(adapter_dir, "eval_predictions.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in records]
    regenerated = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, disable_progress=True)
    return [r["prediction"] for r in records], regenerated


def adapter_fingerprint(adapter_dir: str) -> dict:
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    values = [t.double() for t in tensors.values()]
    return {
        "sum": sum(v.sum().item() for v in values),
        "abs_sum": sum(v.abs().sum().item() for v in values),
        "sq_sum": sum(v.square().sum().item() for v in values),
        "numel": sum(v.numel() for v in values),
        "lora_B_abs_sum": sum(t.abs().sum().item() for k, t in tensors.items() if "lora_B" in k),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Configs and parsing
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(RECIPES, "configs", "*.yaml"))))
def test_shipped_configs_parse_with_current_trl(path):
    name = next(n for n in (*RECIPE_NAMES, "classification") if os.path.basename(path).startswith(n))
    script_args, training_args, model_args = (
        recipe(name).make_parser().parse_args_and_config(["--config", path, "--use_cpu"])
    )
    # The paper's settings
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (8, 16, 0.1)
    assert set(model_args.lora_target_modules) == set(PAPER_LORA_MODULES)
    assert training_args.learning_rate == 5e-4 and training_args.warmup_steps == 0.03
    assert training_args.lr_scheduler_type.value == "inverse_sqrt"
    assert (training_args.align_layer, training_args.align_temperature) == ("middle", 0.1)
    assert training_args.align_schedule == "alternate" and script_args.alignment is True
    assert model_args.model_name_or_path in ("meta-llama/Meta-Llama-3-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct")
    assert script_args.train_languages and script_args.eval_languages


def test_accelerate_configs_are_complete():
    import yaml

    configs = {
        os.path.basename(p): yaml.safe_load(open(p))
        for p in glob.glob(os.path.join(RECIPES, "accelerate_configs", "*.yaml"))
    }
    assert set(configs) >= {"single_gpu.yaml", "ddp.yaml", "zero2.yaml", "zero2_offload.yaml", "zero3.yaml"}
    assert configs["ddp.yaml"]["distributed_type"] == "MULTI_GPU"
    assert configs["zero2.yaml"]["deepspeed_config"]["zero_stage"] == 2
    assert configs["zero2_offload.yaml"]["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    ds_file = os.path.join(ROOT, configs["zero3.yaml"]["deepspeed_config"]["deepspeed_config_file"])
    assert json.load(open(ds_file))["zero_optimization"]["stage"] == 3


def test_unknown_yaml_key_is_refused_with_a_suggestion(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: x\ndataset_name: y\nalign_layr: middle\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'align_layr' \(did you mean 'align_layer'"):
        recipe("slot_filling").make_parser().parse_args_and_config(["--config", str(config), "--output_dir", "o"])


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any training
def test_bad_input_fails_before_training(work, tmp_path):
    base = ["--model_name_or_path", work["model"], "--output_dir", str(tmp_path / "out"), *FAST]
    massive = work["data"]["slot_filling"]
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        run_main("slot_filling", [*base, "--dataset_name", massive, "--push_to_hub"])
    with pytest.raises(ValueError, match=r"unknown MASSIVE locale 'de-XX'.*Did you mean 'de-DE'"):
        run_main("slot_filling", [*base, "--dataset_name", massive, "--eval_languages", "de-XX"])
    with pytest.raises(ValueError, match=r"unknown language code 'xx'"):
        run_main("translation", [*base, "--dataset_name", work["data"]["translation"], "--train_languages", "xx-en"])
    with pytest.raises(ValueError, match=r"no rows for language\(s\) \['it-IT'\]"):
        run_main("slot_filling", [*base, "--dataset_name", massive, "--eval_languages", "it-IT"])
    broken = tmp_path / "broken"
    rows = [{"locale": "en-US", "utt": "hi", "id": "0"}, {"locale": "de-DE", "utt": "hallo", "id": "0"}]
    write_jsonl(str(broken / "train.jsonl"), rows)
    write_jsonl(str(broken / "test.jsonl"), rows)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['annot_utt'\]"):
        run_main("slot_filling", [*base, "--dataset_name", str(broken)])
    with pytest.raises(ValueError, match="--use_peft"):
        run_main("slot_filling", [*base, "--dataset_name", massive, "--no_use_peft"])
    elsewhere = ["--eval_only", "--adapter_path", str(tmp_path / "other"), "--push_to_hub", "--hub_model_id", "me/x"]
    with pytest.raises(ValueError, match="--eval_only with --push_to_hub pushes output_dir"):
        run_main("slot_filling", [*base, "--dataset_name", massive, *elsewhere])
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------------
# In-process runs
def test_slot_filling_runs_with_only_a_model_and_local_data(work, tmp_path):
    output_dir = str(tmp_path / "sf")
    argv = ["--model_name_or_path", work["model"], "--dataset_name", work["data"]["slot_filling"]]
    results = run_main("slot_filling", [*argv, "--output_dir", output_dir, "--use_cpu"])
    # Task data: en-US (the default); alignment: MASSIVE's parallel utterances of the other locales
    assert results["run"] == "aligned" and results["alignment_languages"] == ["de-DE", "fr-FR"]
    assert results["language_groups"] == {"task": ["en-US"], "aligned": ["de-DE", "fr-FR"], "transfer": []}
    assert set(results["languages"]["de-DE"]) == {
        "slot_f1",
        "slot_precision",
        "slot_recall",
        "exact_match",
        "reference_loss",
        "num_examples",
    }
    for name in ("adapter_model.safetensors", "eval_results.json", "eval_results.md", "eval_results.png", "README.md"):
        assert os.path.isfile(os.path.join(output_dir, name)), name
    assert adapter_fingerprint(output_dir)["lora_B_abs_sum"] > 0  # LoRA B starts at zero: training moved it
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "align_temperature" in card and "alignment pairs: de-DE, fr-FR" in card and "| de-DE | aligned |" in card
    recorded, regenerated = reload_predictions(work["model"], output_dir, max_new_tokens=64)  # the recipe's default
    assert regenerated == recorded


@pytest.mark.parametrize("name", ["translation", "structured_generation"])
def test_recipe_main_in_process(work, tmp_path, name):
    output_dir = str(tmp_path / name)
    # translation: chrF and BLEU of the first 2 rows per direction, the reference loss of all 4
    limit = ["--max_generate_samples", "2"] if name == "translation" else []
    results = run_main(name, [*fast_run(work, name, output_dir), *limit])
    if name == "translation":
        assert list(results["languages"]) == ["de-en", "en-de"] and results["alignment_languages"] == ["de"]
        assert {"bleu", "chrf"} <= set(results["languages"]["en-de"])
        for scores in results["languages"].values():
            assert scores["num_examples"] == 4 and scores["num_generated"] == 2
        with open(os.path.join(output_dir, "eval_predictions.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert [r["prediction"] is None for r in rows] == [False, False, True, True] * 2
        recorded, regenerated = reload_predictions(work["model"], output_dir)
        assert [r for r in recorded if r is not None] == [g for r, g in zip(recorded, regenerated) if r is not None]
        return
    else:
        assert list(results["languages"]) == ["en", "de", "fr"] and results["alignment_languages"] == ["de", "fr"]
        assert {"entity_f1", "valid_json_rate"} <= set(results["languages"]["fr"])
        assert results["language_groups"]["aligned"] == ["de", "fr"]
    recorded, regenerated = reload_predictions(work["model"], output_dir)
    assert regenerated == recorded


def test_baseline_eval_only_and_comparison_plot(work, tmp_path):
    data = work["data"]["slot_filling"]
    aligned_dir, baseline_dir = str(tmp_path / "aligned"), str(tmp_path / "baseline")
    common = ["--model_name_or_path", work["model"], "--dataset_name", data, *FAST]
    run_main("slot_filling", [*common, "--output_dir", aligned_dir])
    baseline = run_main(
        "slot_filling", [*common, "--output_dir", baseline_dir, "--alignment", "false", "--compare_with", aligned_dir]
    )
    assert baseline["run"] == "baseline" and baseline["alignment_languages"] == []
    assert "plain supervised fine-tuning baseline" in open(os.path.join(baseline_dir, "README.md")).read()
    assert os.path.isfile(os.path.join(baseline_dir, "eval_results.png"))
    # --eval_only on the saved aligned adapter reproduces the predictions made right after training
    with open(os.path.join(aligned_dir, "eval_predictions.jsonl")) as f:
        trained = [json.loads(line)["prediction"] for line in f]
    eval_dir = str(tmp_path / "eval_only")
    results = run_main(
        "slot_filling", [*common, "--output_dir", eval_dir, "--eval_only", "--adapter_path", aligned_dir]
    )
    assert results["run"] == "aligned"
    with open(os.path.join(eval_dir, "eval_predictions.jsonl")) as f:
        assert [json.loads(line)["prediction"] for line in f] == trained
    # and the same teacher-forced loss of the references, per language (up to float rounding)
    with open(os.path.join(aligned_dir, "eval_results.json")) as f:
        trained_languages = json.load(f)["languages"]
    assert set(results["languages"]) == set(trained_languages)
    for language, scores in results["languages"].items():
        assert 0 < scores["reference_loss"] < 50
        assert scores["reference_loss"] == pytest.approx(trained_languages[language]["reference_loss"], rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Hub push, against a local stand-in for the Hub's HTTP API
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """
    Serves, on 127.0.0.1, the Hub endpoints that `create_repo`, `upload_folder` and `hf_hub_download` use. Files of a
    commit land under `root/<owner>/<name>/`. Every file is declared "regular" (base64 inside the commit), so no LFS or
    Xet storage is involved. Only the transport is faked: huggingface_hub, peft and the recipe run unchanged.
    """

    def __init__(self, root: str):
        self.root, self.log = root, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(hub):  # noqa: N805 - `hub` is the FakeHub, `self` the request handler
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, payload, headers=None):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                hub.log.append(("POST", path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    os.makedirs(os.path.join(hub.root, repo_id), exist_ok=True)
                    return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/.+", path)
                if match:
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in json.loads(body)["files"]
                    ]
                    return self._json(200, {"files": files, "commitOid": COMMIT})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/.+", path)
                if match:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            target = os.path.join(hub.root, match.group(1), item["value"]["path"])
                            os.makedirs(os.path.dirname(target), exist_ok=True)
                            with open(target, "wb") as f:
                                f.write(base64.b64decode(item["value"]["content"]))
                        elif item["key"] != "header":
                            return self._json(400, {"error": f"unsupported commit item {item['key']}"})
                    url = f"{hub.endpoint}/{match.group(1)}/commit/{COMMIT}"
                    return self._json(200, {"commitUrl": url, "commitOid": COMMIT, "pullRequestUrl": None})
                return self._json(404, {"error": f"no route for POST {path}"})

            def _resolve(self, with_body):
                path = unquote(urlparse(self.path).path)
                hub.log.append((self.command, path))
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
                if match is None:
                    return self._json(404, {"error": f"no route for {self.command} {path}"})
                file_path = os.path.join(hub.root, match.group(1), match.group(2))
                if not os.path.isfile(file_path):
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                content = open(file_path, "rb").read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if with_body:
                    self.wfile.write(content)

            def do_HEAD(self):
                self._resolve(False)

            def do_GET(self):
                self._resolve(True)

        return Handler


RELOAD_FROM_HUB = """
import json, sys
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_midalign.tasks.report import generate_completions
base, repo, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), repo)
tokenizer = AutoTokenizer.from_pretrained(repo)
prompts = [[{"role": "user", "content": p}] for p in prompts]
print(json.dumps(generate_completions(model, tokenizer, prompts, max_new_tokens=6, disable_progress=True)))
"""


def test_push_to_hub_lands_files_that_peft_reloads(work, tmp_path):
    hub = FakeHub(str(tmp_path / "hub"))
    env = script_env(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_OFFLINE="0",
        HF_TOKEN="hf_not_a_real_token",
        HF_HOME=str(tmp_path / "hf_home"),
        OMP_NUM_THREADS="1",
    )
    output_dir = str(tmp_path / "run")
    try:
        command = [
            sys.executable, os.path.join(RECIPES, "slot_filling.py"), "--model_name_or_path", work["model"],
            "--dataset_name", work["data"]["slot_filling"], "--output_dir", output_dir, *FAST,
            "--push_to_hub", "--hub_model_id", "tester/tiny-massive-midalign",
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        repo = tmp_path / "hub" / "tester" / "tiny-massive-midalign"
        landed = {p.name for p in repo.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= landed
        assert {"eval_results.json", "eval_results.png"} <= landed
        assert not any(name.startswith("checkpoint") or name == "training_args.bin" for name in landed)
        card = (repo / "README.md").read_text()
        assert 'model = PeftModel.from_pretrained(base, "tester/tiny-massive-midalign")' in card
        assert "align_layer" in card and "task training data: en-US" in card and "![Evaluation per language]" in card
        assert (repo / "adapter_model.safetensors").read_bytes() == open(
            os.path.join(output_dir, "adapter_model.safetensors"), "rb"
        ).read()
        # Reload through the Hub API (download endpoints of the stand-in) and reproduce the run's predictions
        with open(os.path.join(output_dir, "eval_predictions.jsonl")) as f:
            records = [json.loads(line) for line in f]
        prompts = json.dumps([r["prompt"] for r in records])
        reload = [sys.executable, "-c", RELOAD_FROM_HUB, work["model"], "tester/tiny-massive-midalign", prompts]
        done = subprocess.run(reload, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [r["prediction"] for r in records]
        assert ("GET", "/tester/tiny-massive-midalign/resolve/main/adapter_model.safetensors") in hub.log
    finally:
        hub.close()


# ----------------------------------------------------------------------------------------------------------------------
# 2-process launches on CPU
BACKENDS = {
    "ddp": ["--config_file", os.path.join(RECIPES, "accelerate_configs", "ddp.yaml"), "--mixed_precision", "no"],
    "zero2": ["--config_file", os.path.join(RECIPES, "accelerate_configs", "zero2.yaml"), "--mixed_precision", "no"],
    "zero3": ["--config_file", os.path.join(RECIPES, "accelerate_configs", "zero3.yaml")],
}


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a launched script: this checkout's package and tests/ (for testing_utils) importable."""
    path = os.pathsep.join(p for p in (os.path.join(ROOT, "tests"), ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def launch(script: str, backend_args: list[str], args: list[str], num_processes: int = 2):
    """`accelerate launch` a script (a path, or the name of a recipe) on CPU processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *backend_args, "--num_processes", str(num_processes),
        "--main_process_port", "0", os.path.join(RECIPES, script), *args, "--bf16", "false",
    ]  # fmt: skip
    # PYTHONFAULTHANDLER: a process that aborts prints the Python stack of every thread
    env = script_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


END_SCRIPT = """
import json, os, sys, time
import torch.distributed as dist
from accelerate import PartialState
from trl_midalign.scripts import end_processes

state = PartialState(cpu=True)  # joins the group the launcher set up, as --use_cpu does in the recipes
gathered = [None] * state.num_processes
dist.all_gather_object(gathered, {"rank": state.process_index, "rows": list(range(1000))})
if state.process_index == 1:
    time.sleep(2)  # rank 0 must wait for this one
entered = time.time()
end_processes()
record = {"gathered": [g["rank"] for g in gathered], "initialized_after": dist.is_initialized()}
with open(os.path.join(sys.argv[1], f"rank{state.process_index}.json"), "w") as f:
    json.dump({**record, "entered": entered, "left": time.time()}, f)
"""


@pytest.mark.slow
def test_end_processes_waits_and_destroys_the_group_on_every_rank(tmp_path):
    script = tmp_path / "end.py"
    script.write_text(END_SCRIPT)
    done = launch(str(script), BACKENDS["ddp"], [str(tmp_path)])
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
        assert ranks[-1]["gathered"] == [0, 1] and ranks[-1]["initialized_after"] is False
    assert ranks[0]["left"] >= ranks[1]["entered"]  # rank 0 waited for rank 1 before tearing down


RANK_RECORDING_SCRIPT = """
# Runs the recipe argv[1] with its arguments argv[2:], its trainer (AlignmentTrainer or, for the baseline,
# LabelsOnlySFTTrainer) given a callback that writes, per process, into output_dir/rank_checksums/: at the start of
# training how many parameters ZeRO-3 partitions (refusing to train when it partitions none, which would hide
# partitioning bugs), and at the end a checksum of the trainable weights this process holds.
import json, os, runpy, sys

from testing_utils import rank_checksum
from transformers import TrainerCallback

import trl_midalign


def partitioning(model):
    # ds_tensor: this process's shard; ds_persist: DeepSpeed keeps the whole tensor on every process (a tensor no
    # larger than stage3_param_persistence_threshold), gathered once and never released
    shards = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    return {
        "parameters": len(shards),
        "partitioned_parameters": sum(p.ds_tensor.numel() < p.ds_numel for p in shards),
        "persistent_parameters": sum(bool(getattr(p, "ds_persist", False)) for p in shards),
    }


class RankRecords(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.partitioning = counts = partitioning(model)
        if counts["parameters"] and counts["persistent_parameters"] == counts["parameters"]:
            raise RuntimeError(
                "DeepSpeed ZeRO-3 would partition no parameter of this model (stage3_param_persistence_threshold is "
                "above the size of its tensors): the launch would not test partitioning."
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        record = {"rank": args.process_index, "num_processes": args.world_size, **self.partitioning}
        record.update(rank_checksum(model))  # every process: gathering ZeRO-3 parameters is a collective
        folder = os.path.join(args.output_dir, "rank_checksums")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{args.process_index}.json"), "w") as f:
            json.dump(record, f)


def recording(trainer_class):
    class Recording(trainer_class):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), RankRecords()], **kwargs)

    return Recording


trl_midalign.LabelsOnlySFTTrainer = recording(trl_midalign.LabelsOnlySFTTrainer)  # the recipe imports them after this
trl_midalign.AlignmentTrainer = recording(trl_midalign.AlignmentTrainer)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch_recipe(name: str, backend_args: list[str], args: list[str], tmp_path, num_processes: int = 2):
    """Launch `recipes/<name>.py` under the rank-recording wrapper (see `RANK_RECORDING_SCRIPT`)."""
    script = tmp_path / "record_ranks.py"
    script.write_text(RANK_RECORDING_SCRIPT)
    return launch(str(script), backend_args, [os.path.join(RECIPES, f"{name}.py"), *args], num_processes)


def rank_records(output_dir: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(output_dir, "rank_checksums", "rank*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_two_process_launch(work, tmp_path, name, backend):
    output_dir = str(tmp_path / f"{name}-{backend}")
    done = launch_recipe(name, BACKENDS[backend], fast_run(work, name, output_dir), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # Both ranks end with the same trainable weights, and those are the saved adapter's
    ranks = rank_records(output_dir)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    saved = adapter_fingerprint(output_dir)
    assert saved["lora_B_abs_sum"] > 0
    for key in ("sum", "abs_sum", "sq_sum", "numel"):
        assert ranks[0][key] == pytest.approx(saved[key], rel=1e-9, abs=1e-9), key
    if backend == "zero3":  # real partitioning: each rank held only a shard of most parameters
        assert ranks[0]["partitioned_parameters"] > ranks[0]["parameters"] // 2
        assert ranks[0]["persistent_parameters"] < ranks[0]["parameters"]  # and not every one is kept whole
    for file in ("eval_results.json", "eval_results.md", "eval_results.png", "eval_predictions.jsonl"):
        assert os.path.isfile(os.path.join(output_dir, file)), file
    results = json.load(open(os.path.join(output_dir, "eval_results.json")))
    num_rows = {"slot_filling": len(MASSIVE), "translation": 8, "structured_generation": len(NER)}[name]
    assert sum(v["num_examples"] for v in results["languages"].values()) == num_rows
    assert all(0 < v["reference_loss"] < 50 for v in results["languages"].values())  # scored on every process
    # The saved adapter reloads (single process, no DeepSpeed) and gives the outputs generated under the launch
    recorded, regenerated = reload_predictions(work["model"], output_dir)
    assert regenerated == recorded


@pytest.mark.slow
def test_zero3_generates_in_step_when_only_some_rows_are_generated(work, tmp_path):
    """Under ZeRO-3 every process must generate as many batches (each forward gathers the parameters). With
    `--max_generate_samples 1` on one direction's 4 rows, rank 0 holds the one generated row and rank 1 none: rank 1
    still generates in step (answers dropped), so the launch ends, and only the first row has a prediction."""
    output_dir = str(tmp_path / "zero3-limited")
    args = [*fast_run(work, "translation", output_dir), "--eval_languages", "de-en", "--max_generate_samples", "1"]
    done = launch_recipe("translation", BACKENDS["zero3"], args, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = json.load(open(os.path.join(output_dir, "eval_results.json")))
    assert list(results["languages"]) == ["de-en"]
    assert results["languages"]["de-en"]["num_examples"] == 4 and results["languages"]["de-en"]["num_generated"] == 1
    assert 0 < results["languages"]["de-en"]["reference_loss"] < 50
    with open(os.path.join(output_dir, "eval_predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["prediction"] is None for r in rows] == [False, True, True, True]
    recorded, regenerated = reload_predictions(work["model"], output_dir)
    assert recorded[0] == regenerated[0]  # the answer generated under ZeRO-3 is the saved adapter's


@pytest.mark.slow
def test_zero3_launches_refuse_a_model_zero3_would_not_partition(work, tmp_path):
    # The partitioning check of the launches above can fail: with a persistence threshold above every tensor's size,
    # ZeRO-3 keeps every parameter whole on every process, and the launch stops before training.
    ds_config = json.load(open(os.path.join(RECIPES, "accelerate_configs", "ds_zero3.json")))
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 10**9
    ds_path = tmp_path / "ds_unpartitioned.json"
    ds_path.write_text(json.dumps(ds_config))
    backend = [
        "--config_file",
        os.path.join(RECIPES, "accelerate_configs", "zero3.yaml"),
        "--deepspeed_config_file",
        str(ds_path),
    ]
    output_dir = tmp_path / "out"
    done = launch_recipe("slot_filling", backend, fast_run(work, "slot_filling", output_dir), tmp_path)
    assert done.returncode != 0
    assert "ZeRO-3 would partition no parameter" in done.stderr and "stage3_param_persistence_threshold" in done.stderr
    assert not (output_dir / "adapter_model.safetensors").exists()  # it stopped before training


# ----------------------------------------------------------------------------------------------------------------------
# Classification by label likelihood, and a dev split that keeps the best checkpoint
APPS = {"swriter": "Format the paragraph text", "scalc": "Sum the cells of the sheet", "smath": "Write the formula"}


def classification_data(root) -> str:
    """A folder with train/dev/test files of text/label/language rows, as the LibreOffice builder writes them."""
    folder = root / "classification"
    shifted = dict(zip(APPS, list(APPS)[1:] + list(APPS)[:1]))
    for split in ("train", "dev", "test"):
        rows = [  # the dev rows carry another label than training teaches, so that their loss rises at some point
            {"text": f"{text} {i}", "label": shifted[label] if split == "dev" else label, "language": lang}
            for i in range(2)
            for label, text in APPS.items()
            for lang in (["en"] if split != "test" else ["en", "de"])
        ]
        write_jsonl(str(folder / f"{split}.jsonl"), rows)
    return str(folder)


def test_classification_recipe_scores_labels_and_keeps_the_best_dev_checkpoint(work, tmp_path):
    data = classification_data(tmp_path)
    output_dir = str(tmp_path / "cls")
    argv = [
        "--model_name_or_path", work["model"], "--dataset_name", data, "--output_dir", output_dir,
        "--text_column", "text", "--label_column", "label", "--language_column", "language",
        "--train_languages", "en", "--alignment", "false", "--dataset_dev_split", "dev",
        "--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "0.05", "--report_to", "none",
        "--use_cpu", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--load_best_model_at_end", "--metric_for_best_model", "eval_loss", "--logging_steps", "1",
        # the tiny model's dev loss falls at every step, so the least loss would be the last checkpoint's: asking for
        # the greatest makes the kept checkpoint an earlier one, which shows that it is the one loaded and saved
        "--greater_is_better", "true",
    ]  # fmt: skip
    results = run_main("classification", argv)
    assert results["task"] == "classification" and list(results["languages"]) == ["en", "de"]
    english = results["languages"]["en"]
    assert english["chance"] == pytest.approx(1 / 3) and english["majority_baseline"] == pytest.approx(1 / 3)
    assert 0 <= english["accuracy"] <= 1 and english["reference_loss"] > 0
    with open(os.path.join(output_dir, "eval_predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    labels = sorted(APPS)
    for record in records:  # the prediction is the label of least NLL, the reference loss that of the gold label
        assert record["prediction"] == labels[min(range(3), key=record["label_nlls"].__getitem__)]
        assert record["reference_nll"] == record["label_nlls"][labels.index(record["reference"])]
    # the dev split was evaluated at every step, and the adapter saved is the checkpoint of least eval_loss
    state = json.load(open(os.path.join(output_dir, "checkpoint-6", "trainer_state.json")))
    losses = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    best = max(losses, key=losses.get)
    assert best < 6  # the last checkpoint is not the best: loading the best one is seen in the saved adapter
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    saved = adapter_fingerprint(output_dir)
    assert saved == adapter_fingerprint(os.path.join(output_dir, f"checkpoint-{best}"))
    assert saved != adapter_fingerprint(os.path.join(output_dir, "checkpoint-6"))


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_dev_split_is_evaluated_with_the_alignment_trainer(work, tmp_path, name):
    output_dir = str(tmp_path / name)
    argv = [
        *fast_run(work, name, output_dir), "--dataset_dev_split", "test", "--max_dev_samples", "2",
        "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "2",
    ]  # fmt: skip
    results = run_main(name, argv)
    assert results["run"] == "aligned"
    with open(os.path.join(output_dir, "checkpoint-2", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    # the task loss of the English dev rows, at every step
    assert [e["step"] for e in history if "eval_loss" in e] == [1, 2]
    assert all(0 < e["eval_loss"] < 50 for e in history if "eval_loss" in e)
