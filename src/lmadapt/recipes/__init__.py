"""Recipes: compositions of the one run for a purpose (the demo, helper models, VAS value models)."""
