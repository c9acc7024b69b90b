"""vtprune.experiments."""
