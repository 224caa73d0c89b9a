"""Stopping the served application (``serve.app.stop_app``, what Ctrl-C on
``mmphi serve`` and the end of ``mmphi demo --serve check`` call): the
``mmphi`` application's replicas end, and another application on the same
Serve instance goes on answering."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_stopping_the_app_leaves_other_applications_serving():
    import ray
    from ray import serve

    from serve.app import APP_NAME, stop_app

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        def __init__(self, name: str):
            self.name = name

        def __call__(self, text: str) -> str:
            return f"{self.name}: {text}"

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        ours = serve.run(Echo.bind(APP_NAME), name=APP_NAME, route_prefix=None)
        other = serve.run(Echo.bind("other"), name="other", route_prefix=None)
        assert ours.remote("hi").result(timeout_s=60) == f"{APP_NAME}: hi"
        stop_app()
        apps = serve.status().applications
        assert APP_NAME not in apps and apps["other"].status == "RUNNING", apps
        assert other.remote("still there?").result(timeout_s=60) == "other: still there?"
    finally:
        serve.shutdown()
        ray.shutdown()
