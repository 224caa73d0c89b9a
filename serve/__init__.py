"""Ray Serve deployments (Whisper, image encoder, Phi-3) and the HTTP/Gradio ingress.

Uses ``models`` and ``data_pipelines``. Nothing here yet.
"""
