"""Multi-granular pre-training: masking rules, objectives, curriculum and the trainer."""
