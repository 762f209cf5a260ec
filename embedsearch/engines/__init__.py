"""Encoding engines: where the images of a build are decoded and encoded.

``local`` (the default) runs :func:`embedsearch.embed.embed_sources` in this process with
decode worker processes. ``ray`` (:mod:`embedsearch.engines.ray_engine`, needs the optional
``ray`` extra) streams the image list through a pool of encoder actors on a Ray cluster.

Both hand the build the same thing per chunk of images — the vectors of the images that
decoded and one :class:`~embedsearch.embed.ItemInfo` per image, in input order — and the
build commits each chunk through the same shard cache, so the bundle, its verification and
resume after a kill do not depend on the engine.
"""

from __future__ import annotations

ENGINES = ("local", "ray")
