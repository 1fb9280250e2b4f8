"""What the model does: judges of replies, refusal scores and rates, jailbreak pairs."""
