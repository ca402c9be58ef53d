"""Evaluation of generated songs: metrics, teacher-forced scores, plots and the report."""
