"""Classifiers over cached embeddings: kNN, trained heads, zero-shot."""

#: Metrics a head's settings can be chosen by (``train --select-by``).
SELECT_BY = ("accuracy", "balanced_accuracy", "macro_f1")
#: The default selection metric; the README ("Trained heads") gives the evidence.
DEFAULT_SELECT_BY = "macro_f1"
