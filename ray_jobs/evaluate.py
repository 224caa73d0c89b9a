"""``mmphi eval``: held-out metrics of a checkpoint on a data set's validation split.

    mmphi eval --checkpoint RUNS/NAME/final --data D --embeddings E [--blind]

Validation loss, perplexity, token accuracy and answer accuracy per question
type (generated answer == reference), next to each type's chance level, and
the same with every image replaced by the training mean ("blind").
"""
from __future__ import annotations

import argparse
import json
import sys


def evaluate_checkpoint(checkpoint: str, data: str, embeddings: str, samples: int = 400,
                        batch_size: int = 32, device: str | None = None) -> dict:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be an integer of 1 or more, got {samples!r}")
    if device is not None:
        from models.config import check_device_name

        check_device_name(device)  # before the checkpoint loads
    from data_pipelines.embed import EmbeddingStore
    from models.checkpoint import load_checkpoint

    from . import data as D
    from .outputs import _chance
    from .train import evaluate

    store = EmbeddingStore(embeddings)
    val = D.load_samples(data, "val", "qlora")[:samples]
    if not val:  # before the checkpoint loads
        raise ValueError(f"the val split of {data} is empty: there is nothing to evaluate")
    model = load_checkpoint(checkpoint, device=device, with_vision=False, expect=store.identity)
    tok = model.tokenizer
    train = D.load_samples(data, "train", "qlora")
    answers = D.first_exchanges(D.load_samples(data, "val", "qlora"))[:samples]
    feats = D.Features(store, [s.image for s in train + val + answers if s.image])
    val_enc = D.encode_all(tok, val, model.num_image_tokens, model.cfg.tokenizer.max_length)
    seen = evaluate(model, tok, val_enc, val, feats, answers, 1, 0, batch_size)
    blind = evaluate(model, tok, val_enc, val, feats, answers, 1, 0, batch_size,
                     blind_mean=feats.mean([s.image for s in train if s.image]), loss=False)
    return {**seen, "blind_answer_accuracy": blind["answer_accuracy"], "chance": _chance(data),
            "checkpoint": checkpoint}


def accuracy_table(res: dict, indent: str = "") -> str:
    """Per question type: answer accuracy, blind accuracy, chance level, count."""
    lines = [f"{indent}{'question':<10}{'accuracy':>10}{'blind':>8}{'chance':>8}{'n':>6}"]
    for q, acc in res["answer_accuracy"].items():
        ch = res["chance"].get(q)
        lines.append(f"{indent}{q:<10}{acc:>10.1%}{res['blind_answer_accuracy'].get(q, 0):>8.1%}"
                     f"{(f'{ch:.1%}' if ch else '-'):>8}{res['answer_counts'][q]:>6}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model checkpoint folder (e.g. RUNS/NAME/final)")
    p.add_argument("--data", required=True, help="data set folder (its val.json is evaluated)")
    p.add_argument("--embeddings", required=True, help="embedding job output for that data set")
    p.add_argument("--samples", type=int, default=400, help="at most this many validation conversations")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--out", help="write the metrics as JSON here too")


def main(args: argparse.Namespace) -> int:
    try:
        res = evaluate_checkpoint(args.checkpoint, args.data, args.embeddings, args.samples, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmphi eval: {e}", file=sys.stderr)
        return 2
    if res["val_loss"] is None:  # no answer token left to score (every answer cut by the context length)
        print("val loss -  perplexity -  token accuracy - (no answer token to score)")
    else:
        print(f"val loss {res['val_loss']:.4f}  perplexity {res['perplexity']:.2f}  "
              f"token accuracy {res['token_accuracy']:.3f}")
    print(accuracy_table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
