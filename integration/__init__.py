"""The careloop application: settings, storage, intake, pipeline, API and CLI.

This is the only package that wires the others together.
"""
