"""Cluster deployment: Ray cluster launcher config, KubeRay manifests and their generator."""
