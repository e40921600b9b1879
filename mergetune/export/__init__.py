"""Everything that leaves mergetune: mergekit configurations (and back), model cards, run reports.

- ``layout``: what a base checkpoint looks like to an exporter (merged tensors, sizes, layer groups,
  block indices), read from file headers without loading weights;
- ``settings``: mergekit's parameter settings (scalars, gradients, ``filter`` conditions): resolve
  them exactly as mergekit does, and encode per-tensor values as the fewest conditions;
- ``mergekit``: ``mergetune export RECIPE --format mergekit``: a mergekit YAML that reproduces the
  recipe (exactly, in distribution for the random methods, or, with ``approximate``, the closest
  configuration with every difference listed);
- ``mergekit_import``: ``mergetune import-mergekit merge.yml``: a mergekit configuration as a recipe;
- ``card``: ``mergetune merge RUN_DIR``: the merged model of any front point, with its scores in
  the model card;
- ``report``: ``mergetune report RUN_DIR``: a self-contained HTML page and PNG figures of a search.
"""
