"""Scores of model outputs: perplexity/classification metrics (`metrics`), E2E metrics
(`e2e`: inputs and `score_e2e`, over `mteval` BLEU/NIST, `coco` METEOR/ROUGE-L/CIDEr and
`sacre` sacreBLEU/chrF/TER), decoding (`decode`, `generations`)."""
