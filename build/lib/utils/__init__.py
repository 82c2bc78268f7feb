"""Shared building blocks for the MobileNet scripts (data, schedule, checkpoints, metrics, ...)."""
