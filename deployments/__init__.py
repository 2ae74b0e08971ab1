"""Ray Serve deployments: one small class per model stage, composed through handles."""

from deployments.classifier import Classifier
from deployments.classifier_pool import ClassifierPool
from deployments.detector import Detector

__all__ = ["Classifier", "ClassifierPool", "Detector"]
