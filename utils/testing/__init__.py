"""Test and demo support: tiny pipelines with random weights and synthetic subjects, built in code."""
