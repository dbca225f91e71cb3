"""Training: LoRA/DoRA/QLoRA fine-tuning, pre-training small models, checkpoints with exact
resume, data-parallel over ``mlx.launch``.

- :mod:`loop`: the loop every room trains with (loss function, collate, metrics, Ctrl-C, resume);
- :mod:`data`: JSONL data sets and resumable, length-grouped batches;
- :mod:`finetune` / :mod:`pretrain` / :mod:`fuse`: the ``lora``, ``train`` and ``fuse`` jobs;
- :mod:`checkpoint`, :mod:`schedule`, :mod:`distributed`: their pieces; :mod:`tiny`: small models,
  tokenizers and data for examples and tests; :mod:`bench`: ``mlx-elm bench lora``.
"""
