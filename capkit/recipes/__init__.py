"""Recipes: what a command does, as library functions over the engine, the builder and the data layer.

- ``train``: ``train_experiment(cfg, config_path=...)``, composed of ``prepare``, ``build_hooks``, ``train`` and
  ``test``;
- ``evaluate``: ``score_checkpoint`` (a split, with an optional gallery) and ``score_files`` (against a
  references file or a dataset split);
- ``inference``: ``load_trained`` (a checkpoint or saved model) and ``load_eval_split``;
- ``captioning``: ``caption_files``, streamed batch captioning of files and folders to a JSON Lines, CSV or COCO
  file, resumable;
- ``ablation``: ``load_ablation``, ``run_ablation``, ``summarise``;
- ``experiment``: the loader and decoding settings every recipe reads from a config.

The command line parses arguments and calls these; nothing here imports it.
"""
