"""refbn.keras: diagnose and fix BatchNormalization statistics in Keras models.

Imports Keras (and TensorFlow) only when this subpackage is imported;
``import refbn`` never does.
"""
