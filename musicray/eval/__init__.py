"""Evaluation of generated songs: metrics, teacher-forced scores, plots and the report.

``metrics``: song measures from established definitions (Wu & Yang 2020; Yeh et al. 2021) and musicray's structure
and grammar checks; ``generation``: the test windows and their composition for evaluation; ``teacher_forced``:
loss and accuracy per sub-task on held-out examples; ``structure``: returning sections, key and register per track
(MusPy), bootstrap intervals, goals and a real-vs-generated classifier; ``plots``: the report's figures;
``report``: ``musicray eval``.
"""
