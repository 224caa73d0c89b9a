"""Model commands: inspect presets, chat with a model, transcribe audio."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmphi.cli import add_model_args, float_between, positive_int, unit_float


_temperature = float_between(0.0, 2.0)  # the API's range


def _top_p(value: str) -> float:
    """An argparse ``type``: a number above 0, at most 1."""
    x = unit_float(value)
    if x == 0:
        raise argparse.ArgumentTypeError("0 keeps no token: give a number above 0, at most 1")
    return x


def sampling_kwargs(temperature: float, top_p: float, seed: int) -> dict:
    """``generate`` keyword arguments for one answer: none for greedy, else
    the serving path's seeded sampler (so the CLI and the API's ``seed``
    draw alike)."""
    if temperature <= 0:
        return {}
    from transformers import LogitsProcessorList

    from serve.batching import GenerationRequest
    from serve.sampling import SeededSampler

    req = GenerationRequest(input_ids=[], temperature=temperature, top_p=top_p, seed=seed)
    return {"logits_processor": LogitsProcessorList([SeededSampler(req)])}


def register(sub) -> None:
    p = sub.add_parser("presets", help="list presets, or print one resolved config",
                       description="List the presets, or print one (with --set overrides applied) as YAML.")
    p.add_argument("name", nargs="?", help="preset name or config file to print")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=presets)

    p = sub.add_parser("chat", help="ask the model about images (one answer)",
                       description="Answer one prompt about zero or more images with a preset's model "
                                   "or a trained checkpoint.")
    add_model_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder written by training (default: the preset's weights)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--audio", help="audio file: its transcription is appended to the prompt")
    p.add_argument("--prompt", default="", help="the question")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="at most this many answer tokens (default: 64); prompt + these must fit the model's context")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="sampling temperature from 0 to 2, as the API's (default: 0, greedy)")
    p.add_argument("--top-p", type=_top_p, default=1.0,
                   help="with --temperature: sample from the smallest set of tokens this likely (above 0, "
                        "at most 1; default: 1)")
    p.add_argument("--seed", type=int, default=None,
                   help="with --temperature: draw with a generator seeded so, which repeats the answer "
                        "(the API's seed draws the same way; default: a new one, printed on stderr)")
    p.set_defaults(func=chat)

    p = sub.add_parser("transcribe", help="speech to text with the preset's Whisper",
                       description="Transcribe audio files (wav, mp3, flac, ogg, m4a, webm ...) with Whisper.")
    add_model_args(p)
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument("--language", help="a Whisper language code or name, e.g. en or German "
                   "(default: the preset's speech.language; detected when that is unset)")
    p.add_argument("--temperature", type=unit_float, default=None,
                   help="sampling temperature from 0 to 1 (default: the preset's speech.temperature, 0: greedy)")
    p.set_defaults(func=transcribe)


def presets(args: argparse.Namespace) -> int:
    import yaml

    from models.config import list_presets, load_config

    if not args.name:
        print("\n".join(list_presets()))
        return 0
    print(yaml.safe_dump(load_config(args.name, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def chat(args: argparse.Namespace) -> int:
    from models.checkpoint import CheckpointError
    from models.config import load_config
    from models.multimodal import MultimodalPhi3
    from models.speech import AudioDecodeError, SpeechRecognizer, decode_audio
    from models.vision import ImageDecodeError, load_image

    cfg = load_config(args.preset, args.overrides)
    prompt = args.prompt.strip()  # a blank --prompt is no prompt
    if not prompt and not args.image and not args.audio:
        print("mmphi chat: give --prompt (not blank), --image or --audio", file=sys.stderr)
        return 2
    try:
        images = []
        for path in args.image:  # each checked here: a missing or broken file is named before anything loads
            load_image(path)
            images.append(Path(path).read_bytes())  # the model decodes it as its config says (vision.jpeg_draft)
        # the config and tokenizer alone (a checkpoint's own): the prompt is measured before the weights load
        # (minutes for a real model), and the audio is heard with the Whisper the checkpoint names
        model_cfg, tokenizer = chat_tokenizer(args.checkpoint, cfg, args.overrides)
        if args.audio:
            audio = decode_audio(args.audio, max_seconds=model_cfg.speech.max_seconds)  # before Whisper loads
            heard = SpeechRecognizer(model_cfg.speech, args.device).transcribe(audio)
            if not prompt and not images and not heard:
                print(f"mmphi chat: Whisper heard no words in {args.audio}, and there is no --prompt or --image",
                      file=sys.stderr)
                return 2
            prompt = f"{prompt}\n{heard}".strip()
        content = [{"type": "image"} for _ in images] + ([{"type": "text", "text": prompt}] if prompt else [])
        messages = [{"role": "user", "content": content}]
        check_context(model_cfg, tokenizer, messages, args.max_new_tokens)
        if args.checkpoint:
            model = MultimodalPhi3.from_checkpoint(args.checkpoint, device=args.device, overrides=args.overrides)
        else:
            model = MultimodalPhi3.from_config(cfg, device=args.device, trainable=False)
    except (ImageDecodeError, AudioDecodeError, FileNotFoundError, CheckpointError, ContextLengthExceeded) as e:
        print(f"mmphi chat: {e}", file=sys.stderr)
        return 2
    seed = args.seed
    if args.temperature > 0 and seed is None:  # the global generator is where building the model left it
        import secrets

        seed = secrets.randbits(63)
        print(f"mmphi chat: sampling with --seed {seed} (give it to draw this answer again)", file=sys.stderr)
    answer = model.chat(messages, images, max_new_tokens=args.max_new_tokens,
                        **sampling_kwargs(args.temperature, args.top_p, seed))
    print(answer)
    if not answer:  # a blank line alone reads as a failure; the chat page says "(empty answer)" too
        print("mmphi chat: the answer is empty (the model ended its turn at once)", file=sys.stderr)
    return 0


class ContextLengthExceeded(ValueError):
    """The prompt and the answer asked for do not fit the model's context."""


def chat_tokenizer(checkpoint, cfg, overrides):
    """The config and tokenizer a chat will use: a checkpoint's own (its saved
    config with the runtime overrides, its saved tokenizer), else the preset's."""
    from models.checkpoint import CheckpointError, check_files, read_meta
    from models.config import apply_overrides
    from models.tokenizer import ChatTokenizer, load_tokenizer

    if not checkpoint:
        return cfg, load_tokenizer(cfg)
    meta = read_meta(checkpoint)
    check_files(checkpoint, meta, sizes=False)  # a missing file named, as the full load does
    cfg = apply_overrides(meta["config"], overrides)
    try:
        return cfg, ChatTokenizer.load(Path(checkpoint) / "tokenizer", cfg.tokenizer.image_token)
    except (OSError, ValueError) as e:
        check_files(checkpoint, meta)  # a file cut short, named
        why = " ".join(str(e).split())
        raise CheckpointError(f"{checkpoint}: its tokenizer does not load ({type(e).__name__}: {why})") from None


def check_context(cfg, tokenizer, messages: list[dict], max_new_tokens: int) -> int:
    """The prompt's length in tokens (images count the vision tower's tokens
    each); ``ContextLengthExceeded`` when it plus ``max_new_tokens`` is over
    the model's context (``tokenizer.max_length``), the serving API's rule
    (``context_length_exceeded``). Needs the config and tokenizer only."""
    from models.conversation import encode_conversation
    from models.vision import vision_spec

    context = int(cfg.tokenizer.max_length)
    if max_new_tokens >= context:
        raise ContextLengthExceeded(f"--max-new-tokens is {max_new_tokens} but the model's context is {context} "
                                    "tokens")
    per_image = vision_spec(cfg.vision)["num_tokens"]
    n = len(encode_conversation(tokenizer, messages, per_image, add_generation_prompt=True,
                                system_prompt=cfg.tokenizer.system_prompt))
    if n + max_new_tokens > context:
        raise ContextLengthExceeded(
            f"the prompt needs {n} tokens (images count {per_image} each) and --max-new-tokens asks "
            f"for {max_new_tokens}, over the model's context of {context} tokens; shorten the prompt or lower "
            "--max-new-tokens")
    return n


def transcribe(args: argparse.Namespace) -> int:
    from models.config import load_config
    from models.speech import AudioDecodeError, SpeechRecognizer, decode_audio, language_code

    try:
        language = args.language and language_code(args.language)
    except ValueError as e:
        print(f"mmphi transcribe: {e}", file=sys.stderr)
        return 2
    cfg = load_config(args.preset, args.overrides).speech
    recognizer = None  # loaded at the first file that decodes: a mistyped name or a text file costs no model load
    status = 0
    for path in args.files:
        try:
            audio = decode_audio(path, max_seconds=cfg.max_seconds)  # one file's samples at a time
            if recognizer is None:
                recognizer = SpeechRecognizer(cfg, args.device)
            print(f"{path}\t{recognizer.transcribe(audio, language=language, temperature=args.temperature)}")
        except AudioDecodeError as e:
            print(f"mmphi transcribe: {e}", file=sys.stderr)
            status = 1
    return status
