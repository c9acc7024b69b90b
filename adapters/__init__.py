"""vtprune.adapters."""
