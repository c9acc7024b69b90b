"""vtprune.framework."""
