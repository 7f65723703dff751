"""Downstream tasks: official data formats, official metrics, fine-tuning and the Meta-Ave table."""
