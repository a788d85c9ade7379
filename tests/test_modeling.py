"""GGUF checkpoints become ordinary trainable models: the real Gemma 3 270M GGUF, and tiny GGUF files written here."""

import copy
import os

import gguf
import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from testing_utils import build_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
from transformers.utils.quantization_config import GgufConfig
from trl import SFTConfig, SFTTrainer

from trl_midalign.demo import gemma3_270m, gemma3_270m_gguf
from trl_midalign.modeling import load_causal_lm, load_tokenizer, prepare_gguf_model


def write_tiny_llama_gguf(path, architecture="llama", unsupported_tensor_type=False):
    """A two-block Llama in GGUF (float32 tensors), written with the `gguf` package as llama.cpp lays it out.

    With `unsupported_tensor_type`, one tensor is stored as Q8_K, which `gguf` can write but not dequantize.
    """
    hidden, layers, intermediate, heads, kv_heads, vocab = 64, 2, 256, 4, 2, 256
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-test")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)

    def add(name, shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    kv = hidden // heads * kv_heads
    add("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden))]:
            add(f"blk.{i}.{name}.weight", shape)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_gate.weight", (intermediate, hidden))
        add(f"blk.{i}.ffn_up.weight", (intermediate, hidden))
        if unsupported_tensor_type and i == 0:
            # Q8_K: blocks of 256 values in 292 bytes; the shape given is in bytes per row.
            raw = np.zeros((hidden, intermediate // 256 * 292), np.uint8)
            writer.add_tensor(f"blk.{i}.ffn_down.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
        else:
            add(f"blk.{i}.ffn_down.weight", (hidden, intermediate))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def gemma_gguf_model():
    # About a minute: the Q4_K_M tensors are dequantized with numpy.
    return load_causal_lm(gemma3_270m_gguf())


# ---------------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.downloads
def test_gguf_model_is_plain_and_matches_converted_copy(gemma_gguf_model):
    model = gemma_gguf_model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert not hasattr(model, "hf_quantizer")
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(param.dtype == torch.float32 and param.requires_grad for param in model.parameters())
    # The cached converted checkpoint (written by save_pretrained from such a model) holds the same weights.
    converted = AutoModelForCausalLM.from_pretrained(gemma3_270m())
    expected = converted.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
@pytest.mark.downloads
def test_gguf_model_saves_and_reloads(gemma_gguf_model, tmp_path):
    gemma_gguf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[2, 9259, 1902, 236764]])
    with torch.no_grad():
        assert torch.equal(gemma_gguf_model(ids).logits, reloaded(ids).logits)


@pytest.mark.slow
@pytest.mark.downloads
def test_gguf_model_trains_lora_with_sft_trainer(gemma_gguf_model, tmp_path):
    model = copy.deepcopy(gemma_gguf_model)
    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m())
    texts = ["Wake me up at seven.", "Weck mich um sieben Uhr.", "Play some jazz.", "Spiele etwas Jazz."]
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,  # fp32 throughout, so the reloaded adapter can be compared closely
        ),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # lora_B starts at zero: the step moved it
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # The saved adapter on the converted checkpoint reproduces the trained model, and differs from the base.
    batch = tokenizer(texts[:2], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()  # logits at padding positions are meaningless
    base = AutoModelForCausalLM.from_pretrained(gemma3_270m())
    trainer.model.eval()
    with torch.no_grad():
        untrained = base(**batch).logits[real]
        restored = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        reloaded, trained = restored(**batch).logits[real], trainer.model(**batch).logits[real]
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-4)
    assert (reloaded - untrained).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.downloads
def test_load_tokenizer_from_gguf_matches_converted_copy():
    from_gguf = load_tokenizer(gemma3_270m_gguf())
    converted = load_tokenizer(gemma3_270m())
    texts = ["Wählen Sie Extras – Optionen.", "文章作成支援", "ការ​សួរ​ទិន្នន័យ", "Writing Aids"]
    assert from_gguf(texts)["input_ids"] == converted(texts)["input_ids"]
    assert from_gguf.bos_token == "<bos>" and from_gguf.pad_token == "<pad>"


def test_prepare_is_idempotent_and_leaves_plain_models_alone():
    model = build_model("llama")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert prepare_gguf_model(model) is model
    assert prepare_gguf_model(prepare_gguf_model(model)) is model
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Tiny GGUF files: path handling and errors
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_path_forms(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    from_path = load_causal_lm(path)
    from_dir = load_causal_lm(tmp_path, gguf_file="tiny.gguf")
    for model in (from_path, from_dir):
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
        assert not hasattr(model, "hf_quantizer") and getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(from_path.model.embed_tokens.weight, from_dir.model.embed_tokens.weight)
    assert from_path.name_or_path == from_dir.name_or_path == path
    # The reader's values arrive unchanged: the norm weights written as ones.
    assert torch.equal(from_path.model.norm.weight, torch.ones(64))
    from_path.save_pretrained(tmp_path / "saved")
    plain = load_causal_lm(tmp_path / "saved")  # an ordinary directory goes straight to from_pretrained
    torch.testing.assert_close(plain.model.embed_tokens.weight, from_path.model.embed_tokens.weight)


def test_load_errors(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match=missing):
        load_causal_lm(missing)
    with pytest.raises(FileNotFoundError, match=missing):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        load_causal_lm(tmp_path, gguf_file="other.gguf")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_causal_lm(os.path.join(str(tmp_path), "no-such-dir"))
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="either"):
        load_causal_lm(path, gguf_file="tiny.gguf")


def test_unsupported_gguf_architecture(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "odd.gguf", architecture="notanarch")
    with pytest.raises(ValueError, match=r"architecture 'notanarch'.*Supported GGUF architectures: .*gemma3.*llama"):
        load_causal_lm(path)
    with pytest.raises(ValueError, match="architecture 'notanarch'"):
        load_tokenizer(path)


def test_gguf_tensor_type_that_cannot_be_dequantized(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "q8k.gguf", unsupported_tensor_type=True)
    with pytest.raises(ValueError, match=r"cannot dequantize.*Q8_K"):
        load_causal_lm(path)


def test_prepare_refuses_weights_left_in_gguf_blocks():
    # transformers keeps GGUF weights packed (untrainable) when a GPU matmul kernel is available and dequantize is
    # False. No such kernel exists on CPU, so the quantizer is set up here as it would be after such a load.
    model = build_model("llama")
    quantizer = GgufHfQuantizer(GgufConfig(dequantize=False))
    quantizer.packed_modules = {"model.layers.0.self_attn.q_proj": model.model.layers[0].self_attn.q_proj}
    model.hf_quantizer = quantizer
    with pytest.raises(ValueError, match=r"dequantize=True"):
        prepare_gguf_model(model)
    # Once its weights are plain, the same quantizer is removed.
    quantizer.packed_modules = {}
    model.config.quantization_config = quantizer.quantization_config
    assert prepare_gguf_model(model) is model
    assert not hasattr(model, "hf_quantizer") and not hasattr(model.config, "quantization_config")
