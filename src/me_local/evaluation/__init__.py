"""Measuring what an ensemble buys: ``me-local eval`` (likelihood of texts, multiple-choice
accuracy with intervals) and ``me-local tune`` (weights fitted to a text, written back into
models.yaml). docs/eval.md describes the figures.

    command.py   the two click commands (registered lazily)
    run.py       scoring texts in windows and questions choice by choice, through Engine.score
    windows.py   long texts read in chunks and cut into windows that fit the members' contexts
    tasks.py     task files: me-local's own lines, ARC and HellaSwag shapes
    stats.py     Wilson intervals, the paired bootstrap, McNemar's exact test
    report.py    the JSON objects and the tables
    yamledit.py  weights written into models.yaml in place, the rest kept byte for byte
"""
