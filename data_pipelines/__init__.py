"""Data sets and the Ray Data embedding job (LLaVA-format readers, synthetic data).

Uses ``models``; used by ``ray_jobs`` and ``serve``. Nothing here yet: the
readers and the embedding job are the next stage to be built.
"""
