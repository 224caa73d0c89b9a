"""The Ray Serve application: three model deployments behind one ingress.

``build_app(args)`` is the application builder ``serve deploy`` imports
(``import_path: serve.app:build_app`` in ``serve/config.yaml``); ``args`` are
:class:`~serve.settings.ServeSettings` keys. ``run_local`` starts a local Ray
cluster and runs the same application with the deployment options of that
YAML file; ``mmphi serve`` calls it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from ray import serve

from .deployments import ASR, LLM, ImageEncoder, _autoscaling, load_ingress_tokenizer
from .settings import ServeSettings, SettingsError

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs

APP_NAME = "mmphi"
DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=200,
                  autoscaling_config=_autoscaling(2, 50), health_check_period_s=10)
@serve.ingress()
class Ingress:
    """FastAPI + Gradio in front of the ASR, ImageEncoder and LLM handles.

    The app is built inside the replica (``__serve_build_asgi_app__``, the
    late-bound form of ``@serve.ingress``): a FastAPI app with Gradio mounted
    cannot be pickled into the decorator, and the routes need this replica's
    handles and tokenizer."""

    def __init__(self, asr, image_encoder, llm, settings: dict):
        from .chat import ChatService

        self.settings = ServeSettings.from_dict(settings)
        tokenizer, source = load_ingress_tokenizer(self.settings)
        self.service = ChatService(asr, image_encoder, llm, tokenizer, source, self.settings)
        self.api_key = os.environ.get(self.settings.api_key_env) or None
        log.info("ingress ready: serving %s as %r%s", source.description, self.settings.model_name,
                 "; API key required" if self.api_key else "")
        if source.checkpoint is None and source.cfg.llm.random_init is not None:
            log.warning("no checkpoint given: serving the %r preset's random weights (answers are noise)",
                        source.cfg.name)

    def __serve_build_asgi_app__(self):
        from .api import build_api

        return build_api(self.service, api_key=self.api_key, mount_ui=self.settings.ui)

    def check_health(self) -> None:
        if self.service is None:
            raise RuntimeError("ingress is not initialised")


def build_app(args: dict | None = None, deployment_options: dict[str, dict] | None = None):
    """The bound application for ``serve run`` / ``serve deploy`` / ``serve.run``.

    ``deployment_options``: per-deployment ``.options(...)`` by name (ASR,
    ImageEncoder, LLM, Ingress), as in a Serve config's ``deployments`` list."""
    settings = ServeSettings.from_dict(args).to_dict()
    opts = deployment_options or {}

    def bind(dep, *a):
        o = dict(opts.get(dep.name) or {})
        if "num_replicas" in o:  # a fixed count replaces the default autoscaling, as in a Serve config
            o.setdefault("autoscaling_config", None)
        return (dep.options(**o) if o else dep).bind(*a)

    asr = bind(ASR, settings)
    image_encoder = bind(ImageEncoder, settings)
    llm = bind(LLM, settings)
    return bind(Ingress, asr, image_encoder, llm, settings)


def read_serve_config(path: str | Path = DEFAULT_CONFIG) -> tuple[dict, dict[str, dict]]:
    """(application args, per-deployment options) of the first application in
    a Serve config YAML."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such Serve config file") from None
    except (OSError, yaml.YAMLError) as e:
        raise SettingsError(f"{path} is not a readable YAML file: {e}") from None
    apps = data.get("applications") if isinstance(data, dict) else None
    if not apps or not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise SettingsError(f"{path}: no 'applications' list in this Serve config")
    app = apps[0]
    opts = {}
    for d in app.get("deployments") or []:
        if not isinstance(d, dict) or "name" not in d:
            raise SettingsError(f"{path}: each entry of 'deployments' needs a 'name'")
        d = dict(d)
        opts[d.pop("name")] = d
    return dict(app.get("args") or {}), opts


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None


def check_model_source(settings: ServeSettings) -> None:
    """What every replica will load, read once in the driver: the preset and
    its overrides, or the checkpoint's ``mmphi.json`` and the headers of its
    weight files. A wrong one raises a ``ConfigError`` or ``SettingsError``
    naming it, before any Ray process starts."""
    from models.checkpoint import CheckpointError
    from models.config import ConfigError

    from .loading import resolve

    try:
        source = resolve(settings)
    except (ConfigError, FileNotFoundError):
        raise
    except CheckpointError as e:  # an override that changes what the checkpoint is
        raise SettingsError(str(e)) from None
    except (OSError, ValueError) as e:  # mmphi.json unreadable or not JSON
        raise SettingsError(f"checkpoint {settings.checkpoint}: {type(e).__name__}: {e}") from None
    if source.checkpoint is None:
        return
    from models.checkpoint import check_safetensors

    for f in sorted(source.checkpoint.rglob("*.safetensors")):
        try:
            check_safetensors(f)
        except CheckpointError as e:
            raise SettingsError(str(e)) from None


def exposure_warning(host: str, port: int, settings: ServeSettings) -> str | None:
    """What to warn of when the server listens beyond this machine (``host``
    not a loopback address) with no API key in ``settings.api_key_env``."""
    import ipaddress

    if os.environ.get(settings.api_key_env):
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return (f"listening on {host}:{port} with no API key: anyone who can reach this port can use the chat page "
            f"and the API; set {settings.api_key_env} to require 'Authorization: Bearer <key>'")


def run_local(
    checkpoint: str | None = None,
    port: int = 8000,
    blocking: bool = True,
    *,
    host: str = "127.0.0.1",
    settings: dict | None = None,
    config: str | Path | None = DEFAULT_CONFIG,
    num_cpus: int | None = None,
    access_log: bool = True,
    system_logs: str = "INFO",
) -> str:
    """Serve the application on a local Ray cluster; returns the page's URL.

    ``checkpoint``: a training checkpoint folder (None: the preset's weights,
    random for ``tiny``). ``settings``: more :class:`ServeSettings` keys
    (they override ``config``'s application args). ``blocking``: serve until
    Ctrl-C, then stop the application; otherwise return once every deployment is
    healthy and leave it running (:func:`stop_app` stops it).
    ``access_log=False``: no line per request and per deployment call (in
    the replicas' log files and on the console); the rest of their logs stay.
    ``system_logs``: the log level of Serve's controller and HTTP proxy
    (``"WARNING"`` leaves out their line per deployment change and replica
    start, e.g. on a console that also shows a job's own progress)."""
    import ray

    args, opts = read_serve_config(config) if config else ({}, {})
    args.update(settings or {})
    if checkpoint is not None:
        args["checkpoint"] = str(Path(checkpoint).expanduser().resolve())
    checked = ServeSettings.from_dict(args)
    check_model_source(checked)  # fail here, at once, not in four replicas a minute later
    exposed = exposure_warning(host, port, checked)
    if exposed:
        log.warning(exposed)
    if not ray.is_initialized():  # a new local cluster, never a leftover one (see data_pipelines.embed.init_ray)
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
    try:
        current = serve.context._global_client  # an already running Serve instance
    except AttributeError:
        current = None
    if current is None:
        _check_port(host, port)
    serve.start(http_options={"host": host, "port": port},
                logging_config=None if system_logs == "INFO" else {"log_level": system_logs})
    started = time.monotonic()
    serve.run(build_app(args, opts), name=APP_NAME, route_prefix="/", blocking=False,
              logging_config=None if access_log else {"enable_access_log": False})
    url = f"http://{host}:{port}/"
    log.info("serving at %s (ready after %.0f s)", url, time.monotonic() - started)
    if blocking:
        serve_until_interrupted(url, metrics_url())
    return url


def metrics_url() -> str | None:
    """Where this node's Ray metrics agent serves Prometheus text (Ray Serve's
    metrics and ``serve.metrics``'), or None when it is not known."""
    import ray

    try:
        here = ray.util.get_node_ip_address()
        for node in ray.nodes():
            if node.get("Alive") and node.get("NodeManagerAddress") == here and node.get("MetricsExportPort"):
                return f"http://{here}:{node['MetricsExportPort']}/metrics"
    except Exception:  # noqa: BLE001 - only a hint printed at start-up
        pass
    return None


def stop_app() -> None:
    """Stop this application: its replicas finish what they hold and end.
    Serve itself (controller, HTTP proxy) ends with the Ray cluster, which a
    command stops as it exits when it started it, and keeps serving any other
    application on a cluster it joined. (``serve.shutdown()`` would stop
    those too, and on Ray 2.60 has the raylet print a failed
    ``ServeController.graceful_shutdown`` task at every stop.)"""
    serve.delete(APP_NAME)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_until_interrupted(url: str, metrics: str | None = None, shutdown_timeout_s: float = 60.0) -> None:
    """Say where the page and API are, keep serving until Ctrl-C, then stop the application.

    The stop is bounded: if the application has not stopped within ``shutdown_timeout_s``
    the command returns anyway and
    Ray's own exit handler stops the local cluster's processes."""
    print(f"mmphi: chat page at {url}  API at {url}v1  (Ctrl-C stops)", flush=True)
    if metrics:
        print(f"mmphi: metrics (Prometheus text, mmphi_* and Ray Serve's) at {metrics}", flush=True)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must work even when the command was started from a script in the
        # background (such shells start it with SIGINT ignored, which Python keeps);
        # SIGTERM (systemd, Kubernetes, kill) stops it the same orderly way
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("mmphi: stopping Serve ...", flush=True)
        stopper = threading.Thread(target=stop_app, name="serve-shutdown", daemon=True)
        stopper.start()
        stopper.join(shutdown_timeout_s)
        if stopper.is_alive():
            log.warning("the application did not stop within %.0f s; exiting and leaving the rest to Ray's shutdown",
                        shutdown_timeout_s)
