"""The dense-feature evaluation behind `python -m loca_train.evaluate` (the command line and the
protocol: evaluate.py, docs/EVALUATION.md) and training's --eval-every, one module per job:

- data.py: the evaluation splits (procedural scenes, photo scenes, image folders with masks)
  and the feature sources (an encoder's patch tokens, raw pixels, the random-init encoder);
- voc.py: the split of a PASCAL VOC folder (its segmentation train and val lists);
- controls.py: the control sources (noise, position, colour, ideal);
- metrics.py: the metrics of one image and the threshold protocol;
- probe.py: the linear probe and its fixed recipe;
- runner.py: every metric of every source over a split, and training's headline metrics;
- scores.py: the scores with controls, thresholds chosen on validation images and bootstrap
  intervals, and runs of several seeds combined (--combine);
- stats.py: the bootstrap over test images and runs;
- report.py: the printed table and the figure eval.png.
"""
