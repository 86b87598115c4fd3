"""Build tiny but real ONNX Runtime GenAI models offline, from random weights.

No model can be downloaded on our machines, so the project makes its own: a
Llama-style decoder with random weights, a byte-level BPE tokenizer trained on
an in-memory corpus, a ChatML chat template, converted to INT4 for the CPU by
onnxruntime-genai's own model builder (the same MatMulNBits and
GroupQueryAttention operators as the published Phi-3.5-mini CPU INT4 models).

The text such a model writes is noise; it exists so the server, its tests and
its benchmarks run a real engine end to end.

Usage (needs ``pip install -r requirements-build.txt``)::

    python scripts/make_model.py tiny   # the bundled default / test model (< 1 MB)
    python scripts/make_model.py bench  # ~37M parameters, for benchmarks (not committed)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format many small open models use, with tools in the Hermes/Qwen convention (``tool_calls.py``):
# tools listed in the system turn, calls written as <tool_call> blocks, results in <tool_response> blocks. The
# runtime renders it itself; without tools it renders exactly as plain ChatML.
CHAT_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' and loop.first %}
{%- elif message['role'] == 'assistant' and message['tool_calls'] %}<|im_start|>assistant
{% if message['content'] %}{{ message['content'] }}
{% endif %}
{%- for call in message['tool_calls'] %}<tool_call>
{"name": {{ call['function']['name'] | tojson }}, "arguments": {{ call['function']['arguments'] | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message['role'] == 'tool' %}<|im_start|>user
<tool_response>
{{ message['content'] }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""


@dataclass(frozen=True)
class Preset:
    """The shape of one model the script can build."""

    name: str
    output: Path
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    context_length: int


PRESETS = {
    "tiny": Preset(
        name="tiny-random-llama-int4",
        output=REPO / "genai_server" / "bundled_model" / "tiny-random-llama-int4",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        layers=2,
        heads=4,
        kv_heads=2,
        context_length=2048,
    ),
    "bench": Preset(
        name="bench-random-llama-int4",
        output=REPO / "models" / "bench-random-llama-int4",
        vocab_size=4096,
        hidden_size=768,
        intermediate_size=1536,
        layers=6,
        heads=12,
        kv_heads=4,
        context_length=4096,
    ),
    # The decoder body of Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864: 0.36B
    # non-embedding parameters) with a 32k vocabulary: decoding is bound by memory bandwidth, as it is
    # for the real models users run. ~0.42B parameters, ~300 MB INT4. Built on demand, never committed.
    "realistic": Preset(
        name="realistic-random-qwen-shape-int4",
        output=REPO / "models" / "realistic-random-qwen-shape-int4",
        vocab_size=32768,
        hidden_size=896,
        intermediate_size=4864,
        layers=24,
        heads=14,
        kv_heads=2,
        context_length=4096,
    ),
}

_WORDS = (
    "the a an server model token stream request answer question time fast slow small large "
    "cat dog house river mountain city night day light dark red green blue open close read "
    "write run stop start end first last new old good bad one two three four five six seven "
    "eight nine ten hello world please thank you yes no what why how when where who which "
    "système café naïve über straße 日本語 中文 русский ελληνικά emoji 🙂 🚀 ✓"
).split()


def corpus(vocab_size: int, lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text with ASCII, accents, CJK and emoji, for training the tokenizer.

    A large vocabulary needs many distinct words to merge, so random letter strings are mixed in.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(lines if vocab_size <= 4096 else vocab_size * 4):
        if vocab_size > 4096:
            out.append(
                " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(12))
            )
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
        out.append(str(rng.randint(0, 10**6)) + " " + rng.choice(["{", "}", "(", ")", "[", "]", "\"'"]))
    return out


def train_tokenizer(preset: Preset, hf_dir: Path) -> None:
    """Train a byte-level BPE (any text encodes) and write the HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(preset.vocab_size), trainer=trainer)
    tok.save(str(hf_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": preset.context_length,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (hf_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )


def save_random_model(preset: Preset, hf_dir: Path) -> None:
    """Save a Llama decoder with seeded random weights in Hugging Face format."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))

    def token_id(name: str) -> int:
        found = tok.token_to_id(name)
        assert found is not None, f"the trained tokenizer has no {name}"
        return int(found)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.context_length,
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=[token_id("<|im_end|>"), token_id("<|endoftext|>")],
        pad_token_id=token_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{preset.name}: {params / 1e6:.2f}M parameters", file=sys.stderr)
    model.save_pretrained(hf_dir)


def hf_folder(preset: Preset) -> Path:
    """Where the preset's Hugging Face weights are kept (models/, never committed): the same weights in other
    engines' formats (scripts/build_llama_server.py gguf) make side-by-side comparisons fair."""
    return REPO / "models" / f"{preset.name.removesuffix('-int4')}-hf"


def build(preset: Preset, output: Path) -> None:
    """Train, save and convert one preset into an ONNX Runtime GenAI folder at ``output``; keep its HF folder."""
    with tempfile.TemporaryDirectory(prefix="genai-model-") as tmp:
        hf_dir, cache = Path(tmp) / "hf", Path(tmp) / "cache"
        hf_dir.mkdir()
        train_tokenizer(preset, hf_dir)
        save_random_model(preset, hf_dir)
        staging = Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(staging),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(cache),
        ]
        subprocess.run(cmd, check=True)
        for source, target in ((staging, output), (hf_dir, hf_folder(preset))):
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target)
    print(f"built {output}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS), help="which model to build")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: the preset's)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    build(preset, args.output or preset.output)


if __name__ == "__main__":
    main()
