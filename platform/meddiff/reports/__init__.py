"""The report kit: every HTML page meddiff writes comes from here.

Pages are Jinja2 templates (autoescaping on) extending ``templates/base.html``, which carries the
shared CSS (inlined: pages open offline and can be mailed or attached to an MLflow run) and a header
saying what produced the page (:class:`Provenance`). Python code passes values, never HTML.

- :func:`render` / :func:`render_source`: a template (a package file, or template text such as an
  HTTP handler's page that extends ``base.html``) to a string.
- :func:`write_page`: render and write atomically (:func:`meddiff.files.write_text`).
- :func:`png_data_uri`: the one PNG-to-data-URI encoder (arrays, PNG bytes or PNG files).
- :func:`write_index`: the ``index.html`` of a run (steps, status, time, figures, links);
  :func:`index_folder`: the same for any job's output folder (``meddiff.cli`` calls it).
"""

from meddiff.reports.kit import (
    IndexStep,
    Provenance,
    Section,
    encode_png,
    environment,
    fmt,
    index_folder,
    pages_under,
    png_data_uri,
    provenance,
    render,
    render_source,
    write_index,
    write_page,
)

__all__ = [
    "IndexStep",
    "Provenance",
    "Section",
    "encode_png",
    "environment",
    "fmt",
    "index_folder",
    "pages_under",
    "png_data_uri",
    "provenance",
    "render",
    "render_source",
    "write_index",
    "write_page",
]
