"""Readings of the model's internals: probes, the logit and tuned lens, grafting, patching, the refusal
direction, their figures."""
