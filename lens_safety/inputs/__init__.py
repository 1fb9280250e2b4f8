"""Prompt sets (with source and licence) and jailbreak templates."""
