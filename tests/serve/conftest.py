"""One Ray Serve instance per test module: started on a free loopback port, shut down with Ray afterwards."""

import contextlib

from musicray.serve.launch import free_port


@contextlib.contextmanager
def serving(run_dir, config: dict, num_cpus: int):
    """The musicray app for ``run_dir`` under ``config`` at ``/``; yields its base URL."""
    import ray
    from ray import serve

    from musicray.serve import build_app

    port = free_port()
    if ray.is_initialized():  # an earlier test's local instance: Serve needs its own resources
        ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(run_dir, config), name="musicray", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
