"""Command-line interface: parse → call one library function → render.

One module per command family, each a thin click shell over the library; the shared
vocabulary (one name and one help text per concept, and renamed options that keep working
for a release) is in :mod:`embedsearch.cli.options`. No torch, faiss or file formats here:
heavy modules are imported inside commands so that ``embedsearch --help`` stays instant.
"""

from __future__ import annotations

from embedsearch.cli.app import main
from embedsearch.cli.audit import audit_cmd
from embedsearch.cli.benchmark import benchmark_cmd
from embedsearch.cli.dedupe import dedupe_cmd, dedupe_undo_cmd, leakage_cmd
from embedsearch.cli.index import build_index_cmd, info_cmd, models_cmd
from embedsearch.cli.predict import predict_cmd
from embedsearch.cli.serve import serve_cmd
from embedsearch.cli.train import finetune_cmd, train_cmd

for _cmd in (models_cmd, build_index_cmd, predict_cmd, train_cmd, finetune_cmd, info_cmd,
             serve_cmd, benchmark_cmd, dedupe_cmd, dedupe_undo_cmd, leakage_cmd, audit_cmd):
    main.add_command(_cmd)

__all__ = ["main"]
