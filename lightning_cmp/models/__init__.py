"""Example LightningModules used by the quickstart, recipes and tests."""

from lightning_cmp.models.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
