"""Chat tokenizer: Phi-3's tokenizer, or a small byte-level BPE built offline.

Both carry Phi-3's control tokens (``<|user|>``, ``<|assistant|>``,
``<|end|>`` ...) plus an image placeholder token. User text is always encoded
with special-token matching switched off, so typing ``<|assistant|>`` or
``<image>`` yields those characters, never the control token; control tokens
enter a sequence only by id (see ``models.conversation``).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, ModelConfig
from .weights import materialize

log = logging.getLogger(__name__)

# Phi-3's base and added special tokens, in Phi-3's own id order (0..2, then
# 32000..32010 in the real vocabulary).
BASE_SPECIAL = ["<unk>", "<s>", "</s>"]
PHI3_ADDED = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
    "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
    "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
# Phi-3-mini-instruct's chat template (text-only), given to the offline
# tokenizer so ``apply_chat_template`` renders what ``models.conversation`` encodes.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_COLOURS = "red green blue yellow purple orange black white gray grey pink brown cyan magenta".split()
_SHAPES = ("circle square triangle star cross ring diamond hexagon rectangle ellipse "
           "pentagon heart arrow line dot shape shapes object objects").split()
_PLACES = ("left right top bottom center centre middle upper lower corner side above below "
           "next near far inside outside between").split()
_SIZES = "small large big tiny medium huge little".split()
_NUMBERS = "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9".split()
_WORDS = (
    "the a an is are was were be there here this that these those it its what which where how "
    "many much who when why colour color shape position size count number image picture photo "
    "of in on at to from with and or not no yes do does can you i me my your please describe "
    "tell answer question see show look find name say about some all any each every only one "
    "background foreground object thing man woman person people dog cat car tree house street "
    "table chair food water sky grass room window door book phone computer hand face head "
    "sitting standing walking holding wearing playing eating looking using riding "
    "very also just more most than then so but if because while as by for up down out over "
    "hello hi thanks thank good great sure okay sorry help assistant user system answer "
    "sentence word words short long first second third last next previous same different "
    "has have had make made go going went come came take took give gave get got know think "
    "time day year way world life work part place case point group problem fact"
).split()
_TEMPLATES = [
    "What colour is the {shape}?", "The {shape} is {colour}.", "Where is the {colour} {shape}?",
    "It is on the {place}.", "How many {shape}s are there?", "There are {number} {shape}s.",
    "Describe the image.", "A {size} {colour} {shape} on the {place} of the image.",
    "Is the {shape} {size} or {size2}?", "The {shape} is {size}.", "Answer with one word.",
    "Which shape is {colour}?", "{Colour}.", "{Shape}.", "{Place}.", "{Number}.",
]


def tiny_corpus(n_sentences: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic English-like text covering the synthetic data's vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        if rng.random() < 0.6:
            t = rng.choice(_TEMPLATES)
            fill = dict(shape=rng.choice(_SHAPES), colour=rng.choice(_COLOURS), place=rng.choice(_PLACES),
                        number=rng.choice(_NUMBERS), size=rng.choice(_SIZES), size2=rng.choice(_SIZES))
            fill.update({k.capitalize(): v.capitalize() for k, v in list(fill.items())})
            out.append(t.format(**fill))
        else:
            words = rng.choices(_WORDS + _COLOURS + _SHAPES + _PLACES + _SIZES, k=rng.randint(4, 14))
            s = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
            out.append(s)
    return out


_FUNCTIONS = ("get_weather", "order_paint", "move_arm", "find_part", "count_shapes", "search", "lookup", "add",
              "send_message", "set_timer", "get_time", "book_table", "describe_image")
_PARAMETERS = ("city", "colour", "cell", "shape", "query", "a", "b", "text", "minutes", "name", "id", "count",
               "unit", "date", "to", "status", "result", "part", "size", "position")
_SCHEMA_TYPES = ("string", "integer", "number", "boolean")


def tool_corpus(n_sentences: int = 1500, seed: int = 0) -> list[str]:
    """Deterministic text in ``models.tools``'s form: tool lists as the system
    prompt offers them, calls and results, so the offline tokenizer encodes
    them by the word, not character by character."""
    from .tools import call_text, response_text, tools_prompt

    rng = random.Random(f"tool-corpus/{seed}")
    values = _COLOURS + _SHAPES + _PLACES + _SIZES + _NUMBERS + ["top left", "bottom right", "ordered", "moved", "ok"]

    def value():
        return rng.choice((rng.choice(values), rng.randint(0, 200), rng.choice((True, False))))

    def function():
        props = {}
        for p in rng.sample(_PARAMETERS, rng.randint(0, 3)):
            prop = {"type": rng.choice(_SCHEMA_TYPES)}
            if rng.random() < 0.4:
                prop = {"type": "string", "enum": rng.sample(values, rng.randint(2, 9))}
            props[p] = prop
        params = {"type": "object", "properties": props}
        if props and rng.random() < 0.6:
            params["required"] = list(props)
        tool = {"name": rng.choice(_FUNCTIONS), "parameters": params}
        if rng.random() < 0.7:
            tool["description"] = " ".join(rng.choices(_WORDS, k=rng.randint(3, 8))).capitalize() + "."
        return tool

    out = []
    for _ in range(n_sentences):
        kind = rng.random()
        if kind < 0.2:
            out.append(tools_prompt([function() for _ in range(rng.randint(1, 3))]))
        elif kind < 0.7:
            args = {p: value() for p in rng.sample(_PARAMETERS, rng.randint(0, 2))}
            out.append(call_text(rng.choice(_FUNCTIONS), args))
        else:
            out.append(response_text(json.dumps({p: value() for p in rng.sample(_PARAMETERS, rng.randint(1, 3))})))
    return out


def _build_bpe(folder: Path, vocab_size: int, image_token: str, tools: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BASE_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus() + (tool_corpus() if tools else []), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
        unk_token="<unk>", pad_token="<|endoftext|>",
    )
    hf.add_special_tokens({"additional_special_tokens": PHI3_ADDED + [image_token]})
    hf.chat_template = PHI3_CHAT_TEMPLATE
    hf.save_pretrained(folder)


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    pad: int
    system: int
    user: int
    assistant: int
    end: int
    image: int


class ChatTokenizer:
    """A Hugging Face tokenizer plus the ids of Phi-3's chat control tokens."""

    def __init__(self, hf, image_token: str = "<image>"):
        self.hf = hf
        self.image_token = image_token
        vocab = hf.get_vocab()
        missing = [t for t in CHAT_TOKENS + (image_token,) if t not in vocab]
        if missing:
            raise ConfigError(
                f"tokenizer {getattr(hf, 'name_or_path', '?')!r} lacks the Phi-3 chat token(s) "
                f"{', '.join(missing)}: it is not a Phi-3 tokenizer"
            )
        ids = {t: vocab[t] for t in CHAT_TOKENS + (image_token,)}
        bos = vocab.get(hf.bos_token) if hf.bos_token else None
        pad = hf.pad_token_id if hf.pad_token_id is not None else ids["<|endoftext|>"]
        self.ids = SpecialIds(
            bos=bos, eos=ids["<|endoftext|>"], pad=pad, system=ids["<|system|>"],
            user=ids["<|user|>"], assistant=ids["<|assistant|>"], end=ids["<|end|>"],
            image=ids[image_token],
        )

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def control_tokens(self) -> list[str]:
        """Every special token string, for sanitising and tests."""
        added = {t.content for t in self.hf.added_tokens_decoder.values()}
        return sorted(added | set(self.hf.all_special_tokens) | set(CHAT_TOKENS) | {self.image_token})

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops at any of these (Phi-3's generation_config)."""
        return [self.ids.end, self.ids.eos, self.ids.assistant]

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings inside ``text`` stay text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            return []
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))

    @classmethod
    def load(cls, folder: str | Path, image_token: str = "<image>") -> "ChatTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)), image_token)


def load_tokenizer(cfg: ModelConfig) -> ChatTokenizer:
    """The preset's tokenizer: built offline (``tokenizer.build``) or loaded."""
    from transformers import AutoTokenizer

    tc = cfg.tokenizer
    if tc.build is not None:
        unknown = set(tc.build) - {"vocab_size", "tool_corpus"}
        if unknown:
            raise ConfigError(f"tokenizer.build: unknown key(s) {sorted(unknown)}; valid: vocab_size, tool_corpus")
        tools = tc.build.get("tool_corpus", False)
        if not isinstance(tools, bool):
            raise ConfigError(f"tokenizer.build.tool_corpus must be true or false, got {tools!r}")
        vocab_size = int(tc.build.get("vocab_size", 2048))
        corpus = "tiny_corpus-v1" + ("+tool_corpus-v1" if tools else "")
        spec = {"vocab_size": vocab_size, "image_token": tc.image_token, "corpus": corpus, "template": "phi3"}
        folder = materialize("tokenizer", spec, lambda d: _build_bpe(d, vocab_size, tc.image_token, tools))
        return ChatTokenizer(AutoTokenizer.from_pretrained(str(folder)), tc.image_token)
    source = tc.name_or_path or cfg.llm.name_or_path
    try:
        hf = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ConfigError(f"cannot load tokenizer from {source!r}: {e}") from None
    if tc.image_token not in hf.get_vocab():
        hf.add_special_tokens({"additional_special_tokens": [tc.image_token]}, replace_extra_special_tokens=False)
    return ChatTokenizer(hf, tc.image_token)
