"""Datasets: on-disk formats -> Sample records -> deterministic training samples."""
