"""Figures, tables and the HTML report, drawn from result files."""
