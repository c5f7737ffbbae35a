"""The dense-feature evaluation behind `python -m loca_train.evaluate` (the command line and the
protocol: evaluate.py, docs/EVALUATION.md) and training's --eval-every, one module per job:

- data.py: the evaluation splits (procedural scenes, image folders with masks) and the feature
  sources (an encoder's patch tokens, raw pixels, the random-init encoder);
- metrics.py: the metrics of one image and the threshold protocol;
- probe.py: the linear probe and its fixed recipe;
- runner.py: every metric of every source over a split, and training's headline metrics;
- report.py: the printed table and the figure eval.png.
"""
