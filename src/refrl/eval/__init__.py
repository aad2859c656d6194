"""Evaluation suites, image grids and the HTML report."""
