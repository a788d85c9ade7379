"""Helpers shared by the tests and the scripts they launch: an offline tokenizer, tiny decoder models built from
configs, toy rows, rank checksums for multi-process runs, and small file and network helpers.

Nothing is downloaded: the tokenizer is trained here on the toy sentences and the models are built from configs.
Tests import from this module (`from testing_utils import ...`); conftest.py only defines fixtures. Scripts under
tests/scripts get `PYTHONPATH=<repo>/tests:<repo>` from the test that launches them.
"""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import socket

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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


def tiny_config(kind: str, vocab_size: int, num_layers: int = 4):
    """A config of `kind` (`"llama"`, `"qwen2"`, `"mistral"` or `"gemma3"`) with hidden size 32."""
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
    """A randomly initialised tiny causal LM of `kind`, the same for the same `seed`."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[kind](tiny_config(kind, vocab_size, num_layers))


def task_rows(fmt: str = "prompt_completion", n: int = 8, with_pairs: bool = True) -> list[dict]:
    """`n` task rows in TRL's `fmt` (`"prompt_completion"`, `"text"` or `"conversational"`), with a pair each."""
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


def alignment_config(output_dir, **overrides):
    """An `AlignmentConfig` for tiny CPU runs (fp32, no reports, no checkpoints, batches of 4), with `overrides`."""
    from trl_midalign import AlignmentConfig

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    settings.update(overrides)
    return AlignmentConfig(**settings)


def block_of(name: str) -> int:
    """The decoder block index in a parameter or module name such as `...layers.3.self_attn.q_proj...`."""
    return int(name.split("layers.")[1].split(".")[0])


def plain_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row's states over the positions where `mask` is 1, with plain Python loops."""
    rows = []
    for b in range(states.size(0)):
        kept = [states[b, t] for t in range(states.size(1)) if mask[b, t] == 1]
        rows.append(sum(kept) / len(kept))
    return torch.stack(rows)


def plain_info_nce(source: torch.Tensor, target: torch.Tensor, temperature: float, skip: dict | None = None) -> float:
    """Row-by-row InfoNCE with explicit cosines and log-sum-exp; `skip[i]` lists columns left out of row i."""
    total = 0.0
    n = source.size(0)
    for i in range(n):
        scores = []
        for j in range(n):
            if skip and j in skip.get(i, ()):
                continue
            cos = float(source[i] @ target[j]) / (float(source[i].norm()) * float(target[j].norm()))
            scores.append((j, cos / temperature))
        log_denominator = math.log(sum(math.exp(s) for _, s in scores))
        positive = dict(scores)[i]
        total += log_denominator - positive
    return total / n


def write_jsonl(path, rows) -> str:
    """Write `rows` as JSON lines to `path` (creating its folder) and return the path as a string."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gathered(model):
    """Gather DeepSpeed ZeRO-3 partitioned parameters for reading; a no-op for any other model."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def zero3_partitioned(model) -> bool:
    """Whether this process holds only shards of the model's parameters (ZeRO-3 outside a gather)."""
    return any(p.numel() == 0 for p in model.parameters())


def rank_checksum(model) -> dict:
    """
    Fingerprint of the trainable parameters this process holds (gathered under ZeRO-3): a SHA-256 over names and
    float32 values, and float64 sums (plain, absolute, squared) that can be compared with a saved adapter whatever its
    key names.
    """
    params = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda item: item[0])
    digest = hashlib.sha256()
    total = absolute = squares = 0.0
    numel = 0
    with gathered(model):
        for name, param in params:
            values = param.detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode() + values.numpy().tobytes())
            values64 = values.double()
            total += values64.sum().item()
            absolute += values64.abs().sum().item()
            squares += values64.square().sum().item()
            numel += values.numel()
    return {"sha256": digest.hexdigest(), "sum": total, "abs_sum": absolute, "sq_sum": squares, "numel": numel}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of every trainable parameter (gathered under ZeRO-3), to tell later which ones changed."""
    with gathered(model):
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed_parameters(before: dict[str, torch.Tensor], model) -> list[str]:
    """The names of the trainable parameters of `model` that differ from `before` (see `trainable_state`)."""
    after = trainable_state(model)
    return sorted(name for name, value in after.items() if not torch.equal(before[name], value))


def load_script(path: str):
    """The Python script at `path` (a recipe or a benchmark: scripts, not a package) as a module; its `main` does not
    run."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
