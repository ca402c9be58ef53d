"""The web page the ingress serves at ``/``: plain HTML, CSS and JavaScript shipped in the package
(``musicray/serve/static``, listed in pyproject's package-data), so nothing is fetched from a CDN at run time.

The files are read once when the ingress starts (a few tens of kB) and answered from memory.
"""

from __future__ import annotations

from importlib import resources

STATIC_FOLDER = "static"
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # ES modules load only with a JavaScript type
    ".svg": "image/svg+xml",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every servable file of the static folder: name -> (bytes, content type). Only these names are served, so
    a request path can never reach another file."""
    folder = resources.files("musicray.serve").joinpath(STATIC_FOLDER)
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    if INDEX not in files:
        raise FileNotFoundError(f"the web page is missing from the package ({folder}/{INDEX}); reinstall musicray")
    return files
