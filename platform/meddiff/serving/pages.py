"""The pages ``GET /`` serves to people: Jinja2 templates (autoescaped) under ``templates/``.
They are self-contained (inline CSS and script, no external assets) and call the same ``/v1``
routes as any client, with the token the person pastes."""

from __future__ import annotations

from functools import cache


@cache
def _env():
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(
        loader=PackageLoader("meddiff.serving", "templates"), autoescape=select_autoescape()
    )


def render(name: str, **context) -> str:
    return _env().get_template(name).render(**context)
