"""Downstream tasks: official data formats, official metrics, fine-tuning and the Meta-Ave table.

One module per task (vqa, nlvr2, snli_ve, refcoco, retrieval), each exporting a ``TaskSpec``;
``registry.TASKS`` maps names to specs; ``finetune``, ``evaluate`` and ``table`` are the stages.
"""
