"""Serving: the Ray Serve graph (HTTP ingress + one deployment per sub-task, or one multiplexed deployment).

``build_app(run_dir, config)`` gives the application for ``serve.run``; ``app_builder`` is the import path of
``serve run configs/serve/app.yaml``; ``main``/``add_arguments``/``run`` are ``musicray serve``. They live in
``musicray.serve.app`` and are imported from there on first use (Ray Serve and FastAPI load only then).
"""

__all__ = ["add_arguments", "app_builder", "build_app", "main", "run"]


def __getattr__(name: str):
    if name in __all__:
        from musicray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'musicray.serve' has no attribute {name!r}")
