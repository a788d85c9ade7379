"""Offline fixtures: a small tokenizer trained here, tiny decoder models built from configs, and toy rows.

Nothing is downloaded: the Hub is unreachable on the machines that run these tests.
"""

import os

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A few sentences in several languages, enough to train a small BPE vocabulary that covers the toy rows.
PAIRS = [
    ("Weck mich um sieben Uhr", "Wake me up at seven"),
    ("Wie wird das Wetter morgen", "What is the weather tomorrow"),
    ("Spiele etwas Jazz", "Play some jazz"),
    ("Schalte das Licht aus", "Turn off the light"),
    ("Stelle einen Timer auf zehn Minuten", "Set a timer for ten minutes"),
    ("Wer hat dieses Lied gesungen", "Who sang this song"),
    ("Réveille-moi à sept heures", "Wake me up at seven o'clock"),
    ("Quel temps fera-t-il demain", "What will the weather be tomorrow"),
    ("Joue du jazz", "Play jazz music"),
    ("Éteins la lumière", "Switch the light off"),
    ("Mets un minuteur de dix minutes", "Start a ten minute timer"),
    ("Qui a chanté cette chanson", "Who is the singer of this song"),
]
TASKS = [
    ("Wake me up at seven", "time: seven"),
    ("What is the weather tomorrow", "date: tomorrow"),
    ("Play some jazz", "genre: jazz"),
    ("Turn off the light", "None"),
    ("Set a timer for ten minutes", "duration: ten minutes"),
    ("Who sang this song", "None"),
    ("Remind me at nine", "time: nine"),
    ("Play rock music", "genre: rock"),
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the toy sentences, with Llama-like BOS prepending and a chat template."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    corpus = [s for pair in PAIRS for s in pair] + [s for pair in TASKS for s in pair]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus * 3, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def tiny_config(kind: str, vocab_size: int, num_layers: int = 4):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "mistral":
        return MistralConfig(**common)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=8, query_pre_attn_scalar=8)
    raise ValueError(kind)


MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def build_model(kind: str = "llama", vocab_size: int = 400, num_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return MODEL_CLASSES[kind](tiny_config(kind, vocab_size, num_layers))


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny Llama and the tokenizer saved together, as a model path a script would receive."""
    path = tmp_path / "tiny-llama"
    build_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def task_rows(fmt: str = "prompt_completion", n: int = 8, with_pairs: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        prompt, completion = TASKS[i % len(TASKS)]
        if fmt == "prompt_completion":
            row = {"prompt": prompt, "completion": " " + completion}
        elif fmt == "text":
            row = {"text": f"{prompt} -> {completion}"}
        elif fmt == "conversational":
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
        else:
            raise ValueError(fmt)
        if with_pairs:
            source, target = PAIRS[i % len(PAIRS)]
            row["parallel_source"], row["parallel_target"] = source, target
        rows.append(row)
    return rows


@pytest.fixture
def pair_dataset() -> Dataset:
    return Dataset.from_list([{"parallel_source": s, "parallel_target": t} for s, t in PAIRS])


def block_of(name: str) -> int:
    """The decoder block index in a parameter or module name such as `...layers.3.self_attn.q_proj...`."""
    return int(name.split("layers.")[1].split(".")[0])
