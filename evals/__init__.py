"""Evaluation protocols: plain functions over a frozen or fine-tuned encoder returning
dict[str, float]."""
