"""`python -m loca_train.evaluate --run-dir R | --checkpoint C`: does a run's encoder give dense
features that segment?

Three evaluations of the encoder's final patch tokens, none of which finetunes the encoder
(the protocol, fixed here, is written out in docs/EVALUATION.md):

- zero-shot prompt segmentation (MMC, Wu et al. 2023): the cosine similarity of one prompt
  patch inside an object with every patch, upsampled and thresholded, against the object's
  mask (Jaccard); the threshold is chosen on one half of the test images, reported on the other;
- intra- versus inter-object similarity: the mean cosine of patch pairs within one region and
  across two, and the ROC AUC of telling them apart;
- a linear probe: a linear classifier of the patch tokens trained on per-patch majority
  labels, its logits upsampled, mIoU on held-out images.

Every report holds two baselines computed in the same run: the same network at its random
initialisation and raw pixels (each patch's RGB values as its feature). Results go to
eval.json and eval.png (examples); the command prints a table.
"""
