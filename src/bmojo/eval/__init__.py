"""Evaluation: MQAR recall, perplexity at several context lengths, and the family report."""
