"""Ray Train jobs and evaluation.

- ``train``: stage 1 (projector) and stage 2 ((Q)LoRA + projector) as ``TorchTrainer`` jobs (``mmphi train``);
- ``evaluate``: held-out metrics of a checkpoint (``mmphi eval``);
- ``data``: training samples and features from a data set and its embeddings;
- ``packing``: a step's layout (padded or packed rows) and the chunked answer-token loss;
- ``outputs``: a run's metrics, final checkpoint, summary and curves.

Uses ``models`` and ``data_pipelines``.
"""
