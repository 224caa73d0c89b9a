"""``mmphi demo``: the main job on the tiny preset, offline, on the CPU.

It runs every stage built so far, reusing what an earlier run finished:

1. ``mmphi data synth``: a synthetic LLaVA-format data set (shapes, colours,
   positions, counts, sizes; train/validation split by image);
2. ``mmphi data embed``: the Ray Data job embeds every image once with the
   CLIP tower (local Ray cluster; resumes if interrupted);
3. Ray Train (2 workers), the curriculum's three runs as one plan, trained by
   one worker group (``ray_jobs.train.run_sequence``, what ``mmphi train
   plan`` runs): stage 1, the projector only;
   then stage 2 from stage 1, LoRA + projector, in two runs (a curriculum):
   first on the single-object scenes only (colour, shape, position, size),
   then on every record (adds counting up to six objects);
4. held-out answer accuracy per question type next to its chance level and
   the "blind" accuracy (images replaced by their training mean);
5. the final checkpoint reloaded, the stored embeddings checked against the
   live CLIP tower (same logits within 1e-2), and one answer about a
   held-out image;
6. Whisper transcribing a clip;
7. Ray Serve: the trained checkpoint behind the chat page and the
   OpenAI-compatible API (``mmphi serve``); the held-out questions the
   training job scored go through HTTP (served accuracy next to the job's),
   then the demo prints the page's URL and serves until Ctrl-C
   (``--serve check`` stops after those questions, ``--serve off`` skips it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmphi.cli import add_model_args, positive_float, positive_int

STEPS = 1600
SINGLE_SHARE = 0.4  # of stage 2's steps: the curriculum's first run, on single-object scenes
IN_FLIGHT = 32  # HTTP questions at once in the serving check


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the tiny preset (offline, CPU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--images", type=positive_int, default=6000, help="synthetic images (default: 6000)")
    p.add_argument("--steps", type=positive_int, default=STEPS,
                   help=f"stage-2 steps (default: {STEPS}); the first {round(SINGLE_SHARE * 100)}%% on single-object scenes; "
                        "stage 1 runs a tenth")
    p.add_argument("--batch-size", type=positive_int, default=12, help="per worker (default: 12)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tool-records", type=float, default=0.0, metavar="FRACTION",
                   help="tool-use records in the synthetic data, per image (mmphi data synth --tool-records; "
                        "default: 0); the tiny model learns their calls with --set tokenizer.build.tool_corpus=true")
    p.add_argument("--serve", choices=("forever", "check", "off"), default="forever",
                   help="after training: serve until Ctrl-C (default), answer one HTTP question and stop, or skip")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the chat page and API (default: 8000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from data_pipelines.embed import EmbeddingStore, EmbedSettings
    from data_pipelines.embed import run as embed
    from data_pipelines.llava import dataset_paths
    from data_pipelines.storage import check_output_folder
    from data_pipelines.synthetic import MAX_TOOL_FRACTION, default_workers, single_object_view, synthesize
    from models.config import load_config
    from models.conversation import collate, encode_conversation
    from models.multimodal import MultimodalPhi3
    from models.speech import SAMPLE_RATE, SpeechRecognizer
    from ray_jobs import data as D
    from ray_jobs.evaluate import accuracy_table
    from ray_jobs.train import TrainSettings
    from ray_jobs.train import run_sequence as train_sequence

    out = Path(args.out)
    try:
        check_output_folder(str(out), "--out")
        if not 0 <= args.tool_records <= MAX_TOOL_FRACTION:  # before anything is written
            raise ValueError(f"--tool-records must be in [0, {MAX_TOOL_FRACTION}], got {args.tool_records}")
    except ValueError as e:
        print(f"mmphi demo: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = load_config(args.preset, args.overrides)

    data = out / "data"
    done = data / "synth.json"
    params = json.loads(done.read_text())["params"] if done.exists() else {}
    if params.get("images") == args.images and params.get("seed") == args.seed \
            and params.get("tool_fraction", 0.0) == args.tool_records:
        print(f"[1/7] synthetic data: reusing {data}")
    else:
        print(f"[1/7] synthetic data: {args.images} images -> {data}")
        synthesize(data, images=args.images, seed=args.seed, progress=False, workers=default_workers(args.images),
                   tool_fraction=args.tool_records)

    # held-out first questions scored by the job and asked again over HTTP: one about every validation image
    eval_samples = json.loads(done.read_text())["counts"]["val_images"]
    timings = {"data": round(time.time() - t0, 1)}
    print("[2/7] Ray Data: embedding every image with the CLIP tower (resumes if interrupted)")
    emb_dir = out / "embeddings" / cfg.name
    m = embed(EmbedSettings(out=str(emb_dir), data=str(data), preset=args.preset, overrides=args.overrides))
    last = m["last_run"]
    print(f"      {m['count']} images in {emb_dir} ({m['bytes_per_image']:,} bytes each); this run embedded "
          f"{last['embedded']} in {last['seconds']} s, {len(m['skipped'])} skipped")

    timings["embed"] = round(time.time() - t0 - sum(timings.values()), 1)
    runs = out / "runs"
    common = dict(data=str(data), embeddings=str(emb_dir), out=str(runs), preset=args.preset,
                  overrides=args.overrides, workers=args.workers, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, cpus_per_worker=0.5, threads=1, eval_samples=eval_samples)
    s1_steps = max(args.steps // 10, 2)
    single_steps = max(round(args.steps * SINGLE_SHARE), 1)
    rest = max(args.steps - single_steps, 1)
    print(f"[3/7] Ray Train, {args.workers} workers, the curriculum's three runs in one worker group "
          "(resumes if interrupted):\n"
          f"      stage 1 (projector only): {s1_steps} steps -> {runs / 'stage1'}\n"
          f"      stage 2 (LoRA + projector): {single_steps} steps on single-object scenes -> "
          f"{runs / 'stage2-single'}, then {rest} on everything -> {runs / 'stage2'}")
    # blind accuracy only for the final run: the earlier ones are steps on its way
    s1, s2a, s2 = train_sequence([
        TrainSettings(stage="projector", name="stage1", steps=s1_steps, eval_every=s1_steps, ckpt_every=s1_steps,
                      warmup=min(10, s1_steps), blind_eval=False, **common),
        TrainSettings(stage="qlora", name="stage2-single", steps=single_steps, eval_every=single_steps,
                      ckpt_every=max(single_steps // 2, 1), blind_eval=False,
                      **(common | {"data": str(single_object_view(data))})),
        TrainSettings(stage="qlora", name="stage2", steps=rest, eval_every=max(rest // 2, 1),
                      ckpt_every=max(rest // 4, 1), **common)])
    timings["train"] = round(time.time() - t0 - sum(timings.values()), 1)  # the three runs; each one's share: its seconds_last_fit
    timings["trained"] = round(time.time() - t0, 1)  # data, embeddings, both stages and their evaluations
    print(f"[4/7] stage 1: loss {s1['first_loss']:.3f} (ln vocab {s1['ln_vocab']:.3f}) -> {s1['val_loss']:.3f}")
    print(f"      stage 2, single-object scenes: loss {s2a['first_loss']:.3f} -> {s2a['val_loss']:.3f}")
    print(f"      stage 2, everything: loss {s2['first_loss']:.3f} -> {s2['val_loss']:.3f}; "
          f"token accuracy {s2['token_accuracy']:.1%}; {timings['trained']:.0f} s from the start")
    print(f"      held-out answer accuracy (blind: images replaced by their mean); curves in "
          f"{runs / 'stage2' / 'curves.png'}:")
    print(accuracy_table(s2, indent="        "))

    print(f"[5/7] checkpoint: reload {s2['final']}, check stored embeddings against the live CLIP tower, "
          "ask about an image")
    store = EmbeddingStore(str(emb_dir))
    model = MultimodalPhi3.from_checkpoint(s2["final"], device=args.device, expect=store.identity)
    val = D.first_exchanges(D.load_samples(str(data), "val", "qlora"))
    sample = next((s for s in val if not s.tools), val[0])  # a question answered in words
    enc = encode_conversation(model.tokenizer, sample.messages[:-1], model.num_image_tokens, add_generation_prompt=True)
    batch = collate([enc], model.tokenizer.ids.pad)
    images = dataset_paths(data)["images"]
    with torch.no_grad():
        from_store = model(**batch, image_features=torch.from_numpy(store[sample.image].astype(np.float32))[None]).logits
        from_pixels = model(**batch, image_features=model.encode_images([images / sample.image])).logits
    same = bool(torch.allclose(from_store, from_pixels, atol=1e-2))
    reply = model.chat(sample.messages[:-1], [images / sample.image], max_new_tokens=8)
    question = _question(sample)
    print(f"      stored embeddings and live CLIP agree: {same}; Q: {question!r} A: {reply!r} "
          f"(reference: {sample.messages[-1]['content']!r})")

    print("[6/7] speech: transcribing a generated 2 s clip with Whisper "
          f"({'random weights: expect gibberish' if cfg.speech.random_init else cfg.speech.model})")
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    clip = (0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)).astype(np.float32)
    text = SpeechRecognizer(cfg.speech, args.device).transcribe(clip)
    print(f"      transcript: {text!r}")

    summary = {
        "preset": cfg.name, "seconds": round(time.time() - t0, 1), "timings": timings, "images": m["count"],
        "stage1": s1, "stage2_single": s2a, "stage2": s2, "store_matches_live_encoder": same, "checkpoint": s2["final"],
        "embeddings": str(emb_dir), "in_process_answer": reply,
    }
    if args.serve == "off":
        print("[7/7] Ray Serve: skipped (--serve off)")
    else:
        summary["served"] = _serve(args, s2, val[:eval_samples], images)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
    if args.serve == "forever":
        from serve.app import metrics_url, serve_until_interrupted

        serve_until_interrupted(summary["served"]["url"], metrics_url())
    return 0 if same else 1


def _question(sample) -> str:
    """The text of a record's first question (its image is a part of its own)."""
    return next(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text")


TOOL_ANSWER_TOKENS = 64  # a call of the synthetic data is about 30 tokens of the tiny preset's tokenizer


def answered_message(message: dict, expected: dict) -> bool:
    """Whether an API answer (an OpenAI chat message) is the assistant message
    ``expected``, as ``ray_jobs.train.answered`` scores generated text."""
    from models.tools import calls_text
    from ray_jobs.train import answered

    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls") or []]
    text = "\n".join(x for x in (message.get("content") or "", calls_text(calls)) if x)
    return answered(text, expected)


def _serve(args, s2: dict, questions: list, images: Path) -> dict:
    """Serve the stage-2 checkpoint and ask the held-out questions the training
    job scored (the first question about each validation image) over HTTP."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from ray_jobs.train import ANSWER_TOKENS
    from serve.app import run_local

    print(f"[7/7] Ray Serve: ASR, ImageEncoder and LLM deployments behind the chat page, checkpoint {s2['final']}")
    started = time.time()
    # no access log: the check's 1,200 requests would print 3 lines each (ingress, encoder, LLM)
    # nor the controller's and proxy's INFO lines (one per replica start, the proxy's list of every route)
    url = run_local(checkpoint=s2["final"], port=args.port, blocking=False, access_log=False, system_logs="WARNING")
    ready = time.time() - started

    def ask(client, sample) -> dict:
        question = _question(sample)
        image = "data:image/png;base64," + base64.b64encode((images / sample.image).read_bytes()).decode()
        body = {"max_tokens": ANSWER_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                          {"type": "text", "text": question}]}]}
        if sample.tools:  # offered as a client would, the model free to answer in words (tool_choice auto)
            body["tools"] = [{"type": "function", "function": t} for t in sample.tools]
            body["max_tokens"] = TOOL_ANSWER_TOKENS
        r = client.post(f"{url}v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]

    # as many in flight as the LLM replica batches (continuous batching, 32 rows), over kept-alive connections:
    # a new connection per request (httpx.post) halved the rate on 2 cores (18 against 32 questions/s at 8)
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    with httpx.Client(timeout=120, limits=limits) as client, ThreadPoolExecutor(IN_FLIGHT) as pool:
        answers = list(pool.map(lambda sample: ask(client, sample), questions))
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for sample, message in zip(questions, answers):
        q = sample.qtypes[0]
        total[q] = total.get(q, 0) + 1
        right[q] = right.get(q, 0) + answered_message(message, sample.messages[-1])
    accuracy = {q: right[q] / total[q] for q in sorted(total)}
    print(f"      ready in {ready:.0f} s; {len(questions)} held-out questions over HTTP (training job's figure "
          "in brackets):")
    print("        " + "  ".join(f"{q} {accuracy[q]:.0%} ({s2['answer_accuracy'].get(q, 0):.0%})" for q in accuracy))
    k = next((k for k, s in enumerate(questions) if not s.tools), 0)  # the question step 5 asked in-process
    first = questions[k]
    print(f"      e.g. Q: {_question(first)!r} "
          f"A: {answers[k]['content']!r} (reference: {first.messages[-1]['content']!r})")
    called = next(((s, m) for s, m in zip(questions, answers) if s.tools), None)
    if called:
        print(f"      a tool request: Q: {_question(called[0])!r} "
              f"calls: {[(c['function']['name'], c['function']['arguments']) for c in called[1].get('tool_calls') or []]} "
              f"text: {called[1]['content']!r} (reference: {called[0].messages[-1]['tool_calls']})")
    served = {"url": url, "answer": answers[k]["content"], "answer_accuracy": accuracy, "answer_counts": total,
              "accuracy": sum(right.values()) / max(sum(total.values()), 1)}
    if args.serve == "check":
        from serve.app import stop_app

        stop_app()
    return served

