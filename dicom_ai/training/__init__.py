"""Training pipeline: datasets, models, training, evaluation and synthetic phantom studies."""
