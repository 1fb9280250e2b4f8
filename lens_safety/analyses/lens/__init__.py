"""The logit lens, the tuned lens and logit grafting."""
