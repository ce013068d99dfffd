"""Drafters propose draft tokens; verification lives elsewhere (`dspark_ray.core.verification`)."""
