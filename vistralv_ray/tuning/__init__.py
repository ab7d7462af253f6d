"""Tuning: Ray Tune sweeps of the base learning rate over a recipe, and what they leave behind.

`space` loads the YAML search spaces of tune_spaces/, `sweep` runs each trial as a full TorchTrainer
run inside a Tune function trainable, `results` and `plots` write best.json, trials.csv and the
pictures. Model and training code never import this package (nor Ray Tune).
"""
