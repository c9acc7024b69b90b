"""vtprune.strategies."""
