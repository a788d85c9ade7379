"""`trl-midalign demo` end to end on the real model and real parallel text, shortened to a few steps."""

import json

import pytest
import torch
from peft import PeftConfig

from trl_midalign.cli import main as cli_main
from trl_midalign.demo import DemoArguments
from trl_midalign.demo.run import run_demo
from trl_midalign.probing import ProbeResult, probe_layers


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.downloads
def test_demo_end_to_end_on_gemma(tmp_path, capsys):
    from trl_midalign.demo import libreoffice_parallel_pairs

    out = tmp_path / "demo"
    cli_main(
        [
            "demo", "--output_dir", str(out), "--train_languages", "ja", "hi", "--unseen_languages", "fr",
            "--train_pairs_per_language", "32", "--eval_pairs_per_language", "16", "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out

    summary = json.loads((out / "demo.json").read_text())
    before = ProbeResult.from_json(out / "probe_before.json")
    after = ProbeResult.from_json(out / "probe_after.json")
    layer = summary["align_layer"]
    assert summary["num_layers"] == 18 and before.layers == after.layers == list(range(19))
    assert before.languages == after.languages == ["ja", "hi", "fr"]
    assert before.num_pairs == {"ja": 16, "hi": 16, "fr": 16}

    # align_layer="auto": the layer the base model's probe on the training pairs ranks first
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_midalign.demo import gemma3_270m

    pairs = libreoffice_parallel_pairs(["ja", "hi", "fr"], max_pairs_per_language=48, seed=0, max_chars=100).to_list()
    train = [row for language in ("ja", "hi") for row in [r for r in pairs if r["language"] == language][16:48]]
    held_out = [row for language in ("ja", "hi", "fr") for row in [r for r in pairs if r["language"] == language][:16]]
    assert not {row["id"] for row in train} & {row["id"] for row in held_out}
    model = AutoModelForCausalLM.from_pretrained(gemma3_270m(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m())
    assert (
        layer
        == probe_layers(model, tokenizer, train, max_length=64, batch_size=32, show_progress=False).recommended_layer
    )
    again = probe_layers(model, tokenizer, held_out, max_length=64, batch_size=32, show_progress=False)
    assert again.retrieval_accuracy == before.retrieval_accuracy  # "before" is the base model on the held-out pairs

    # the summary is the probes' numbers at the aligned layer
    index = before.layers.index(layer)
    for language in ("ja", "hi", "fr"):
        assert summary["per_language"][language] == {
            "before": before.retrieval_accuracy[language][index],
            "after": after.retrieval_accuracy[language][index],
        }
    assert summary["trained"]["before"] == pytest.approx(
        (before.retrieval_accuracy["ja"][index] + before.retrieval_accuracy["hi"][index]) / 2
    )
    assert summary["unseen"]["after"] == pytest.approx(after.retrieval_accuracy["fr"][index])
    assert before.similarity_gap != after.similarity_gap  # training changed the model

    # training really ran and was logged; the adapter only touches blocks below the aligned layer
    assert [entry["step"] for entry in summary["train_log"]] == [1, 2, 3]
    assert all(entry["align_loss"] > 0 for entry in summary["train_log"])
    adapter = PeftConfig.from_pretrained(out / "alignment_adapter")
    assert adapter.layers_to_transform == list(range(layer))

    report = (out / "report.md").read_text()
    for language in ("ja", "hi", "fr"):
        assert f"| {language} |" in report
    assert "**mean unseen**" in report and "**mean trained**" in report
    assert (out / "before_after.png").read_bytes()[:8] == PNG_MAGIC
    assert f"(layer {layer})" in printed and "trained languages:" in printed


def test_demo_rejects_overlapping_language_lists(tmp_path):
    with pytest.raises(ValueError, match=r"\['ja'\] are both trained and 'unseen'"):
        run_demo(DemoArguments(output_dir=str(tmp_path), train_languages=["ja", "hi"], unseen_languages=["ja"]))
