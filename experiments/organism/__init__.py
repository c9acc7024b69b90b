"""The embedded demo model organism: a synthetic visual QA task and a tiny trained LLaVA."""
