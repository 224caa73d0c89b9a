"""The three model deployments: ASR (Whisper), ImageEncoder (CLIP), LLM (Phi-3).

Each is its own Ray Serve deployment with its own resources and autoscaling
(defaults here; ``serve/config.yaml`` overrides them per deployment). The
ingress composes them through ``DeploymentHandle`` s.

- ``ASR.transcribe(bytes) -> str``: decodes with ffmpeg (limits checked per
  request), then clips of up to 30 s are batched into one Whisper decode (a
  request's own language or temperature decodes it alone).
- ``ImageEncoder.encode(bytes) -> float32 (tokens, dim)``: decodes and crops
  per request (pixel limit checked before decoding), then batches the CLIP
  forward pass; the features of the images it encoded lately are kept
  (``encoder_cache_mb``), and the router sends each image to one replica
  (``serve.image_cache``). The ASR's and the ImageEncoder's ``user_config``
  set their batch size and wait (``BatchWindow``).
- ``LLM.generate(request)``: a streaming method yielding lists of new token
  ids; concurrent requests share forward passes (continuous batching,
  ``serve.batching``), and a request leaves the batch when its caller goes
  away. ``user_config`` turns batching off (one ``generate`` per request in a
  worker thread) or sets ``max_batch_size``.

Bad input raises ``ImageDecodeError`` / ``AudioDecodeError`` to the caller;
it never takes a replica down.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import numpy as np
from ray import serve

from .loading import load_llm, load_tokenizer, load_vision, resolve, set_threads
from .metrics import LLMMetrics
from .settings import ServeSettings

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs

WHISPER_WINDOW_S = 30.0


def _autoscaling(max_replicas: int, target: float) -> dict:
    return {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas,
            "target_ongoing_requests": target, "upscale_delay_s": 5, "downscale_delay_s": 60}


@dataclasses.dataclass(frozen=True)
class BatchWindow:
    """How a deployment's ``@serve.batch`` gathers calls: at most
    ``max_batch_size`` per forward pass, waiting up to ``batch_wait_timeout_s``
    after the first for more. The wait is paid by a lone request, so it is
    short: calls that arrive while a batch runs queue up and form the next
    one anyway. The ASR and ImageEncoder ``user_config`` (live on ``serve
    deploy``)."""

    max_batch_size: int
    batch_wait_timeout_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def update(self, deployment: str, config: dict | None) -> "BatchWindow":
        """These settings with ``config``'s, checked; errors name the key."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.to_dict()))
        if unknown:
            raise ValueError(f"unknown {deployment} user_config key(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(self.to_dict())}")
        new = dataclasses.replace(self, **config)
        size, wait = new.max_batch_size, new.batch_wait_timeout_s
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{deployment} max_batch_size must be a positive integer, got {size!r}")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 1:
            raise ValueError(f"{deployment} batch_wait_timeout_s must be a number of seconds in [0, 1], got {wait!r}")
        return new

    def apply(self, batched) -> None:
        """Set a ``@serve.batch`` method's batch size and wait."""
        batched.set_max_batch_size(self.max_batch_size)
        batched.set_batch_wait_timeout_s(float(self.batch_wait_timeout_s))


ASR_BATCH = BatchWindow(max_batch_size=8, batch_wait_timeout_s=0.02)  # a Whisper decode takes far longer
IMAGE_BATCH = BatchWindow(max_batch_size=16, batch_wait_timeout_s=0.005)


@serve.deployment(name="ASR", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16,
                  autoscaling_config=_autoscaling(2, 4), health_check_period_s=10, user_config=ASR_BATCH.to_dict())
class ASR:
    def __init__(self, settings: dict):
        from models.speech import SpeechRecognizer

        self.settings = ServeSettings.from_dict(settings)
        set_threads(self.settings)
        source = resolve(self.settings)
        self.recognizer = SpeechRecognizer(source.cfg.speech, self.settings.device)
        self.max_seconds = min(self.settings.limits.max_audio_seconds, source.cfg.speech.max_seconds)
        log.info("ASR ready: %s", self.recognizer.info)

    def reconfigure(self, config: dict) -> None:
        """Apply the deployment's ``user_config``: its batch window (``BatchWindow``)."""
        ASR_BATCH.update("ASR", config).apply(self._decode_batch)

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        if self.recognizer.model is None:
            raise RuntimeError("Whisper model is not loaded")

    async def transcribe(self, data: bytes, language: str | None = None, temperature: float | None = None,
                         detail: bool = False, task: str = "transcribe") -> str | dict:
        """The text of an audio file. ``language`` and ``temperature`` default
        to the config's; ``detail`` returns ``{"text", "language", "duration"}``
        with the language decoded in (given or detected) and the seconds of
        audio; ``task`` "translate" gives English text (decoded alone, not in
        the batch of transcriptions)."""
        from models.speech import SAMPLE_RATE, decode_audio

        audio = await asyncio.to_thread(decode_audio, data, max_seconds=self.max_seconds)
        cfg = self.recognizer.cfg
        if language == cfg.language:
            language = None  # the batch's own options
        if temperature is not None and float(temperature) == float(cfg.temperature):
            temperature = None
        if task == "transcribe" and language is None and temperature is None \
                and audio.size <= WHISPER_WINDOW_S * SAMPLE_RATE:
            text, lang = await self._decode_batch(audio)
        else:
            heard = await asyncio.to_thread(self.recognizer.recognize, audio, language=language,
                                            temperature=temperature, task=task)
            text, lang = heard.text, heard.language
        if not detail:
            return text
        return {"text": text, "language": lang, "duration": audio.size / SAMPLE_RATE}

    @serve.batch(max_batch_size=ASR_BATCH.max_batch_size, batch_wait_timeout_s=ASR_BATCH.batch_wait_timeout_s)
    async def _decode_batch(self, clips: list[np.ndarray]) -> list[tuple[str, str]]:
        return await asyncio.to_thread(self._decode, clips)

    def _decode(self, clips: list[np.ndarray]) -> list[tuple[str, str]]:
        """One Whisper decode over a batch of clips of at most 30 s each, with
        the config's options: (text, language) for each."""
        import torch
        import whisper

        model, cfg = self.recognizer.model, self.recognizer.cfg
        mels = torch.stack([
            whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c)), model.dims.n_mels)
            for c in clips
        ]).to(self.recognizer.device)
        options = whisper.DecodingOptions(
            language=cfg.language, temperature=float(cfg.temperature), sample_len=cfg.sample_len,
            beam_size=cfg.beam_size, without_timestamps=True, fp16=self.recognizer.device.type == "cuda",
        )
        with torch.no_grad():
            results = whisper.decode(model, mels, options)
        # the text of the text tokens, as model.transcribe gives it (a result's .text keeps
        # special tokens below the timestamps, <|notimestamps|> among them)
        tok = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
        return [(tok.decode([t for t in r.tokens if t < tok.eot]).strip(), r.language) for r in results]


# calls with an affinity_key (a chat's opening, an image's hash) go to the same replica (serve.routing)
AFFINITY_ROUTER = {"request_router_class": "serve.routing:ChatAffinityRouter",
                   "request_router_kwargs": {"imbalanced_threshold": 8}}


@serve.deployment(name="ImageEncoder", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16,
                  autoscaling_config=_autoscaling(2, 4), health_check_period_s=10, user_config=IMAGE_BATCH.to_dict(),
                  request_router_config=AFFINITY_ROUTER)
class ImageEncoder:
    def __init__(self, settings: dict):
        from .image_cache import FeatureCache
        from .metrics import ImageCacheMetrics

        self.settings = ServeSettings.from_dict(settings)
        set_threads(self.settings)
        source = resolve(self.settings)
        self.vision = load_vision(source, self.settings.device)
        self.max_pixels = self.settings.limits.max_image_pixels
        self.cache = FeatureCache(int(self.settings.encoder_cache_mb * 2**20))
        self.cache_metrics = ImageCacheMetrics("encoder")
        log.info("ImageEncoder ready: %s, %d tokens x %d per image", source.cfg.vision.model,
                 self.vision.num_tokens, self.vision.feature_dim)

    def reconfigure(self, config: dict) -> None:
        """Apply the deployment's ``user_config``: its batch window (``BatchWindow``)."""
        IMAGE_BATCH.update("ImageEncoder", config).apply(self._encode_batch)

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        if self.vision is None:
            raise RuntimeError("vision tower is not loaded")

    def info(self) -> dict:
        return {"num_tokens": self.vision.num_tokens, "feature_dim": self.vision.feature_dim}

    async def encode(self, data: bytes, affinity_key: str | None = None) -> np.ndarray:
        """Image bytes -> raw CLIP features (tokens, dim), float32: the kept
        ones when this replica encoded the same bytes lately (``encoder_cache_mb``).
        ``affinity_key`` (the image's hash, from the ingress) is for the router."""
        if not self.cache.max_bytes:
            return await self._encode(data)
        feats, hit = self.cache.fetch(await asyncio.to_thread(self.cache.key, data), lambda: self._encode(data))
        self.cache_metrics.lookup(hit)
        return await feats

    async def _encode(self, data: bytes) -> np.ndarray:
        crop = await asyncio.to_thread(self.vision.pipeline.crop, data, self.max_pixels)
        return await self._encode_batch(crop)

    @serve.batch(max_batch_size=IMAGE_BATCH.max_batch_size, batch_wait_timeout_s=IMAGE_BATCH.batch_wait_timeout_s)
    async def _encode_batch(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._forward, crops)

    def _forward(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        from models.vision import DTYPES

        pixels = self.vision.pipeline.normalize(np.stack(crops), self.vision.device, DTYPES[self.vision.cfg.dtype])
        feats = self.vision(pixels).float().cpu().numpy()
        return list(feats)


@serve.deployment(name="LLM", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=48,
                  autoscaling_config=_autoscaling(2, 16), health_check_period_s=10,
                  graceful_shutdown_timeout_s=30, request_router_config=AFFINITY_ROUTER,
                  user_config={"continuous_batching": True, "max_batch_size": 32})
class LLM:
    """Phi-3 (+ adapter) and the projector. With ``continuous_batching`` (the
    default, ``user_config``) one loop decodes every ongoing request together,
    up to ``max_batch_size`` rows per step (``serve.batching``); without it
    each request runs its own ``generate`` call in a worker thread.
    ``max_ongoing_requests`` above ``max_batch_size`` keeps a few requests
    waiting in the replica, ready to take a row as soon as one frees up."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings.from_dict(settings)
        set_threads(self.settings)
        source = resolve(self.settings)
        self.model = load_llm(source, self.settings)
        self.context_length = source.context_length
        self.stop_ids = set(self.model.tokenizer.stop_ids)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="generate")
        self.batcher = None
        self._batching_said = None  # the last "LLM batching" log line's text
        self.metrics = LLMMetrics()
        self._unbatched = 0  # requests in generate threads (batching off, or too long for the cache)
        self._grammars = None  # serve.grammar.Grammars, built at the first structured-output request
        self._grammars_lock = threading.Lock()
        # the queue gauges, set every second (Ray drops a gauge not set within a report interval)
        self._stopped = threading.Event()
        threading.Thread(target=_queue_gauges, args=(weakref.ref(self), self._stopped), name="llm-gauges",
                         daemon=True).start()
        self.reconfigure({})  # the defaults; Serve then applies the deployment's user_config
        log.info("LLM ready: %s on %s", source.description, self.model.device)

    def reconfigure(self, config: dict) -> None:
        """Apply the deployment's ``user_config`` (also live, on ``serve deploy``).
        ``max_batch_size``, ``prefill_batch_tokens``, ``prefix_cache``, ``prefill_chunk_tokens`` and
        ``continuous_batching`` apply at once; the
        cache options (``kv_cache``, ``max_seq_len``, ``kv_cache_fraction``,
        ``cuda_graphs``, and ``max_batch_size`` with the static cache, whose
        rows it sizes) rebuild the batcher when it is idle, else apply when
        the replica restarts."""
        from .batching import BatchingOptions, ContinuousBatcher

        self.options = BatchingOptions.from_dict(config)
        old = self.batcher
        if old is not None and old.options.cache_key() != self.options.cache_key():
            if old.active or old.waiting:
                log.warning("LLM: new KV cache options apply when this replica restarts (requests are running)")
            else:
                old.close()
                self.batcher = old = None
        if self.options.continuous_batching and self.batcher is None:
            self.batcher = ContinuousBatcher(self.model, self.options.max_batch_size,
                                             suppress_ids=self.model.suppressed_ids, options=self.options,
                                             context_length=self.context_length).start()
        if self.batcher is not None:  # the options that apply live
            self.batcher.max_batch_size = self.options.max_batch_size
            self.batcher.options = dataclasses.replace(self.batcher.options,
                                                       prefill_batch_tokens=self.options.prefill_batch_tokens,
                                                       prefix_cache=self.options.prefix_cache,
                                                       prefill_chunk_tokens=self.options.prefill_chunk_tokens)
        said = (f"continuous, up to {self.batcher.max_batch_size} rows per step, {self.batcher.describe()}"
                if self.options.continuous_batching else "off (one generate call per request)")
        if said != self._batching_said:  # once at start, then on each change
            log.info("LLM batching: %s", said)
            self._batching_said = said

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        if self._pool._shutdown:
            raise RuntimeError("generation thread pool is shut down")
        if self.batcher is not None and not self.batcher.alive():
            raise RuntimeError(f"the continuous batching loop stopped: {self.batcher.error!r}")

    def pid(self) -> int:
        import os

        return os.getpid()

    def batching_stats(self) -> dict:
        b = self.batcher
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - built outside Serve
            replica = None
        return {"replica": replica, "continuous_batching": self.options.continuous_batching,
                "max_batch_size": self.options.max_batch_size,
                **({"active": b.active, "waiting": b.waiting, **b.stats, **b.describe()} if b is not None else {})}

    async def generate(self, request: dict) -> AsyncIterator[list[int] | dict]:
        """Stream new token ids for ``request``:

        ``input_ids`` (list of ints, image placeholders included),
        ``image_features`` (float32 array (images, tokens, dim) or None),
        ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p``, optional
        ``min_new_tokens`` (stop ids are suppressed until then), ``seed``
        (sampling with the request's own generator), ``response_format`` (a
        ``serve.grammar`` format spec), ``frequency_penalty`` and
        ``presence_penalty``, and ``answer_start``: where the answer so far
        begins in ``input_ids`` when an answer is continued here after
        another replica failed (it counts for the penalties and the format);
        ``logprobs`` (how many most likely tokens to rate beside each chosen
        one: the messages are then ``{"ids": [...], "logprobs": [[logprob,
        [[id, logprob], ...]], ...]}``, one entry per id, see ``serve.logprobs``).
        Each message is a list of the ids decoded since the last one: one id
        per step while the reader keeps up and the request decodes alone,
        more when it falls behind or while other requests decode with it
        (then a message leaves ``stream_interval_ms`` after the previous one
        at the soonest: 32 streams at 80 tokens/s each are 2,600 messages a
        second through Ray and HTTP otherwise). The last ends with a stop id
        unless the length ran out. Image placeholder ids are never generated
        (a continued answer re-reads the answer so far as prompt)."""
        from .batching import DONE, GenerationRequest

        req = GenerationRequest.from_dict(request)
        if request.get("response_format") is not None:  # compiled (or found compiled) outside the event loop
            req.constraint = await asyncio.to_thread(self._constraint, request["response_format"], req.prior)
            req.min_new_tokens = 0  # the format decides where the answer ends
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:  # from the batching or generate thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        batched = self.options.continuous_batching and self.batcher.fits(req)
        if batched and req.image_features is not None and self.batcher.reuses_prefixes:
            await asyncio.to_thread(req.digests)  # hashed here, not in the batching loop
        track = self.metrics.track(len(req.input_ids), self.stop_ids, req.max_new_tokens)
        try:
            if batched:
                cancel = self.batcher.submit(req, emit).cancel
            else:
                cancel = self._generate_in_thread(req, emit)
        except BaseException:
            track.finish(error=True)
            raise
        if not batched:
            self._unbatched += 1
        interval, last = self.options.stream_interval_ms / 1000, None
        failed = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, list) and last is not None and interval > 0 and self._shared():
                    wait = last + interval - loop.time()
                    if wait > 0:  # let more of this stream's ids gather, then send them together
                        await asyncio.sleep(wait)
                ids: list = []
                while isinstance(item, list):  # everything already waiting goes in one message
                    ids.extend(item)
                    item = queue.get_nowait() if not queue.empty() else None
                if ids:
                    if req.logprobs is None:
                        track.tokens_out(ids)
                        yield ids
                    else:  # TokenLogprob items
                        toks = [x.token for x in ids]
                        track.tokens_out(toks)
                        yield {"ids": toks, "logprobs": [[x.logprob, x.top] for x in ids]}
                    last = loop.time()
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    failed = True
                    raise item
        finally:
            cancel()
            track.finish(failed)
            if not batched:
                self._unbatched -= 1

    async def prompt_logprobs(self, request: dict) -> list:
        """The prompt's own ratings, for ``/v1/completions`` with ``echo``:
        for each token of ``input_ids`` after the first, ``[logprob, [[id,
        logprob], ...]]`` (its ``top`` most likely alternatives), from one
        forward pass, as the answers' tokens are rated (the ids an answer
        never holds ruled out)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._prompt_logprobs, list(request["input_ids"]),
                                          int(request.get("top", 0)))

    def _prompt_logprobs(self, ids: list[int], top: int, rows_at_once: int = 512) -> list:
        import torch

        from .sampling import rate

        if len(ids) < 2:
            return []
        if len(ids) > self.context_length:
            raise ValueError(f"the prompt has {len(ids)} tokens, over the model's context of {self.context_length}")
        suppressed = torch.tensor(self.model.suppressed_ids, dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
            logits = self.model(x, torch.ones_like(x)).logits[0, :-1]
            out = []
            for at in range(0, logits.shape[0], rows_at_once):  # a few rows' float32 log-softmax at a time
                scores = logits[at:at + rows_at_once].float()
                scores[:, suppressed] = -float("inf")
                lp = torch.log_softmax(scores, dim=-1)
                nxt = ids[at + 1:at + 1 + lp.shape[0]]
                out += [[r.logprob, r.top] for r in rate(lp, nxt, [top] * len(nxt))]
        return out

    def shutdown(self) -> None:
        """Stop the gauge thread and the batching loop and shut the generate
        pool down. Serve calls it (through ``__del__``) when it stops the
        replica; a caller that builds the class without Ray calls it when done."""
        self._stopped.set()
        if self.batcher is not None:
            self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:
        if hasattr(self, "_stopped"):  # not when __init__ failed before the threads started
            self.shutdown()

    def _set_queue_gauges(self) -> None:
        b = self.batcher
        self.metrics.queue((b.active if b is not None else 0) + self._unbatched, b.waiting if b is not None else 0)
        if b is not None:
            self.metrics.prefix_reused(b.stats["prefix_tokens"])

    def _constraint(self, spec: dict, accepted: list[int]):
        """A structured-output constraint (serve.grammar) for one answer; the
        compiler is built at the first request that asks for one."""
        from .grammar import Grammars

        with self._grammars_lock:
            if self._grammars is None:
                rows = self.model.llm.get_output_embeddings().weight.shape[0]
                self._grammars = Grammars(self.model.tokenizer.hf, rows, self.stop_ids)
        return self._grammars.constraint(spec, accepted)

    def _shared(self) -> bool:
        """Whether the batching loop decodes more than one request."""
        b = self.batcher
        return b is not None and b.active > 1

    def _generate_in_thread(self, req, emit):
        """One ``generate`` call for ``req`` in the worker pool; returns its cancel function."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from .batching import DONE

        cancelled = threading.Event()

        recorder = None
        if req.logprobs is not None:
            from .sampling import LogprobRecorder

            recorder = LogprobRecorder(req.logprobs)

        class Streamer(BaseStreamer):
            def put(self, value):
                ids = value.reshape(-1).tolist()
                if ids:  # the first call carries the (empty) prompt ids
                    emit(ids if recorder is None else [recorder.rate(t) for t in ids])

            def end(self):
                pass

        class Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        ids = torch.tensor([req.input_ids], dtype=torch.long)
        gen = {"max_new_tokens": req.max_new_tokens, "streamer": Streamer(),
               "suppress_tokens": self.model.suppressed_ids,
               "stopping_criteria": StoppingCriteriaList([Cancel()])}
        if req.min_new_tokens > 0:
            gen["min_new_tokens"] = req.min_new_tokens
        processors = [recorder] if recorder is not None else []
        if req.penalised:
            from .sampling import Penalties

            processors.append(Penalties(req))
        if req.constraint is not None:  # masked before anything picks a token
            from .grammar import GrammarMask

            processors.append(GrammarMask(req.constraint))
        if processors and req.temperature > 0 and req.seed is None:
            req.seed = random.getrandbits(63)  # sampled after them (generate's own sampling would come first)
        if req.temperature > 0 and req.seed is not None:  # drawn with the request's own generator, greedy picks it
            from .sampling import SeededSampler

            processors.append(SeededSampler(req))
        elif req.temperature > 0:
            gen.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        if processors:
            from transformers import LogitsProcessorList

            gen["logits_processor"] = LogitsProcessorList(processors)

        def run():
            try:
                self.model.generate(ids, None, req.features_tensor(), **gen)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                emit(e)
            finally:
                emit(DONE)

        self._pool.submit(run)
        return cancelled.set


def load_ingress_tokenizer(settings: ServeSettings):
    """The tokenizer and the resolved source, for the ingress."""
    source = resolve(settings)
    return load_tokenizer(source), source


def _queue_gauges(replica: weakref.ref, stopped: threading.Event) -> None:
    """Set an LLM replica's queue gauges every second until it shuts down.
    The thread holds the replica only while it reads it: a strong reference
    would keep the model alive after its owner dropped it, and free it from
    this thread while the interpreter exits (a native abort in torch)."""
    while not stopped.wait(1.0) and _gauges_once(replica()):
        pass


def _gauges_once(llm: LLM | None) -> bool:
    """One second's gauges; False once the replica is gone."""
    if llm is None:
        return False
    try:
        llm._set_queue_gauges()
    except Exception:  # noqa: BLE001 - a batcher being replaced; the next second reads the new one
        pass
    return True
