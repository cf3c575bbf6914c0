"""Evaluation: image feature extractors, metric objects and continual (task x concept) matrices."""
