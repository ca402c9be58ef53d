"""Serving: the Ray Serve graph (HTTP ingress + one deployment per sub-task, or one multiplexed deployment).

``build_app(run_dir, config)`` gives the application for ``serve.run``; ``app_builder`` is the import path of
``serve run configs/serve/app.yaml``; ``serve_forever`` is what ``musicray serve`` runs once the command line
(``musicray.cli``) has parsed its options. They live in ``musicray.serve.app`` and are imported from there on
first use (Ray Serve and FastAPI load only then).
"""

__all__ = ["app_builder", "build_app", "serve_forever"]


def __getattr__(name: str):
    if name in __all__:
        from musicray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'musicray.serve' has no attribute {name!r}")
