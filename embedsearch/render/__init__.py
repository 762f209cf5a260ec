"""Output rendering shared by every report the package writes.

- :mod:`embedsearch.render.thumbnails`: the one thumbnail maker (benchmark mistake
  galleries, dedupe / leakage / audit pages, the server's ``/images/`` route);
- :mod:`embedsearch.render.html`: the HTML page shell, escaping and the gallery style of
  the dedupe, leakage and audit pages;
- :mod:`embedsearch.render.document`: a small document model rendered to Markdown and to
  one self-contained HTML page (the benchmark report).

Nothing here computes a result: callers pass what to show.
"""
