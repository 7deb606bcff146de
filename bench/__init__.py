"""medcollab's benchmarks: each prints ratios against a baseline measured in the same run.

``python -m bench`` runs them all in sequence and prints a summary; see ``bench/README.md``.
"""
