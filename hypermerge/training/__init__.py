"""Training: data sets, recipes and Trainer glue."""
