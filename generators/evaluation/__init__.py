"""Evaluation of synthetic tables: fidelity, privacy, utility (see docs/generators.md).

No module here imports sdmetrics, anonymeter or scikit-learn at import time.
"""
