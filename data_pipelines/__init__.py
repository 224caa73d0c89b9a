"""Data sets and the Ray Data embedding job.

- ``llava``: the LLaVA-Instruct-150K format reader (bad records skipped and listed);
- ``synthetic``: a learnable synthetic data set in that format (``mmphi data synth``);
- ``embed``: CLIP embeddings of every referenced image with Ray Data (``mmphi data embed``);
- ``storage``: local paths and object-store URIs through pyarrow filesystems.

Uses ``models``; used by ``ray_jobs`` and ``serve``.
"""
