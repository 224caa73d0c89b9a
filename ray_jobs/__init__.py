"""Ray Train jobs (projector pre-training, QLoRA instruction tuning) and evaluation.

Uses ``models`` and ``data_pipelines``. Nothing here yet.
"""
