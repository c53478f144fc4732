"""Experiments that chain the layers below: the offsite-tuning table."""
